"""Leftovers of servers that died without cleaning up: shared memory and temp directories.

Every temp directory a server makes lives under its owner directory ``<tmp>/cogvlm2-svc-<uid>/<pid>-<start
ticks>-<random>/`` (with ``owner.lock`` flocked for the process's life); ``sweep_stale_resources`` runs at
startup and releases the segments named in a dead owner's save files, then removes its directory, and never
touches a live owner's. ``create_shm`` leaves no segment behind on any error after creating it.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import signal
import tempfile
import types
from multiprocessing import resource_tracker, shared_memory

import httpx
import pytest

from atb_llm.utils import shm_utils
from atb_llm.utils.shm_utils import create_shm, release_shared_memory
from service import runtime
from service.runtime import (
    LOCK_FILE,
    SHM_SAVE_FILE,
    ResourceRegistry,
    Resources,
    process_start,
    sweep_stale_resources,
    tmp_root,
)
from tests.test_service import Server
from tests.test_service_tp import _processes_with, _rank_of, _wait_gone

SHM_DIR = "/dev/shm"

pytestmark = pytest.mark.skipif(not os.path.isdir(SHM_DIR) or not os.path.isdir("/proc"),
                                reason="needs POSIX shared memory in /dev/shm and /proc")


def _exists(segment: str) -> bool:
    return os.path.exists(os.path.join(SHM_DIR, segment))


def _saved(directory: str) -> list[str]:
    """Segment names in every save file under ``directory``."""
    names = []
    for parent, _dirs, files in os.walk(directory):
        for name in files:
            if name.startswith(SHM_SAVE_FILE):
                with open(os.path.join(parent, name), encoding="utf-8") as file:
                    names += [line.strip() for line in file if line.strip()]
    return names


def _dead_pid() -> int:
    with open("/proc/sys/kernel/pid_max", encoding="ascii") as file:
        return int(file.read()) + 1  # above the kernel's limit: never a live process


@pytest.fixture
def root(tmp_path, monkeypatch) -> str:
    """A temp root of the test's own (also for the servers it starts) and a fresh owner for this process."""
    base = tmp_path / "t"
    base.mkdir()
    monkeypatch.setenv("TMPDIR", str(base))
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    monkeypatch.setattr(runtime, "_owner", None)
    monkeypatch.setattr(runtime, "_owner_failed", False)
    yield tmp_root()
    owner = runtime._owner
    if owner is not None:
        owner.close()


def _fake_owner(root: str, name: str, segments: int = 1, lock: bool = True, save: str = SHM_SAVE_FILE) -> tuple:
    """An owner directory as a server leaves it when killed: a request dir whose save file names live segments."""
    path = os.path.join(root, name)
    os.makedirs(os.path.join(path, "req-abc"), mode=0o700)
    if lock:
        open(os.path.join(path, LOCK_FILE), "w").close()
    save_path = os.path.join(path, "req-abc", SHM_SAVE_FILE)
    names = []
    for _ in range(segments):
        shm = create_shm(64, save_path)
        names.append(shm.name)
        shm.close()
    if save != SHM_SAVE_FILE:
        os.rename(save_path, os.path.join(path, "req-abc", save))
    return path, names


# ------------------------------------------------------------------ create_shm on every error path

def _boom(error: BaseException, created: list[str]):
    def fail(*_args, **_kwargs):
        assert created and _exists(created[-1]), "the failure must come after the segment exists"
        raise error
    return fail


def _fail_ftruncate(monkeypatch, created):
    monkeypatch.setattr(os, "ftruncate", _boom(OSError(errno.ENOSPC, "No space left on device"), created))


def _fail_mmap(monkeypatch, created):
    monkeypatch.setattr(shared_memory, "mmap", types.SimpleNamespace(mmap=_boom(OSError(errno.ENOMEM, "mmap"),
                                                                                  created)))


def _fail_tracker_start(monkeypatch, created):
    if shm_utils._TRACK_PARAM:
        pytest.skip("Python 3.13+: segments are opened with track=False, no resource tracker")
    monkeypatch.setattr(resource_tracker._resource_tracker, "ensure_running",
                        _boom(OSError(errno.EAGAIN, "cannot start the resource tracker"), created))


def _fail_tracker_unregister(monkeypatch, created):
    if shm_utils._TRACK_PARAM:
        pytest.skip("Python 3.13+: segments are opened with track=False, no resource tracker")
    real = resource_tracker.unregister

    def fail(name, rtype):
        real(name, rtype)  # keep the tracker's books straight, then fail as a broken pipe would
        _boom(BrokenPipeError(errno.EPIPE, "resource tracker gone"), created)()
    monkeypatch.setattr(resource_tracker, "unregister", fail)


def _interrupt_attach(monkeypatch, created):
    monkeypatch.setattr(shm_utils, "_shared_memory", _boom(KeyboardInterrupt(), created))


def _fail_save_file(monkeypatch, created):
    monkeypatch.setattr(shm_utils, "safe_open", _boom(PermissionError(errno.EACCES, "Permission denied"), created))


def _interrupt_save_file(monkeypatch, created):
    monkeypatch.setattr(shm_utils, "safe_open", _boom(KeyboardInterrupt(), created))


def _fail_write(monkeypatch, created):
    real = shm_utils.safe_open

    def half_open(path, mode="r", **kwargs):
        file = real(path, mode, **kwargs)
        file.write = _boom(OSError(errno.EIO, "I/O error"), created)
        return file
    monkeypatch.setattr(shm_utils, "safe_open", half_open)


FAILURES = {
    "ftruncate": (_fail_ftruncate, RuntimeError),
    "mmap": (_fail_mmap, RuntimeError),
    "tracker-cannot-start": (_fail_tracker_start, RuntimeError),
    "tracker-unregister": (_fail_tracker_unregister, RuntimeError),
    "interrupt-while-attaching": (_interrupt_attach, KeyboardInterrupt),
    "save-file-open": (_fail_save_file, RuntimeError),
    "save-file-write": (_fail_write, RuntimeError),
    "interrupt-while-saving": (_interrupt_save_file, KeyboardInterrupt),
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_create_shm_unlinks_its_segment_on_every_error(failure, tmp_path, monkeypatch):
    created = []
    real_name = shm_utils._new_shm_name

    def recording_name():
        created.append(real_name())
        return created[-1]

    monkeypatch.setattr(shm_utils, "_new_shm_name", recording_name)
    inject, expected = FAILURES[failure]
    inject(monkeypatch, created)
    save_path = str(tmp_path / SHM_SAVE_FILE)
    try:
        with pytest.raises(expected):
            create_shm(4096, save_path)
    finally:
        monkeypatch.undo()
        leaked = [name for name in created if _exists(name)]
        for name in leaked:
            shm_utils._remove_segment(name)
    assert len(created) == 1
    assert leaked == [], f"{failure}: segment left in {SHM_DIR}"
    # and the module still works afterwards
    shm = create_shm(64, save_path)
    shm.close()
    release_shared_memory(save_path)
    assert not _exists(shm.name)


# ------------------------------------------------------------------ the sweep, on made-up owner directories

def test_sweep_removes_dead_owners_and_their_segments(root):
    os.makedirs(root, mode=0o700)
    dead, dead_names = _fake_owner(root, f"{_dead_pid()}-123-abc", segments=2)
    # killed while releasing: the names are in the renamed-aside save file
    releasing, releasing_names = _fake_owner(root, f"{_dead_pid()}-7-rel", save=f"{SHM_SAVE_FILE}.releasing.9.9")
    # killed while making its directory (no lock file yet)
    staging, staging_names = _fake_owner(root, f".new-{_dead_pid()}-5-stg", lock=False)
    # the pid is in use again, by another process (this one: a different start time)
    reused, reused_names = _fake_owner(root, f"{os.getpid()}-{process_start(os.getpid()) + 1}-reu")
    # not owner directories: left alone
    foreign, foreign_names = _fake_owner(root, "notes")
    as_file = os.path.join(root, f"{_dead_pid()}-1-file")
    open(as_file, "w").close()
    target, target_names = _fake_owner(os.path.dirname(root), f"{_dead_pid()}-2-tgt")
    link = os.path.join(root, f"{_dead_pid()}-2-lnk")
    os.symlink(target, link)
    try:
        assert all(_exists(name) for name in dead_names + releasing_names + staging_names + reused_names)
        assert sweep_stale_resources() == 4
        for path in (dead, releasing, staging, reused):
            assert not os.path.exists(path)
        assert not any(_exists(name) for name in dead_names + releasing_names + staging_names + reused_names)
        assert os.path.isdir(foreign) and os.path.isfile(as_file) and os.path.islink(link) and os.path.isdir(target)
        assert all(_exists(name) for name in foreign_names + target_names)
    finally:
        for path in (foreign, target):
            release_shared_memory(os.path.join(path, "req-abc", SHM_SAVE_FILE))


def test_sweep_never_touches_a_live_owner(root):
    os.makedirs(root, mode=0o700)
    # alive by pid and start time (the lock file is not there yet, or this is a fork of the owner)
    by_pid, by_pid_names = _fake_owner(root, f"{os.getpid()}-{process_start(os.getpid())}-pid", lock=False)
    # alive by its lock only: an owner whose pid means nothing here (another pid namespace)
    by_lock, by_lock_names = _fake_owner(root, f"{_dead_pid()}-9-lck")
    fd = os.open(os.path.join(by_lock, LOCK_FILE), os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert sweep_stale_resources() == 0
        assert os.path.isdir(by_pid) and os.path.isdir(by_lock)
        assert all(_exists(name) for name in by_pid_names + by_lock_names)
    finally:
        os.close(fd)
    try:
        assert sweep_stale_resources() == 1  # the lock is free now: that owner is dead
        assert not os.path.exists(by_lock) and not any(_exists(name) for name in by_lock_names)
        assert os.path.isdir(by_pid) and all(_exists(name) for name in by_pid_names)
    finally:
        release_shared_memory(os.path.join(by_pid, "req-abc", SHM_SAVE_FILE))


def test_request_dirs_live_in_a_locked_owner_dir_removed_at_exit(root):
    resources = Resources(ResourceRegistry())
    directory = resources.tmpdir()
    owner = os.path.dirname(directory)
    assert os.path.dirname(owner) == root and (os.stat(root).st_mode & 0o777) == 0o700
    pid, start, _ = os.path.basename(owner).split("-", 2)
    assert (int(pid), int(start)) == (os.getpid(), process_start(os.getpid()))
    with open(os.path.join(owner, LOCK_FILE)) as lock, pytest.raises(BlockingIOError):
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held for the process's life
    shm = create_shm(64, resources.shm_path)
    shm.close()
    assert sweep_stale_resources() == 0 and _exists(shm.name)  # our own: alive
    resources.release()
    assert not os.path.exists(directory) and not _exists(shm.name) and os.path.isdir(owner)
    # what a clean exit does (atexit): release whatever is still recorded, remove the owner directory
    leftover = Resources(ResourceRegistry())
    shm = create_shm(64, leftover.shm_path)
    shm.close()
    runtime._owner.close()
    runtime._owner = None
    assert not os.path.exists(owner) and not _exists(shm.name)


def test_a_root_that_is_not_private_is_not_swept_or_used(root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    path, names = _fake_owner(str(elsewhere), f"{_dead_pid()}-1-abc")
    os.symlink(elsewhere, root)
    try:
        assert sweep_stale_resources() == 0
        assert os.path.isdir(path) and all(_exists(name) for name in names)
        resources = Resources(ResourceRegistry())
        directory = resources.tmpdir()  # falls back to a plain temp directory (logged)
        assert not directory.startswith(str(elsewhere)) and os.path.isdir(directory)
        resources.release()
    finally:
        release_shared_memory(os.path.join(path, "req-abc", SHM_SAVE_FILE))


# ------------------------------------------------------------------ real servers

def _owner_of(root: str, pid: int) -> str:
    dirs = [entry for entry in os.listdir(root) if entry.startswith(f"{pid}-")]
    assert len(dirs) == 1, os.listdir(root)
    return os.path.join(root, dirs[0])


def _chat(video: str, stream: bool, max_tokens: int) -> dict:
    return {"model": "cogvlm2", "max_tokens": max_tokens, "stream": stream, "ignore_eos": True, "messages": [
        {"role": "user", "content": [{"type": "video_url", "video_url": video},
                                     {"type": "text", "text": "what happens in this video?"}]}]}


def _kill_mid_request(server: Server, video: str, victim: int, root: str) -> tuple[str, list[str]]:
    """SIGKILL ``victim`` once the server is streaming an answer about the video; returns the victim's owner
    directory and the segments its save files named just before (the video's frames, in shared memory)."""
    owner, names = "", []
    with httpx.Client(base_url=server.base, timeout=60) as client, \
            client.stream("POST", "/v1/chat/completions", json=_chat(video, True, 1500)) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                owner = _owner_of(root, victim)
                names = _saved(owner)
                os.kill(victim, signal.SIGKILL)
                break
    assert names and all(_exists(name) for name in names), "killed mid-request, with its shared memory"
    return owner, names


@pytest.fixture
def media(tmp_path, video_6_frames) -> str:
    directory = tmp_path / "media"
    directory.mkdir()
    shutil.copy(video_6_frames, directory / "clip.mp4")
    return str(directory)


def test_restart_sweeps_a_killed_server_but_not_a_live_one(root, chat_model_dir, media):
    video = os.path.join(media, "clip.mp4")
    live = Server(chat_model_dir, media)
    doomed = third = None
    planted = []
    try:
        response = live.client.post("/v1/chat/completions", json=_chat(video, False, 2))
        assert response.status_code == 200, response.text
        live_dir = _owner_of(root, live.proc.pid)
        # an in-flight request of the live server, as the sweep would find it
        shm = create_shm(64, os.path.join(tempfile.mkdtemp(prefix="req-", dir=live_dir), SHM_SAVE_FILE))
        shm.close()
        planted.append(shm.name)

        doomed = Server(chat_model_dir, media)
        dead_dir, dead_names = _kill_mid_request(doomed, video, doomed.proc.pid, root)
        doomed.proc.wait(30)
        assert os.path.isdir(dead_dir) and all(_exists(name) for name in dead_names)  # what kill -9 leaves

        third = Server(chat_model_dir, media)
        assert not os.path.exists(dead_dir) and not any(_exists(name) for name in dead_names)
        assert os.path.isdir(live_dir) and _exists(planted[0])
        assert f"removed {dead_dir}" in third.output()
        assert live.client.post("/v1/chat/completions", json=_chat(video, False, 2)).status_code == 200
    finally:
        codes = {id(server): server.stop() for server in (live, doomed, third) if server is not None}
        left = os.listdir(root)
        sweep_stale_resources()  # a failed run leaves nothing either
    assert all(code in (0, -signal.SIGKILL) for code in codes.values()), codes
    # a clean exit removes the server's own directory, with what it still had recorded
    assert left == [] and not _exists(planted[0])


def test_tp_supervisor_sweeps_after_rank0_is_killed(root, chat_model_dir, media):
    video = os.path.join(media, "clip.mp4")
    pair = Server(chat_model_dir, media, "--dtype", "float32", "--tp", "2")
    marker = f"--port {pair.port}"
    try:
        rank0 = [p for p in _processes_with(marker) if _rank_of(p) == "0"]
        assert len(rank0) == 1
        rank0_dir, names = _kill_mid_request(pair, video, rank0[0], root)
        pair.proc.wait(60)
        assert pair.proc.returncode == 1
        assert _wait_gone(marker) == []
        assert not os.path.exists(rank0_dir) and not any(_exists(name) for name in names)
    finally:
        pair.stop()
        sweep_stale_resources()  # a failed run leaves nothing either
