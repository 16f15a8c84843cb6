"""``python -m service --tp 2``: rank 0 serves and schedules, rank 1 follows; same answers as --tp 1, and
every process goes away on SIGTERM and when a worker dies."""
from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from tests.test_service import Server

MAX_WAIT = 90


def _processes_with(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker`` (the server's unique port)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as file:
                cmdline = file.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as file:
                state = file.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            pids.append(int(entry))
    return pids


def _rank_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as file:
            env = dict(item.split(b"=", 1) for item in file.read().split(b"\0") if b"=" in item)
    except OSError:
        return None
    return env.get(b"RANK", b"").decode() or None


def _wait_gone(marker: str, timeout: float = MAX_WAIT) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = _processes_with(marker)
        if not alive:
            return []
        time.sleep(0.25)
    return _processes_with(marker)


@pytest.fixture(scope="module")
def tp_media(tmp_path_factory, video_6_frames) -> str:
    media = tmp_path_factory.mktemp("tp_media")
    shutil.copy(video_6_frames, media / "clip.mp4")
    return str(media)


def _ask(server: Server, video: str) -> str:
    body = {"model": "cogvlm2_llama3_video", "max_tokens": 12, "temperature": 0, "messages": [
        {"role": "user", "content": [{"type": "video_url", "video_url": video},
                                     {"type": "text", "text": "what is the general content of this video?"}]}]}
    response = server.client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_tp2_answers_like_tp1_and_stops_cleanly(chat_model_dir, tp_media):
    video = os.path.join(tp_media, "clip.mp4")
    single = Server(chat_model_dir, tp_media, "--dtype", "float32")
    try:
        expected = _ask(single, video)
    finally:
        assert single.stop() == 0, single.output()
    pair = Server(chat_model_dir, tp_media, "--dtype", "float32", "--tp", "2")
    marker = f"--port {pair.port}"
    try:
        assert len([p for p in _processes_with(marker) if _rank_of(p) is not None]) == 2
        assert _ask(pair, video) == expected
        assert _ask(pair, video) == expected  # the vision-feature cache path too
        assert pair.wait_idle()["kv_blocks_all_free"]
    finally:
        code = pair.stop()
    with open(pair.log.name, encoding="utf-8", errors="replace") as log:
        assert code == 0, log.read()[-6000:]
    assert _wait_gone(marker) == [], "processes left behind after SIGTERM"


def test_tp2_worker_death_stops_everything(chat_model_dir, tp_media):
    pair = Server(chat_model_dir, tp_media, "--dtype", "float32", "--tp", "2")
    marker = f"--port {pair.port}"
    try:
        followers = [p for p in _processes_with(marker) if _rank_of(p) == "1"]
        assert len(followers) == 1
        os.kill(followers[0], signal.SIGKILL)
        assert _wait_gone(marker) == [], "a worker died and the others kept running"
        # The supervisor's /proc entry empties a moment before it is reaped: wait for it rather than poll once.
        assert pair.proc.wait(10) != 0
    finally:
        pair.stop()


def test_bad_model_path_is_a_one_line_error(tmp_path):
    import subprocess
    import sys

    from tests.test_service import REPO

    done = subprocess.run([sys.executable, "-m", "service", "--model_path", str(tmp_path / "missing"), "--port", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "does not exist" in done.stderr and "Traceback" not in done.stderr
