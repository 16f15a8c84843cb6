"""The service's runtime: model, one engine thread, per-request resources, tokenization workers.

Threads:
- the asyncio event loop (HTTP);
- a small pool of tokenizer workers (video decoding + writing the pixels to shared memory is slow);
- one engine thread that loops ``engine.step()`` while there is work and sleeps on a condition otherwise,
  handing each ``StepOutput`` to its request's asyncio queue with ``loop.call_soon_threadsafe``.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from atb_llm.runner.engine import GenerationEngine, QueueFullError, Request, RequestError, StepOutput
from atb_llm.utils.shm_utils import release_shared_memory

logger = logging.getLogger("service")


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
                self._dir = tempfile.mkdtemp(prefix="cogvlm2-svc-")
            return self._dir

    @property
    def shm_path(self) -> str:
        return os.path.join(self.tmpdir(), "shm_name.txt")

    def segments(self) -> list[str]:
        if self._dir is None:
            return []
        try:
            with open(os.path.join(self._dir, "shm_name.txt"), encoding="utf-8") as file:
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
                path = os.path.join(directory, "shm_name.txt")
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

    def _items(self, items: list[dict], shm_path: str) -> list[int]:
        return [int(i) for i in self.model.router.tokenize(items, shm_name_save_path=shm_path).tolist()]

    def _chat(self, messages: list[dict], shm_path: str) -> list[int]:
        return [int(i) for i in self.model.input_builder.make_context(0, messages, shm_name_save_path=shm_path)]

    async def tokenize_items(self, items: list[dict], shm_path: str) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._items, items, shm_path)

    async def tokenize_chat(self, messages: list[dict], shm_path: str) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._chat, messages, shm_path)

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["EngineLoop", "Event", "QueueFullError", "RequestError", "ResourceRegistry", "Resources", "Tokenizers"]
