"""The service object: model + engine loop + admission of one request (shared by every protocol)."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from atb_llm.models.cogvlm2_llama3_video.data_preprocess_cogvlm2_llama3_video import MAX_VIDEO_BYTES, MAX_VIDEO_PIXELS
from atb_llm.runner.engine import (
    DEFAULT_VISION_CACHE_MB,
    GenerationEngine,
    QueueFullError,
    Request,
    RequestError,
    VisionCache,
    video_cache_key,
)
from atb_llm.runner.offline_runner import PARunner, eos_token_ids
from service.errors import TOKEN_LIMIT, ApiError, QueueFull, ServiceStopped, TokenCountError, invalid
from service.fetch import MediaFetcher
from service.media import MediaResolver, precheck_content
from service.metrics import Metrics, SequenceTimer
from service.params import INT63_MAX, GenParams
from service.runtime import EngineLoop, Event, ResourceRegistry, Resources, Tokenizers
from service.video import RequestVideo, VideoOptions, frame_timestamps, load_chosen

logger = logging.getLogger("service")

TEXT_BYTES_PER_TOKEN = 64  # default text limit: a token is rarely more than a few bytes of UTF-8


@dataclass
class ServiceConfig:
    model_path: str
    served_model_names: list[str] = field(default_factory=lambda: ["cogvlm2_llama3_video", "cogvlm2"])
    allowed_media_dirs: list[str] = field(default_factory=lambda: ["/data/multimodal_inputs"])
    max_batch_size: int = 16
    max_prefill_tokens: int = 8192
    max_input_length: int = 2048
    max_seq_len: int = 2560
    max_iter_times: int = 512
    max_queue: int = 1000
    request_timeout: float = 600.0
    block_size: int = 128
    num_blocks: int | None = None
    dtype: str | None = None
    device: str | None = None
    max_body_mb: int = 40
    tokenizer_workers: int = 2
    max_text_bytes: int | None = None  # UTF-8 bytes of prompt text; None: TEXT_BYTES_PER_TOKEN x input limit
    max_video_pixels: int = MAX_VIDEO_PIXELS  # width x height of a decoded frame; larger videos are refused
    vision_cache_mb: int = DEFAULT_VISION_CACHE_MB  # vision features of recent videos (LRU by bytes)
    prefix_cache: bool = True  # reuse the KV blocks of earlier prompts with the same tokens and video
    allowed_media_domains: list[str] = field(default_factory=list)  # http(s) video hosts (service/fetch.py)
    allow_private_media_addresses: bool = False
    media_download_timeout: float = 30.0
    media_download_max_mb: int = MAX_VIDEO_BYTES >> 20


class GenerationTimeout(Exception):
    def __init__(self, reason: str):
        super().__init__(f"Engine callback timeout: {reason}")


def utf16_len(text: str) -> int:
    if text.isascii():
        return len(text)
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def text_pieces(value) -> list[str]:
    """The prompt text of a request: a string, the ``text`` of content items, the ``content`` (string or
    items) of chat messages. Media URLs are not text (their size is the body limit's business)."""
    if isinstance(value, str):
        return [value]
    pieces = []
    for item in value if isinstance(value, list) else ():
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("text"), str):
            pieces.append(item["text"])
        content = item.get("content")
        if isinstance(content, str):
            pieces.append(content)
        elif isinstance(content, list):
            pieces.extend(i["text"] for i in content if isinstance(i, dict) and isinstance(i.get("text"), str))
    return pieces


@dataclass
class Prompt:
    """What a request asks about, in one of three forms: ``items`` (a string, or content items: text and
    media), chat ``messages``, or prompt token ``ids`` given by the client (no tokenization)."""

    items: list | str | None = None
    messages: list | None = None
    ids: list[int] | None = None


class Prepared:
    """A prompt past the cheap checks with its media resolved (``Service.prepare``), waiting for
    ``Service.submit``. Holds the request's resources (temp directory, shared memory) and a place among the
    requests being admitted until it is submitted or released."""

    def __init__(self, service: Service, prompt: Prompt, resources: Resources):
        self.service = service
        self.prompt = prompt
        self.resources = resources
        self.resolver = MediaResolver(service.config.allowed_media_dirs, resources.tmpdir, service.fetcher)
        self.resolved: list | None = None  # plugin items, or the conversation of chat messages
        self._open = True

    def settled(self) -> None:
        """No longer counted as being admitted (submitted, or given up)."""
        if self._open:
            self._open = False
            self.service._admitting -= 1

    def release(self) -> None:
        """Give the request up before submitting it: frees what it holds."""
        if self._open:
            self.settled()
            self.resources.release()


class Handle:
    """One admitted HTTP request: its engine requests (one per sequence for n / best_of > 1), their shared
    output queue and the deadline."""

    def __init__(self, service: Service, requests: list[Request], queue: asyncio.Queue, params: GenParams,
                 deadline: float | None, timeout_reason: str, prompt_ids: list[int]):
        self.service = service
        self.requests = requests
        self.queue = queue
        self.params = params
        self.deadline = deadline
        self.timeout_reason = timeout_reason
        self.prompt_ids = prompt_ids
        self.submit_time = time.perf_counter()
        self.index = {r.request_id: i for i, r in enumerate(requests)}
        self.done = [False] * len(requests)
        self.finished = False
        self.stopped = False  # aborted by /v2/models/{m}/stopInfer: ends as a normal stop_sequence
        self.name: str | None = None  # the id /stopInfer knows this request by
        self.video_timestamps: list[float] | None = None  # start times of the video frames used, when asked
        self.timer = SequenceTimer(getattr(service, "metrics", None), self.submit_time, len(requests),
                                   len(prompt_ids))

    @property
    def request(self) -> Request:
        return self.requests[0]

    def stop(self) -> None:
        self.stopped = True
        self.abort()

    def abort(self) -> None:
        for request, done in zip(self.requests, self.done):
            if not done:
                self.service.loop.abort(request.request_id)

    async def batches(self, http_request=None) -> AsyncIterator[list[Event]]:
        """The step events of all sequences, grouped as they arrive (one engine step's outputs usually come
        together); aborts every unfinished sequence if the consumer stops early (disconnect, cancellation,
        timeout). With ``http_request``, polls for a client disconnect every 200 ms, also while events keep
        arriving (a non-streaming client that left would otherwise hold its slot until the last token)."""
        checked = time.monotonic()
        try:
            while True:
                if http_request is not None and time.monotonic() - checked >= 0.2:
                    checked = time.monotonic()
                    if await http_request.is_disconnected():
                        return
                wait = 0.2 if http_request is not None else None
                if self.deadline is not None:
                    remaining = self.deadline - time.monotonic()
                    if remaining <= 0:
                        raise GenerationTimeout(self.timeout_reason)
                    wait = remaining if wait is None else min(wait, remaining)
                try:
                    first = await asyncio.wait_for(self.queue.get(), wait) if wait else await self.queue.get()
                except asyncio.TimeoutError:
                    continue
                batch = [first]
                while not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                for event in batch:
                    event.index = self.index.get(event.output.request_id, 0)
                    self.timer.tokens(event.index, len(event.output.token_ids), event.time)
                    if event.output.finished:
                        self.done[event.index] = True
                        self.timer.finished(event.output.finish_reason, event.time)
                self.finished = all(self.done)
                yield batch
                if self.finished:
                    return
        finally:
            if not self.finished:
                self.abort()
            self.service.forget(self)

    async def events(self, http_request=None) -> AsyncIterator[Event]:
        async with contextlib.aclosing(self.batches(http_request)) as batches:
            async for batch in batches:
                for event in batch:
                    yield event


class SharedRelease:
    """Releases a request's resources (shared memory, temp dir) once all of its sequences have ended:
    every sequence reads the same shm segments at its prefill."""

    def __init__(self, resources: Resources, count: int):
        self.resources = resources
        self.count = count
        self._lock = threading.Lock()

    def done(self) -> None:
        with self._lock:
            self.count -= 1
            last = self.count == 0
        if last:
            self.resources.release()


def derive_seed(seed: int, index: int) -> int:
    """Sequence ``index``'s seed: the request's seed for the first, a fixed function of both for the others."""
    if index == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & INT63_MAX


def build_runner(config: ServiceConfig) -> tuple[PARunner, int]:
    """The model (this rank's shard under tensor parallelism) and the prompt-length limit."""
    input_limit = min(config.max_input_length, config.max_seq_len - 1)
    if input_limit < 1:
        raise ValueError("--max-seq-len must be at least 2")
    runner = PARunner(model_path=config.model_path, max_input_length=input_limit,
                      max_output_length=config.max_seq_len - input_limit, max_batch_size=config.max_batch_size,
                      max_prefill_tokens=config.max_prefill_tokens, block_size=config.block_size,
                      num_blocks=config.num_blocks, dtype=config.dtype, device=config.device)
    return runner, input_limit


def follow(config: ServiceConfig) -> None:
    """Tensor-parallel ranks other than 0: load this rank's shard and run the steps rank 0 broadcasts."""
    runner, _ = build_runner(config)
    runner.model.follow(runner.make_cache_manager().kv_cache)


class Service:
    def __init__(self, config: ServiceConfig):
        self.config = config
        self.stopping = False
        self.started = time.time()
        self._ids = itertools.count()
        self.runner, input_limit = build_runner(config)
        self.model = self.runner.model
        # Under tensor parallelism rank 0 serves HTTP and schedules; the other ranks follow its steps.
        self.model.leads_followers = self.model.world_size > 1
        self.max_seq_len = self.runner.max_seq_len
        self.engine = GenerationEngine(
            self.model, self.runner.make_cache_manager(), max_batch_size=config.max_batch_size,
            max_prefill_tokens=config.max_prefill_tokens, max_seq_len=self.max_seq_len,
            max_input_length=input_limit, eos_token_ids=eos_token_ids(self.model), max_waiting=config.max_queue,
            vision_cache=VisionCache(config.vision_cache_mb << 20), enable_prefix_cache=config.prefix_cache)
        self.max_input_length = self.engine.max_input_length
        self.vocab_size = int(self.model.config.vocab_size)
        self.pad_token_id = self.model.config.pad_token_id
        self.template = getattr(self.model.input_builder, "template", "chat")
        self.model.input_builder.max_video_pixels = config.max_video_pixels
        # A follow-up on a video whose features the engine holds is tokenized without decoding the video.
        self.model.input_builder.cached_video_frames = self._cached_video_frames
        # Per-request frame controls (service/video.py): the builder's decode, unless a request chose its frames.
        self.request_video = RequestVideo()
        self._default_load_video = self.model.input_builder.load_video
        self.model.input_builder.load_video = self._load_video
        self.loop = EngineLoop(self.engine)
        self.tokenizers = Tokenizers(self.model, workers=config.tokenizer_workers)
        self.registry = ResourceRegistry()
        self.named: dict[str, Handle] = {}  # request id -> in-flight request, for /stopInfer
        self._special_ids = set(getattr(self.model.tokenizer, "all_special_ids", []) or [])
        self.max_request_chars = config.max_body_mb * 2**20
        self.max_text_bytes = config.max_text_bytes or TEXT_BYTES_PER_TOKEN * self.max_input_length
        self._admitting = 0  # requests between the queue check and their submission (media, decoding)
        self.metrics = Metrics(lambda: self.engine)
        self.fetcher = None
        if config.allowed_media_domains:
            self.fetcher = MediaFetcher(config.allowed_media_domains, config.allow_private_media_addresses,
                                        min(config.media_download_max_mb << 20, MAX_VIDEO_BYTES),
                                        config.media_download_timeout)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        # Set the tokenizer's split-special-tokens state once, before worker threads share it.
        self.model.input_builder.encode_text("warm up")
        self.loop.start()

    def begin_shutdown(self) -> None:
        """Stop accepting and abort in-flight requests (safe to call from a signal handler)."""
        self.stopping = True
        self.loop.abort_all()

    def begin_drain(self) -> None:
        """Stop accepting (health probes and new requests answer 503); in-flight requests keep running."""
        self.stopping = True

    @property
    def in_flight(self) -> int:
        """Requests being admitted or in the engine (not yet finished)."""
        return self._admitting + self.loop.num_active

    def drain(self, timeout: float, poll: float = 0.02) -> bool:
        """Stop accepting, let in-flight requests finish for up to ``timeout`` seconds, then abort the rest.
        Blocking (call it from a thread); True if nothing had to be aborted."""
        self.begin_drain()
        deadline = time.monotonic() + max(0.0, timeout)
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(poll)
        finished = not self.in_flight
        self.begin_shutdown()
        return finished

    def shutdown(self) -> None:
        self.begin_shutdown()
        self.tokenizers.shutdown()
        self.loop.abort_all()
        self.loop.stop()
        self.registry.release_all()
        self._release_followers()

    def _release_followers(self, timeout: float = 5.0) -> None:
        """Let tensor-parallel followers exit; a dead follower must not hang the shutdown."""
        if not self.model.leads_followers:
            return
        releaser = threading.Thread(target=self.model.release_followers, name="release-followers", daemon=True)
        releaser.start()
        releaser.join(timeout)
        if releaser.is_alive():
            logger.warning("tensor-parallel followers did not acknowledge the shutdown")

    def _cached_video_frames(self, path: str) -> int | None:
        return self.engine.vision_cache.frames(self.video_key(path, self.request_video.options))

    def video_key(self, path: str, options: VideoOptions | None) -> str:
        """The video's identity in the vision and prefix caches: its content, the frame rule, the controls."""
        return video_cache_key(path, self.template) + (options.key_suffix() if options is not None else "")

    def _load_video(self, path: str):
        options = self.request_video.options
        if options is None or not options.custom:
            return self._default_load_video(path)
        return load_chosen(path, options, self.config.max_video_pixels)

    def token_text(self, token_id: int, skip_special_tokens: bool = False) -> str:
        return self.model.tokenizer.decode([token_id], skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def encode_plain(self, text: str) -> list[int]:
        """A completion prompt: BOS and the text's tokens, no chat template (special-token text stays text)."""
        return [self.model.input_builder.bos_token_id, *self.model.input_builder.encode_text(text)]

    def next_request_id(self, header: str | None) -> str:
        return header if header else f"endpoint_common_{next(self._ids)}"

    def check_running(self) -> None:
        if self.stopping:
            raise ServiceStopped()

    @property
    def busy(self) -> bool:
        return bool(self.config.max_queue) and self.engine.num_waiting >= self.config.max_queue

    def resources(self) -> dict:
        blocks = self.engine.blocks
        released = list(self.registry.released_segments)
        return {"kv_blocks_free": blocks.num_free, "kv_blocks_total": blocks.num_blocks,
                "kv_blocks_all_free": blocks.all_free, "requests_waiting": self.engine.num_waiting,
                "requests_running": self.engine.num_running, "requests_active": self.loop.num_active,
                "request_resources_active": len(self.registry.active()),
                "active_shm_segments": self.registry.active_segments(),
                "released_shm_segments": released[-256:], "engine_steps": self.loop.steps,
                **self.engine.cache_stats()}

    # -- admission ------------------------------------------------------------------------------
    def check_items(self, items: list, empty_message: str, chars_message: str) -> None:
        if not items:
            raise invalid(empty_message)
        precheck_content(items)
        self.check_chars(json.dumps(items, ensure_ascii=False, separators=(",", ":")), chars_message)

    def check_text(self, value) -> None:
        """The text-size limit, before anything is tokenized (tokenizing tens of MB takes seconds and GBs)."""
        limit, total = self.max_text_bytes, 0
        for piece in text_pieces(value):
            # At least one byte per character: a piece longer than the limit in characters is not encoded.
            total += len(piece) if len(piece) > limit or piece.isascii() else len(piece.encode("utf-8",
                                                                                               "surrogatepass"))
            if total > limit:
                raise invalid(f"The input text is longer than {limit} bytes (UTF-8), the limit of this server "
                              f"(--max-text-bytes; by default {TEXT_BYTES_PER_TOKEN} bytes per token of the "
                              f"{self.max_input_length}-token input limit)")

    def check_queue(self) -> None:
        """503 at once when the waiting queue is full, so an overloaded server refuses before it resolves or
        decodes any media. Requests still being prepared count as waiting beyond the free batch slots."""
        limit = self.config.max_queue
        if not limit:
            return
        waiting = self.engine.num_waiting
        free = max(0, self.config.max_batch_size - self.engine.num_running - waiting)
        waiting += max(0, self._admitting - free)
        if waiting >= limit:
            raise QueueFull(f"The waiting queue is full ({waiting} requests waiting or being prepared, the "
                            f"limit is {limit}); retry later")

    def check_chars(self, text: str, message: str) -> None:
        n = utf16_len(text)
        if not 0 < n <= self.max_request_chars:
            raise invalid(message.format(limit=self.max_request_chars, got=n))

    async def prepare(self, prompt: Prompt) -> Prepared:
        """The request's cheap checks and media, before its parameters are parsed (the spec's order).

        First a stopping service (503), the text-size limit and a full queue (503), before any media is
        resolved or decoded; then the media items become plugin items (local paths checked, inline videos
        written to the request's temp directory). The caller parses its protocol's parameters, then calls
        :meth:`submit` with the result, or :meth:`Prepared.release` if it gives up.
        """
        self.check_running()
        if prompt.ids is None:
            self.check_text(prompt.messages if prompt.messages is not None else prompt.items)
        self.check_queue()
        prepared = Prepared(self, prompt, Resources(self.registry))
        self._admitting += 1
        try:
            resolver = prepared.resolver
            if prompt.messages is not None:
                prepared.resolved = await self.tokenizers.run(self._resolve_messages, resolver, prompt.messages)
            elif isinstance(prompt.items, str):
                prepared.resolved = [{"text": prompt.items}]
            elif prompt.items is not None:
                prepared.resolved = await self.tokenizers.run(resolver.resolve, prompt.items)
        except BaseException:
            prepared.release()
            raise
        return prepared

    async def submit(self, prepared: Prepared, params: GenParams, client_timeout: bool = False) -> Handle:
        """Tokenization, limits and enqueue of a prepared prompt. For n / best_of > 1 the prompt is tokenized
        (and its video decoded) once and one engine request per sequence is submitted; the resources are
        released when the last sequence ends. Everything the request holds is released on any error.
        Raises ``TokenCountError`` when the prompt cannot be tokenized or has no / too many tokens (each
        protocol words it), ``ApiError`` otherwise."""
        try:
            return await self._submit(prepared, params, client_timeout)
        finally:
            prepared.settled()

    async def _submit(self, prepared: Prepared, params: GenParams, client_timeout: bool) -> Handle:
        resources, resolver, prompt = prepared.resources, prepared.resolver, prepared.prompt
        ids = prompt.ids
        timestamps = None
        owned = True
        try:
            features = None
            if ids is not None:
                self._check_ids(ids)
            else:
                is_chat = prompt.messages is not None
                shm_path = resources.shm_path
                options = params.video
                if options is not None and options.custom and not resolver.videos:
                    raise invalid("num_frames and fps choose the frames of a video; this request has no video")
                try:
                    ids = await self._tokenize(prepared.resolved, is_chat, shm_path, resources, resolver,
                                               use_video_cache=True, options=options)
                    features = self._cached_features(ids, resolver, options)
                    if features is False:  # laid out from the vision cache, evicted since: decode after all
                        ids = await self._tokenize(prepared.resolved, is_chat, shm_path, resources, resolver,
                                                   use_video_cache=False, options=options)
                        features = None
                    if options is not None and options.return_timestamps:
                        timestamps = []
                        if resolver.videos:
                            timestamps = await self.tokenizers.run(
                                frame_timestamps, resolver.videos[0], self.template, options,
                                self.config.max_video_pixels)
                except asyncio.CancelledError:
                    owned = False  # released once the tokenizer thread is done with it
                    raise
            self.check_running()
            base = self._build_request(ids, params, resources, resolver)
            base.vision_embeds = features
            requests = self._fan_out(base, params.num_seqs, SharedRelease(resources, params.num_seqs))
            queue: asyncio.Queue = asyncio.Queue()
            submitted = 0
            try:
                for request in requests:
                    self.loop.submit(request, queue)
                    submitted += 1
            except QueueFullError as error:
                raise QueueFull(f"The waiting queue is full: {error}; retry later") from None
            except RequestError as error:
                raise ApiError(424, f"Failed to enqueue inferRequest. {error}") from None
            except ValueError as error:
                raise invalid(str(error)) from None
            except RuntimeError:
                raise ServiceStopped() from None
            finally:
                if submitted < len(requests):
                    owned = False  # the SharedRelease below frees everything once each sequence is accounted
                    for request in requests[:submitted]:
                        self.loop.abort(request.request_id)  # the engine releases them as they end
                    for request in requests[submitted:]:
                        request.on_release()
            owned = False  # the engine calls on_release when each sequence ends
        finally:
            if owned:
                resources.release()
        deadline, reason = None, "server e2eTimeout"
        if self.config.request_timeout and self.config.request_timeout > 0:
            deadline = time.monotonic() + self.config.request_timeout
        if client_timeout and params.timeout is not None:
            client_deadline = time.monotonic() + params.timeout
            if deadline is None or client_deadline < deadline:
                deadline, reason = client_deadline, "client timeout"
        handle = Handle(self, requests, queue, params, deadline, reason, list(base.prompt_ids))
        handle.video_timestamps = timestamps
        return handle

    async def _tokenize(self, prompt: list, is_chat: bool, shm_path: str, resources: Resources,
                        resolver: MediaResolver, use_video_cache: bool,
                        options: VideoOptions | None = None) -> list[int]:
        """The plugin's service path in a tokenizer thread (it may decode the video and write shared memory).
        If the caller is cancelled meanwhile, ``resources`` are released once the thread is done with them."""
        function = self.tokenizers._chat if is_chat else self.tokenizers._items
        future = self.tokenizers.pool.submit(self.request_video.run, options, function, prompt, shm_path,
                                             use_video_cache)
        try:
            return await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            future.add_done_callback(lambda _f: resources.release())
            raise
        except (ValueError, OSError, RuntimeError) as error:
            cause = _decode_cause(error, resolver, os.path.dirname(shm_path))
            raise TokenCountError(0, cause) from None

    def _cached_features(self, ids: list[int], resolver: MediaResolver, options: VideoOptions | None = None):
        """The vision features of a prompt the plugin laid out from the vision cache (vision slots with the pad
        id, no shared-memory codes): the tensor, None when the prompt needs none, False when the features were
        evicted since the lookup."""
        if not resolver.videos or self.pad_token_id not in ids or any(t < 0 for t in ids):
            return None
        try:
            key = self.video_key(resolver.videos[0], options)
        except OSError:
            return False
        features = self.engine.vision_cache.get(key)
        return False if features is None else features

    def _check_ids(self, ids: list[int]) -> None:
        """Client token ids: negative ids would read as shared-memory codes, large ones are out of the table."""
        if ids and any(not 0 <= t < self.vocab_size for t in ids):
            raise ApiError(424, "Failed to enqueue inferRequest. Invalid Input Ids")

    def _fan_out(self, base: Request, count: int, release: SharedRelease) -> list[Request]:
        requests = []
        for i in range(count):
            sampling = dataclasses.replace(base.sampling, seed=derive_seed(base.sampling.seed, i),
                                           stop=list(base.sampling.stop),
                                           stop_token_ids=list(base.sampling.stop_token_ids))
            requests.append(Request(prompt_ids=list(base.prompt_ids), sampling=sampling, video_key=base.video_key,
                                    vision_embeds=base.vision_embeds, request_id=self.loop.new_id(),
                                    on_release=release.done))
        return requests

    # -- /stopInfer ------------------------------------------------------------------------------
    def track(self, name: str, handle: Handle) -> None:
        handle.name = name
        if not handle.finished:
            self.named[name] = handle

    def forget(self, handle: Handle) -> None:
        if handle.name is not None and self.named.get(handle.name) is handle:
            del self.named[handle.name]

    def stop_request(self, name: str) -> bool:
        handle = self.named.get(name)
        if handle is None or handle.finished:
            return False
        handle.stop()
        return True

    def _resolve_messages(self, resolver: MediaResolver, messages: list) -> list[dict]:
        conversation = []
        for message in messages:
            content = message.get("content")
            if isinstance(content, list):
                content = resolver.resolve(content)
            conversation.append({"role": message["role"], "content": "" if content is None else content})
        return conversation

    def _build_request(self, ids: list[int], params: GenParams, resources: Resources,
                       resolver: MediaResolver) -> Request:
        n = len(ids)
        if not 0 < n <= TOKEN_LIMIT:
            raise TokenCountError(n)
        if params.truncate is not None and params.truncate < n:
            cut = n - params.truncate
            vision = [i for i, t in enumerate(ids) if t < 0 or t == self.pad_token_id]
            if vision and vision[0] < cut:
                raise invalid(f"Parameter truncate={params.truncate} would cut into the video's vision tokens: the "
                              f"prompt has {n} tokens and the video starts at token {vision[0]}; use truncate >= "
                              f"{n - vision[0]} or leave it unset")
            ids = ids[cut:]
            n = len(ids)
        if n > self.max_input_length:
            raise ApiError(424, "Failed to enqueue inferRequest. This model's maximum input ids length cannot be "
                                f"greater than {self.max_input_length},the input ids length is {n}")
        requested = params.max_tokens if params.max_tokens is not None else params.default_max_tokens
        max_new = max(1, min(requested, self.config.max_iter_times, self.max_seq_len - n))
        try:
            sampling = params.sampling(max_new, self.vocab_size)
        except ValueError as error:
            raise invalid(str(error)) from None
        key = None
        if len(set(resolver.videos)) == 1:
            with contextlib.suppress(OSError):
                key = self.video_key(resolver.videos[0], params.video)
        return Request(prompt_ids=list(ids), sampling=sampling, video_key=key)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _decode_cause(error: BaseException, resolver: MediaResolver, tmpdir: str) -> str:
    """What the client reads about a prompt that could not be tokenized: the first line of a ValueError
    (the video checks' own words) with every server path replaced by the client's name for it ("the
    inline video" for a data: URL); nothing of an OSError / RuntimeError (library or system text), which
    goes to the log."""
    if isinstance(error, ValueError) and _first_line(error):
        return resolver.redact(_first_line(error), {tmpdir: "(the request's temporary directory)"})
    logger.warning(f"tokenizing a request failed: {type(error).__name__}: {error}")
    return "the video could not be read or decoded" if resolver.videos else "the input could not be tokenized"


def default_num_blocks(max_seq_len: int, block_size: int, max_batch_size: int) -> int:
    return math.ceil(max_seq_len / block_size) * max_batch_size


def demo_media_dir(video_path: str) -> str:
    return os.path.dirname(os.path.realpath(video_path))
