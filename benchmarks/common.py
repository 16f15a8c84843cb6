"""What the benchmarks share: videos (moving gradients and a disc, H.264 in mp4) and checkpoints, made quickly
and cached by their parameters (``~/.cache/cogvlm2_video_bench`` or ``$COGVLM2_BENCH_CACHE``) so that a second
run skips making them, and a ``python -m service`` process to send requests to."""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import av
import httpx
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_cache_dir() -> str:
    path = os.environ.get("COGVLM2_BENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                  "cogvlm2_video_bench")
    os.makedirs(path, exist_ok=True)
    return path


def make_video(seconds: int, fps: int = 30, size: tuple[int, int] = (1280, 720), gop: int | None = None,
               preset: str = "veryfast", crf: int = 20, folder: str | None = None, seed: int = 0) -> str:
    """An mp4 of ``seconds`` at ``fps`` and ``size`` (width, height); ``gop`` fixes the keyframe interval in
    frames (default: libx264's, 250); ``seed`` shifts the pattern (another content). Made once per parameter
    set."""
    width, height = size
    name = f"bench_{seconds}s_{fps}fps_{width}x{height}_gop{gop or 'x264'}_{preset}_crf{crf}_s{seed}.mp4"
    path = os.path.join(folder or bench_cache_dir(), name)
    if os.path.exists(path):
        return path
    yy, xx = np.mgrid[0:height, 0:width]
    red = (xx % 256).astype(np.uint8)
    green = ((2 * yy + xx // 3) % 256).astype(np.uint8)
    disc = ((xx - width // 2) ** 2 + (yy - height // 2) ** 2 < (height // 4) ** 2).astype(np.uint8) * 180 + 40
    partial = path + f".{os.getpid()}.part"
    with av.open(partial, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        options = {"preset": preset, "crf": str(crf)}
        if gop:
            options.update(g=str(gop), keyint_min=str(gop), sc_threshold="0")
        stream.options = options
        frame = np.empty((height, width, 3), np.uint8)
        for i in range(seed * 1000, seed * 1000 + seconds * fps):
            frame[..., 0] = np.roll(red, 3 * i, axis=1)
            frame[..., 1] = np.roll(green, -2 * i, axis=0)
            frame[..., 2] = np.roll(disc, (int(height / 12 * np.sin(i / 20)), 5 * i), axis=(0, 1))
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            picture.pts = i - seed * 1000
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(partial, path)
    return path


def make_checkpoint(name: str, overrides: dict, dtype: str = "float32") -> str:
    """A random checkpoint in the real layout (``make_demo_checkpoint``), made once per name and overrides."""
    import torch

    from atb_llm.demo.make_demo import make_demo_checkpoint

    tag = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(bench_cache_dir(), f"model_{name}_{dtype}_{tag}")
    if not os.path.exists(os.path.join(path, "config.json")):
        partial = path + f".{os.getpid()}.part"
        make_demo_checkpoint(partial, shards=1, overrides=overrides, dtype=getattr(torch, dtype))
        os.replace(partial, path)
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServiceProcess:
    """``python -m service`` on a free loopback port (its log in ``log_path``), healthy once constructed."""

    def __init__(self, model_dir: str, media_dir: str, *flags: str, log_path: str):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--model_path", model_dir, "--port", str(self.port),
             "--allowed-media-dir", media_dir, "--enable-debug-routes", *flags], cwd=REPO, stdout=self.log,
            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {log_path}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not become healthy; see {log_path}")

    def resources(self) -> dict:
        return httpx.get(self.base + "/debug/resources", timeout=30).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
