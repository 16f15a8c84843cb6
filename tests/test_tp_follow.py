"""Leader/follower tensor parallelism (the service's mode): only rank 0 schedules; results equal tp=1."""
import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(nproc: int, model_dir: str, video: str, out: str) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), "-m", "tests.follow_driver", model_dir, video, out]
    if nproc == 1:
        command = [sys.executable, "-m", "tests.follow_driver", model_dir, video, out]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out, encoding="utf-8") as file:
        return json.load(file)


def test_followers_reproduce_single_process(chat_model_dir, video_3_frames, tmp_path):
    single = _run(1, chat_model_dir, video_3_frames, str(tmp_path / "one.json"))
    pair = _run(2, chat_model_dir, video_3_frames, str(tmp_path / "two.json"))
    assert pair["world_size"] == 2 and single["world_size"] == 1
    assert single["errors"] == [None] * 3 and pair["errors"] == [None] * 3
    assert pair["tokens"] == single["tokens"] and all(len(t) == 8 for t in single["tokens"])
    assert pair["tokens"][2] == pair["tokens"][0]  # the copied prompt KV decodes like the original
    assert pair["all_free"] and single["all_free"]
