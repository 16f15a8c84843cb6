"""Fixtures of the vLLM plugin tests (run in .venv-vllm: bash scripts/setup.sh vllm).

The checkpoints are make_demo_checkpoint's tiny random ones with the LM widened to head_dim 32 (vLLM's CPU
attention takes head sizes 32, 64, 80, ...; the demo's 16 is not among them), written in float32 so that vLLM
(dtype float32) and the dense fp32 reference (tests/reference.py) read the same numbers.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default would reserve far more

from atb_llm.demo.make_demo import make_demo_checkpoint
from atb_llm.demo.synthetic_video import write_synthetic_video

LM_OVERRIDES = {"hidden_size": 128, "num_attention_heads": 4, "num_multi_query_heads": 2, "intermediate_size": 256}


@pytest.fixture(scope="session")
def vllm_chat_dir(tmp_path_factory) -> str:
    return make_demo_checkpoint(str(tmp_path_factory.mktemp("vllm_chat")), seed=11, overrides=LM_OVERRIDES,
                                dtype=torch.float32)


@pytest.fixture(scope="session")
def vllm_base_published_dir(tmp_path_factory) -> str:
    """A base-template checkpoint whose config.json is as published: no model_type, no torch_dtype."""
    path = make_demo_checkpoint(str(tmp_path_factory.mktemp("vllm_base")), seed=12, template="base", shards=1,
                                overrides=LM_OVERRIDES, dtype=torch.float32)
    config_path = os.path.join(path, "config.json")
    with open(config_path, encoding="utf-8") as file:
        config = json.load(file)
    del config["model_type"], config["torch_dtype"]
    with open(config_path, "w", encoding="utf-8") as file:
        json.dump(config, file, indent=2)
    return path


@pytest.fixture(scope="session")
def vllm_media_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("vllm_media"))


@pytest.fixture(scope="session")
def vllm_video(vllm_media_dir) -> str:
    """5 s at 10 fps: 6 frames by the chat rule, 24 (repeating) by the base rule."""
    return write_synthetic_video(os.path.join(vllm_media_dir, "clip.mp4"), seconds=5, fps=10, size=(96, 64), seed=3)


class VllmServer:
    """`vllm serve` on the chat checkpoint, as a user starts it, under `VLLM_PLUGINS=cogvlm2_video` (vLLM's plugin
    filter must let the plugin in) and with `--tensor-parallel-size 2` where there are two cores (one per rank)."""

    model_name = "cogvlm2_llama3_video"
    start_timeout = 480

    def __init__(self, model_dir: str, media_dir: str, log_path: str):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.tp = 2 if (os.cpu_count() or 1) >= 2 else 1
        self.log_path = log_path
        self.base_url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, VLLM_PLUGINS="cogvlm2_video")
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        if self.tp == 2:
            env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"  # one core per rank (the default keeps a core free per node)
        command = [os.path.join(os.path.dirname(sys.executable), "vllm"), "serve", model_dir,
                   "--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", self.model_name,
                   "--dtype", "float32", "--enforce-eager", "--max-num-seqs", "4",
                   "--allowed-local-media-path", media_dir, "--tensor-parallel-size", str(self.tp)]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        self.started = time.monotonic()

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as file:
            return file.read()

    def wait(self) -> tuple[str, str]:
        import httpx

        while True:
            if self.process.poll() is not None:
                pytest.fail(f"vllm serve exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return self.base_url, self.log_path
            except httpx.HTTPError:
                pass
            if time.monotonic() - self.started > self.start_timeout:
                pytest.fail(f"vllm serve did not start in {self.start_timeout} s:\n{self.log()[-4000:]}")
            time.sleep(2)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture(scope="session")
def vllm_server(vllm_chat_dir, vllm_media_dir, tmp_path_factory):
    server = VllmServer(vllm_chat_dir, vllm_media_dir, str(tmp_path_factory.mktemp("vllm_serve") / "server.log"))
    yield server
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def _start_vllm_server_early(request):
    """Start the server with the first test here when test_serve.py is selected: its start (mostly interpreter
    imports in four processes) then overlaps the offline tests, which keep one core busy."""
    serve_tests = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_serve.py")
    if any(str(item.path) == serve_tests for item in request.session.items):
        request.getfixturevalue("vllm_server")
