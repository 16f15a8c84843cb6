"""The service's runtime: model, one engine thread, per-request resources, tokenization workers.

Threads:
- the asyncio event loop (HTTP);
- a small pool of tokenizer workers (video decoding + writing the pixels to shared memory is slow);
- one engine thread that loops ``engine.step()`` while there is work and sleeps on a condition otherwise,
  handing each ``StepOutput`` to its request's asyncio queue with ``loop.call_soon_threadsafe``.

Temp files: every request directory lives under this process's *owner directory*
``<tmp>/cogvlm2-svc-<uid>/<pid>-<start ticks>-<random>/`` (the root is private to the user, 0700), which
holds ``owner.lock``, ``flock``-ed for the process's life. A directory's owner is alive while its lock is
held or while a process with that pid and that start time (``/proc/<pid>/stat``, so a reused pid does not
count) exists. :func:`sweep_stale_resources` (run when a server or a ``--tp`` supervisor starts, and by the
supervisor when its ranks have exited) releases every shared-memory segment named in a dead owner's
``shm_name.txt`` files, then removes its directory; a clean exit removes the process's own directory.
"""
from __future__ import annotations

import asyncio
import atexit
import collections
import itertools
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from atb_llm.runner.engine import GenerationEngine, QueueFullError, Request, RequestError, StepOutput
from atb_llm.utils.shm_utils import release_shared_memory

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: liveness falls back to the pid and start time
    fcntl = None

logger = logging.getLogger("service")

SHM_SAVE_FILE = "shm_name.txt"
LOCK_FILE = "owner.lock"
_STAGING = ".new-"  # an owner directory is made under this prefix and renamed once its lock is held
_OWNER_DIR = re.compile(r"(?:\.new-)?(\d+)-(\d+)-[a-z0-9_]+")


def tmp_root() -> str:
    """The directory every server of this user keeps its temp files in: ``<tmp>/cogvlm2-svc-<uid>``."""
    return os.path.join(tempfile.gettempdir(), f"cogvlm2-svc-{os.getuid()}")


def _private_root(create: bool) -> str | None:
    """The root, checked to be a real directory of this user with no group/other access; None if absent."""
    root = tmp_root()
    if create:
        try:
            os.mkdir(root, 0o700)
        except FileExistsError:
            pass
    try:
        info = os.lstat(root)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise RuntimeError(f"{root} is not a directory owned by this user; remove it or set TMPDIR")
    if info.st_mode & 0o077:
        os.chmod(root, 0o700)
    return root


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None if there is no such (running) process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            fields = file.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):  # exited, only waiting to be reaped: its locks are gone already
        return None
    return int(fields[19])


class _Owner:
    """This process's owner directory, made on first use and removed at a clean exit."""

    def __init__(self, root: str):
        self.pid = os.getpid()
        start = process_start(self.pid) or 0
        for attempt in range(5):
            # Made under a staging name and renamed once locked, so no sweeper ever sees it unlocked
            # (one in another pid namespace could not tell it is alive from the pid).
            staging = tempfile.mkdtemp(prefix=f"{_STAGING}{self.pid}-{start}-", dir=root)
            path = os.path.join(root, os.path.basename(staging)[len(_STAGING):])
            fd = None
            try:
                fd = os.open(os.path.join(staging, LOCK_FILE),
                             os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.rename(staging, path)
                if os.stat(os.path.join(path, LOCK_FILE)).st_ino != os.fstat(fd).st_ino:
                    raise FileNotFoundError(LOCK_FILE)
            except FileNotFoundError:  # a sweeper removed the staging directory in between: start again
                if fd is not None:
                    os.close(fd)
                shutil.rmtree(path, ignore_errors=True)
                if attempt == 4:
                    raise
                continue
            except BaseException:
                if fd is not None:
                    os.close(fd)
                shutil.rmtree(staging, ignore_errors=True)
                raise
            self.path, self._fd = path, fd
            return

    def close(self) -> None:
        if os.getpid() != self.pid or self._fd is None:  # a forked child's copy, or closed already
            return
        try:
            _release_saved(self.path)
            shutil.rmtree(self.path, ignore_errors=True)
        finally:
            os.close(self._fd)
            self._fd = None


_owner: _Owner | None = None
_owner_lock = threading.Lock()
_owner_failed = False


def owner_dir() -> str | None:
    """This process's owner directory (made on first call); None if the root is unusable (logged once)."""
    global _owner, _owner_failed  # pylint: disable=global-statement
    with _owner_lock:
        if _owner is None or _owner.pid != os.getpid():
            if _owner_failed:
                return None
            try:
                _owner = _Owner(_private_root(create=True))
            except (OSError, RuntimeError) as error:
                _owner_failed = True
                logger.warning(f"temp files go to plain temp directories that a restart cannot clean up: {error}")
                return None
            atexit.register(_owner.close)
        return _owner.path


def _release_saved(directory: str) -> int:
    """Release every segment named in the save files under ``directory`` (including ones whose release was
    interrupted: ``shm_name.txt.releasing.*``); returns how many names they held."""
    count = 0
    for parent, _dirs, files in os.walk(directory):
        for name in files:
            if name != SHM_SAVE_FILE and not name.startswith(SHM_SAVE_FILE + ".releasing."):
                continue
            path = os.path.join(parent, name)
            try:
                with open(path, encoding="utf-8", errors="replace") as file:
                    count += sum(1 for line in file if line.strip())
                release_shared_memory(path)
            except (OSError, ValueError, RuntimeError) as error:
                logger.warning(f"releasing the shared memory named in {path} failed: {error}")
    return count


def _owner_alive(path: str, pid: int, start: int) -> tuple[bool, int | None]:
    """Whether the directory's owner lives; if not, a descriptor holding its lock (None without a lock file)."""
    if start and process_start(pid) == start:
        return True, None
    try:
        fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, None
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held: the owner lives (in another pid namespace, or a forked child of it)
            os.close(fd)
            return True, None
    return False, fd


def sweep_stale_resources() -> int:
    """Release the shared memory and remove the temp directories of servers that died without cleaning up
    (``kill -9``, a crashed rank 0); a live server's directories are never touched. Returns how many
    directories were removed; logs instead of raising."""
    try:
        root = _private_root(create=False)
        entries = os.listdir(root) if root is not None else []
    except (OSError, RuntimeError) as error:
        logger.warning(f"cannot sweep leftover temp files: {error}")
        return 0
    removed = 0
    for entry in entries:
        match = _OWNER_DIR.fullmatch(entry)
        path = os.path.join(root, entry)
        try:
            if match is None or not stat.S_ISDIR(os.lstat(path).st_mode):
                continue
            alive, fd = _owner_alive(path, int(match[1]), int(match[2]))
        except OSError:
            continue
        if alive:
            continue
        try:
            segments = _release_saved(path)
            shutil.rmtree(path, ignore_errors=True)
        finally:
            if fd is not None:
                os.close(fd)
        removed += 1
        logger.info(f"removed {path} of a dead server (pid {match[1]}) and {segments} shared-memory segment(s) "
                    "it had not released")
    return removed


@dataclass
class Event:
    output: StepOutput
    batch_size: int  # sequences that got a token in this engine step
    time: float  # perf_counter when the step ended
    index: int = 0  # which of the HTTP request's sequences (n / best_of > 1) this output belongs to


class Resources:
    """A request's temp directory (shm save file, inline videos); released exactly once."""

    def __init__(self, registry: ResourceRegistry):
        self._registry = registry
        self._lock = threading.Lock()
        self._dir: str | None = None
        self._released = False
        registry.add(self)

    def tmpdir(self) -> str:
        with self._lock:
            if self._released:
                raise RuntimeError("request resources already released")
            if self._dir is None:
                owner = owner_dir()
                self._dir = (tempfile.mkdtemp(prefix="req-", dir=owner) if owner is not None
                             else tempfile.mkdtemp(prefix="cogvlm2-svc-"))
            return self._dir

    @property
    def shm_path(self) -> str:
        return os.path.join(self.tmpdir(), SHM_SAVE_FILE)

    def segments(self) -> list[str]:
        if self._dir is None:
            return []
        try:
            with open(os.path.join(self._dir, SHM_SAVE_FILE), encoding="utf-8") as file:
                return [line.strip() for line in file if line.strip()]
        except FileNotFoundError:
            return []

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
            directory = self._dir
        try:
            if directory is not None:
                self._registry.note_released(self.segments())
                path = os.path.join(directory, SHM_SAVE_FILE)
                if os.path.exists(path):
                    release_shared_memory(path)
        except Exception as error:  # never let cleanup break the engine loop
            logger.warning(f"releasing shared memory failed: {error}")
        finally:
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
            self._registry.discard(self)


class ResourceRegistry:
    def __init__(self):
        self._lock = threading.Lock()
        self._active: set[Resources] = set()
        self.released_segments: collections.deque[str] = collections.deque(maxlen=4096)

    def add(self, resources: Resources) -> None:
        with self._lock:
            self._active.add(resources)

    def discard(self, resources: Resources) -> None:
        with self._lock:
            self._active.discard(resources)

    def note_released(self, names: list[str]) -> None:
        with self._lock:
            self.released_segments.extend(names)

    def active(self) -> list[Resources]:
        with self._lock:
            return list(self._active)

    def active_segments(self) -> list[str]:
        return [name for r in self.active() for name in r.segments()]

    def release_all(self) -> None:
        for resources in self.active():
            resources.release()


class EngineLoop:
    """Owns the engine thread; ``submit``/``abort`` are called from the event loop."""

    def __init__(self, engine: GenerationEngine):
        self.engine = engine
        self._cv = threading.Condition()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.steps = 0

    def start(self) -> None:
        self._thread.start()

    def new_id(self) -> str:
        return f"svc-{next(self._ids)}"

    def submit(self, request: Request, queue: asyncio.Queue | None = None) -> asyncio.Queue:
        """Enqueue into the engine; raises RequestError / QueueFullError / ValueError like add_request.

        Several requests may share one ``queue`` (the sequences of one HTTP request)."""
        loop = asyncio.get_running_loop()
        queue = asyncio.Queue() if queue is None else queue
        if not request.request_id:
            request.request_id = self.new_id()
        with self._cv:
            if self._stopping:
                raise RuntimeError("the engine is stopping")
            self._streams[request.request_id] = (loop, queue)
        try:
            self.engine.add_request(request)
        except BaseException:
            with self._cv:
                self._streams.pop(request.request_id, None)
            raise
        with self._cv:
            self._cv.notify()
        return queue

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        with self._cv:
            self._cv.notify()

    def abort_all(self) -> None:
        with self._cv:
            ids = list(self._streams)
        for request_id in ids:
            self.engine.abort(request_id)
        with self._cv:
            self._cv.notify()

    @property
    def num_active(self) -> int:
        with self._cv:
            return len(self._streams)

    def _deliver(self, events: list[Event]) -> None:
        for event in events:
            with self._cv:
                target = (self._streams.pop(event.output.request_id, None) if event.output.finished
                          else self._streams.get(event.output.request_id))
            if target is None:
                continue
            loop, queue = target
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop is closed: nobody listens any more
                pass

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self.engine.has_unfinished():
                    self._cv.wait(0.5)
                if self._stopping and not self.engine.has_unfinished():
                    return
            try:
                outputs = self.engine.step()
            except Exception as error:  # a bug: fail every request rather than hang them
                logger.exception("engine step failed")
                with self._cv:
                    ids = list(self._streams)
                for request_id in ids:
                    self.engine.abort(request_id)
                outputs = [StepOutput(i, [], "", True, "error", f"engine failure: {error}") for i in ids]
            self.steps += 1
            batch = sum(1 for o in outputs if o.token_ids)
            now = time.perf_counter()
            self._deliver([Event(o, batch, now) for o in outputs])

    def stop(self, timeout: float = 10.0) -> None:
        self.abort_all()
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)


class Tokenizers:
    """Worker threads for the plugin's service path (video decoding + shared memory)."""

    def __init__(self, model_runner, workers: int = 2):
        self.model = model_runner
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenize")

    def _items(self, items: list[dict], shm_path: str, use_video_cache: bool = True) -> list[int]:
        ids = self.model.router.tokenize(items, shm_name_save_path=shm_path, use_video_cache=use_video_cache)
        return [int(i) for i in ids.tolist()]

    def _chat(self, messages: list[dict], shm_path: str, use_video_cache: bool = True) -> list[int]:
        return [int(i) for i in self.model.input_builder.make_context(0, messages, shm_name_save_path=shm_path,
                                                                       use_video_cache=use_video_cache)]

    async def tokenize_items(self, items: list[dict], shm_path: str) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._items, items, shm_path)

    async def tokenize_chat(self, messages: list[dict], shm_path: str) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._chat, messages, shm_path)

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["EngineLoop", "Event", "QueueFullError", "RequestError", "ResourceRegistry", "Resources", "Tokenizers",
           "owner_dir", "sweep_stale_resources", "tmp_root"]
