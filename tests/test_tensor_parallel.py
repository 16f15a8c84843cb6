"""Tensor parallelism on CPU (gloo, torchrun): the same greedy tokens as one process, logits within 1e-5."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from tests.tp_driver import run_cases

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int, cases: list[dict], out_dir: str) -> list[dict]:
    """Runs the cases on ``nproc`` gloo ranks and returns every rank's results."""
    os.makedirs(out_dir, exist_ok=True)
    spec = os.path.join(out_dir, "spec.json")
    with open(spec, "w", encoding="utf-8") as file:
        json.dump(cases, file)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "tests.tp_driver", spec, out_dir]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(nproc)]


@pytest.fixture(scope="module")
def cases(chat_model_dir, base_model_dir, video_6_frames) -> list[dict]:
    return [
        # One batch: a video question and a text-only question (a ragged prefill across ranks).
        {"name": "chat", "model_dir": chat_model_dir, "steps": STEPS,
         "items": [{"text": "What is happening in this video?", "video": video_6_frames},
                   {"text": "What's deep learning?"}]},
        {"name": "base", "model_dir": base_model_dir, "steps": STEPS,
         "items": [{"text": "A video of", "video": video_6_frames}]},
    ]


@pytest.fixture(scope="module")
def single(cases) -> dict:
    return run_cases(cases)


def assert_same(single: dict, ranks: list[dict], names: list[str]) -> None:
    for name in names:
        expected = single[name]
        for rank, results in enumerate(ranks):
            got = results[name]
            assert got["tokens"] == expected["tokens"], f"{name}: rank {rank} greedy tokens differ"
            assert got["texts"] == expected["texts"]
            for got_logits, want_logits in zip(got["logits"], expected["logits"]):
                assert got_logits.shape == want_logits.shape
                diff = (got_logits - want_logits).abs().max().item()
                assert diff < 1e-5, f"{name}: rank {rank} logits differ by {diff}"
        # Every rank gathers the full vocabulary: identical logits everywhere.
        for results in ranks[1:]:
            for a, b in zip(results[name]["logits"], ranks[0][name]["logits"]):
                assert torch.equal(a, b)


def test_tp2_matches_one_process(single, cases, tmp_path):
    ranks = torchrun(2, cases, str(tmp_path / "tp2"))
    assert_same(single, ranks, ["chat", "base"])
    # 4 query / 2 KV heads over 2 ranks: one KV head per rank, and the cache is sized for it.
    for results in ranks:
        assert results["chat"]["num_kv_heads"] == 1
        assert results["chat"]["kv_cache_shape"][2] == 1
    assert single["chat"]["num_kv_heads"] == 2


def test_tp4_replicates_kv_heads(single, cases, tmp_path):
    """4 ranks, 2 KV heads: each KV head is replicated on two ranks (the GQA replication path)."""
    ranks = torchrun(4, cases[:1], str(tmp_path / "tp4"))
    assert_same(single, ranks, ["chat"])
    for results in ranks:
        assert results["chat"]["num_kv_heads"] == 1
        assert results["chat"]["kv_cache_shape"][2] == 1


RUN_PA_SH = os.path.join(REPO, "examples", "models", "cogvlm2_llama3_video", "run_pa.sh")


def runner_args(model_dir: str, video: str, results: str) -> list[str]:
    return ["--model_path", model_dir, "--video_path", video, "--input_texts", "What is happening?", "Describe it.",
            "--max_batch_size", "2", "--max_output_length", str(STEPS), "--ignore_eos", "--dtype", "float32",
            "--device", "cpu", "--block_size", "16", "--results_save_path", results]


def launcher_env(**extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, MASTER_PORT=str(free_port()),
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "RUN_PA_DRY_RUN", "TP_WORLD_SIZE"):
        env.pop(name, None)
    env.update(extra)
    return env


def test_run_pa_sh_world_size_from_flags():
    """--nproc / --tp (consumed by the launcher) override the device count of ASCEND_RT_VISIBLE_DEVICES."""
    def dry(*args, **env):
        done = subprocess.run(["bash", RUN_PA_SH, *args], env=launcher_env(RUN_PA_DRY_RUN="1", **env), cwd=REPO,
                              capture_output=True, text=True, timeout=30)
        return done.returncode, done.stdout
    rc, out = dry("--model_path", "m")
    assert rc == 0 and "torch.distributed.run" not in out and "--model_path m" in out
    rc, out = dry("--nproc", "4", "--video_path", "v.mp4")
    assert rc == 0 and "--nproc_per_node 4" in out and "--nproc " not in out.split("run_pa")[-1]
    rc, out = dry("--tp=2", ASCEND_RT_VISIBLE_DEVICES="0,1,2,3")
    assert rc == 0 and "--nproc_per_node 2" in out and "--tp" not in out
    rc, out = dry(ASCEND_RT_VISIBLE_DEVICES="0,1,2")
    assert rc == 0 and "--nproc_per_node 3" in out
    assert dry("--nproc", "zero")[0] != 0


def test_offline_runner_tp2_answers_like_one_process(chat_model_dir, video_6_frames, tmp_path):
    """The real launchers: run_pa.sh with two visible devices, and the runner's own --tp 2."""
    from examples.models.cogvlm2_llama3_video.run_pa import main

    single = tmp_path / "tp1.json"
    assert main(runner_args(chat_model_dir, video_6_frames, str(single))) == 0
    expected = json.loads(single.read_text())
    assert all(r["error"] is None and len(r["output_token_ids"]) == STEPS for r in expected)

    by_devices = tmp_path / "devices.json"
    done = subprocess.run(["bash", RUN_PA_SH, *runner_args(chat_model_dir, video_6_frames, str(by_devices))],
                          env=launcher_env(ASCEND_RT_VISIBLE_DEVICES="0,1"), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "--nproc_per_node" not in done.stdout  # a real run, not the dry one
    by_flag = tmp_path / "flag.json"
    done = subprocess.run([sys.executable, "-m", "examples.models.cogvlm2_llama3_video.run_pa", "--tp", "2",
                           *runner_args(chat_model_dir, video_6_frames, str(by_flag))],
                          env=launcher_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    for path in (by_devices, by_flag):
        got = json.loads(path.read_text())
        assert [r["output_token_ids"] for r in got] == [r["output_token_ids"] for r in expected]
        assert [r["output_text"] for r in got] == [r["output_text"] for r in expected]
