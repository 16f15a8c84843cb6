"""Continuous-batching generation over the paged KV cache, with a prefix cache and chunked prefill.

One thread calls ``step()``; other threads may ``add_request`` and ``abort`` at any time. A request is admitted
when a batch slot and its KV blocks are free: it reserves the blocks for its prompt and its whole output budget,
so a running request never waits for memory. Its prompt's leading full blocks are taken from the prefix cache
when an earlier sequence computed the same tokens with the same video (block hashes chain the token ids and
the video's content hash). Each step then runs one forward: every generating sequence decodes a token, and
the prompts still being prefilled advance by up to ``max_prefill_tokens`` tokens together (chunked prefill),
attending over what their sequence already has in the cache. A step with no prompt work is a plain decode;
one with only whole prompts and nothing cached is a plain prefill.
"""
import collections
import hashlib
import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from atb_llm.runner.cache import CacheManager, copy_kv_blocks
from atb_llm.runner.detokenizer import IncrementalDetokenizer
from atb_llm.runner.sampler import Sampler, SamplingParams, SequenceTokens, make_generator
from atb_llm.utils.log import logger

_IDENTITY_MEMO: "collections.OrderedDict[tuple, str]" = collections.OrderedDict()
_IDENTITY_LOCK = threading.Lock()
_IDENTITY_MEMO_SIZE = 1024


def video_cache_key(path: str, template: str) -> str:
    """Identity of a decoded video for the vision-feature and prefix caches: the SHA-256 of the file's bytes
    plus the frame rule, so two files with the same content share and two contents never do. The digest is
    memoised by the file's (real path, device, inode, size, mtime, ctime): a follow-up on an unchanged file
    costs one ``stat``, and any write to the file changes its mtime and ctime."""
    info = os.stat(path)
    signature = (os.path.realpath(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    with _IDENTITY_LOCK:
        digest = _IDENTITY_MEMO.get(signature)
        if digest is not None:
            _IDENTITY_MEMO.move_to_end(signature)
    if digest is None:
        hasher = hashlib.sha256()
        with open(path, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                hasher.update(chunk)
        digest = hasher.hexdigest()
        with _IDENTITY_LOCK:
            _IDENTITY_MEMO[signature] = digest
            while len(_IDENTITY_MEMO) > _IDENTITY_MEMO_SIZE:
                _IDENTITY_MEMO.popitem(last=False)
    return f"sha256:{digest}:{template}"


class VisionCache:
    """Tensors by video identity (vision features, or decoded frames), least recently used first out, bounded
    by the bytes of the tensors it holds. Thread-safe: tokenizer threads look up while the engine inserts."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._entries: collections.OrderedDict[str, tuple[torch.Tensor, int]] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _size(tensor: torch.Tensor) -> int:
        return tensor.numel() * tensor.element_size()

    def get(self, key: str | None) -> torch.Tensor | None:
        if key is None:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def frames(self, key: str | None) -> int | None:
        """How many frames the cached video has (None when it is not cached); counts as a use."""
        if key is None:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, key: str, tensor: torch.Tensor, frames: int) -> None:
        size = self._size(tensor)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= self._size(old[0])
            if size > self.max_bytes:
                return  # larger than the whole budget: not kept
            self._entries[key] = (tensor, int(frames))
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (evicted, _) = self._entries.popitem(last=False)
                self._bytes -= self._size(evicted)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self._bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses}


DEFAULT_VISION_CACHE_MB = 512


class RequestError(ValueError):
    """A request that cannot be served as given (the message says why)."""


class QueueFullError(RuntimeError):
    pass


@dataclass
class Request:
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    position_ids: np.ndarray | None = None
    pixel_values: torch.Tensor | None = None  # [T, 3, 224, 224] frames for the vision slots
    vision_embeds: torch.Tensor | None = None  # or their features, already computed
    video_key: str | None = None  # content identity of the video, for the vision-feature and prefix caches
    request_id: str = ""
    on_release: Callable[[], None] | None = None  # called once when the request ends (e.g. shm cleanup)

    # Runtime state, owned by the engine.
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)  # filled when sampling.logprobs is set
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    blocks: list[int] = field(default_factory=list)
    max_new_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    prompt_hashes: list[bytes] | None = field(default=None, repr=False)  # its full blocks' prefix-cache hashes
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def has_video(self) -> bool:
        return (self.pixel_values is not None or self.vision_embeds is not None
                or (bool(self.prompt_ids) and min(self.prompt_ids) < 0))


@dataclass
class StepOutput:
    request_id: str
    token_ids: list[int]
    text: str  # newly releasable text
    finished: bool
    finish_reason: str | None = None
    error: str | None = None
    # With SamplingParams.logprobs: per token, its logprob and the top (token id, logprob) pairs.
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


class _Running:
    """A request's state from admission to its end: prefilling (``started`` False) then generating."""

    def __init__(self, request: Request, detokenizer: IncrementalDetokenizer, generator):
        self.request = request
        self.detokenizer = detokenizer
        self.generator = generator
        # Service path: vision slots may hold negative shm codes, which are not vocabulary ids to penalise.
        self.tokens = SequenceTokens([t for t in request.prompt_ids if t >= 0])
        self.prompt_len = len(request.prompt_ids)
        self.kv_len = 0  # tokens whose K/V are cached
        self.next_position = 0  # CogVLM position of the next token (not its index)
        self.started = False  # the whole prompt is in the cache and tokens are being sampled
        self.siblings: list[_Running] = []  # identical prompts waiting for this one's prefill
        self.hit_blocks = 0  # leading blocks taken from the prefix cache
        # Vision: slots before each prompt index and where the slots are; the features (complete, or being
        # computed a few tower layers per step: ``vision_job``) and how many frames they cover.
        self.vision_before: np.ndarray | None = None
        self.slot_positions: np.ndarray | None = None
        self.features: torch.Tensor | None = None
        self.vision_complete = False
        self.encoded_frames = 0
        self.vision_job = None
        # Prefix cache: the hash chain's seed (None: this sequence is not cached), block hashes, and how many
        # leading blocks are registered.
        self.hash_seed: bytes | None = None
        self.hash_tokens: list[int] = []
        self.hashes: list[bytes] = []
        self.registered = 0


class GenerationEngine:
    def __init__(self, runner, cache: CacheManager, max_batch_size: int, max_prefill_tokens: int,
                 max_seq_len: int, eos_token_ids: Sequence[int] = (), max_input_length: int = 0,
                 max_waiting: int = 0, vision_cache: VisionCache | None = None, enable_prefix_cache: bool = True):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.runner = runner
        self.cache = cache
        self.blocks = cache.block_manager
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens  # prompt tokens per step; <= 0: whole prompts
        self.max_seq_len = max_seq_len
        self.max_input_length = min(max_input_length or max_seq_len - 1, max_seq_len - 1)
        self.eos_token_ids = set(eos_token_ids)
        self.max_waiting = max_waiting
        self.sampler = Sampler()
        self.device = runner.device
        self._waiting: collections.deque = collections.deque()
        self._running: list[_Running] = []
        self._aborted: set = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        # Shared with whoever prepares requests (the runner, the service) so a follow-up skips decoding too.
        self.vision_cache = vision_cache if vision_cache is not None else VisionCache(DEFAULT_VISION_CACHE_MB << 20)
        self.enable_prefix_cache = enable_prefix_cache
        # Prefix cache use, in prompt tokens: looked up (every admitted prompt) and found cached.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.prefill_tokens = 0  # prompt tokens computed
        self.steps = 0
        self.last_step: dict = {}  # what the last step ran: prompt tokens, decodes, sequences prefilled
        # Observer of each step's logits (request ids, [B, vocab]): for debugging and logit dumps.
        self.on_logits: Callable[[list[str], torch.Tensor], None] | None = None
        # Under tensor parallelism either every rank runs this engine in lockstep (offline, torchrun), or
        # rank 0 alone does and the others follow its steps (ModelRunner.leads_followers, the service).
        self.lockstep_ranks = (torch.distributed.is_available() and torch.distributed.is_initialized()
                               and torch.distributed.get_world_size() > 1
                               and not getattr(runner, "leads_followers", False))

    # -- admission ---------------------------------------------------------------------------
    def _vision_mask(self, ids: Sequence[int]) -> np.ndarray:
        """Which prompt tokens are vision slots (the model's rule; negative shm codes always are)."""
        mask_of = getattr(getattr(self.runner, "model", None), "vision_slot_mask", None)
        tensor = torch.as_tensor(list(ids), dtype=torch.int64)
        mask = mask_of(tensor) if mask_of is not None else tensor < 0
        return mask.cpu().numpy().astype(bool)

    def check_request(self, request: Request) -> None:
        """Raise RequestError when the request can never run here."""
        prompt_len = len(request.prompt_ids)
        if prompt_len == 0:
            raise RequestError("the prompt is empty")
        if prompt_len > self.max_input_length:
            raise RequestError(f"the prompt has {prompt_len} tokens, more than the maximum input length "
                               f"{self.max_input_length}")
        vocab = getattr(getattr(self.runner, "config", None), "vocab_size", None)
        top = max(request.prompt_ids)
        if isinstance(vocab, int) and top >= vocab:
            raise RequestError(f"token id {top} is outside the vocabulary [0, {vocab})")
        slots = int(self._vision_mask(request.prompt_ids).sum())
        if request.has_video and not slots:
            raise RequestError("the request has a video but its prompt has no vision slots")
        if slots and not request.has_video:
            raise RequestError(f"the prompt has {slots} vision slots but no video")
        if request.vision_embeds is not None and request.vision_embeds.shape[0] != slots:
            raise RequestError(f"{request.vision_embeds.shape[0]} vision features for {slots} vision slots")
        request.sampling.validate()
        max_new = min(request.sampling.max_new_tokens, self.max_seq_len - prompt_len)
        if self.blocks.blocks_for(prompt_len + max_new) > self.blocks.num_blocks:
            raise RequestError(f"the request needs {self.blocks.blocks_for(prompt_len + max_new)} KV blocks; "
                               f"the cache has {self.blocks.num_blocks}")

    def add_request(self, request: Request) -> str:
        self.check_request(request)
        with self._lock:
            if self.max_waiting and len(self._waiting) >= self.max_waiting:
                raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests)")
            if not request.request_id:
                request.request_id = f"req-{next(self._ids)}"
            request.max_new_tokens = min(request.sampling.max_new_tokens, self.max_seq_len - len(request.prompt_ids))
            self._waiting.append(request)
        return request.request_id

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborted.add(request_id)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running or self._aborted)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running) + sum(len(s.siblings) for s in self._running)

    def cache_stats(self) -> dict:
        """Prefix and vision cache use since this engine started (tokens for the prefix cache)."""
        queries, hits = self.prefix_cache_queries, self.prefix_cache_hits
        return {"prefix_cache": {"enabled": self.enable_prefix_cache, "queries": queries, "hits": hits,
                                 "hit_rate": hits / queries if queries else 0.0,
                                 "cached_blocks": self.blocks.num_cached, "evictions": self.blocks.evictions},
                "prefill_tokens": self.prefill_tokens, "vision_cache": self.vision_cache.stats()}

    # -- one step ----------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        outputs = self._apply_aborts()
        self._admit()
        decodes = [s for s in self._running if s.started]
        chunks, failed = self._plan()
        outputs += failed
        self.steps += 1
        if chunks:
            outputs += self._forward_step(decodes, chunks)
        elif decodes:
            self.last_step = {"prompt_tokens": 0, "decodes": len(decodes), "prefilling": 0}
            outputs += self._decode(decodes)
        return outputs

    def _apply_aborts(self) -> list[StepOutput]:
        with self._lock:
            aborted, self._aborted = self._aborted, set()
            waiting = [r for r in self._waiting if r.request_id in aborted]
            for request in waiting:
                self._waiting.remove(request)
        outputs = [self._finish_request(request, "abort") for request in waiting]
        if not aborted:
            return outputs
        for state in list(self._running):
            for sibling in [s for s in state.siblings if s.request.request_id in aborted]:
                state.siblings.remove(sibling)
                outputs.append(self._finish_state(sibling, "abort"))
            if state.request.request_id not in aborted:
                continue
            position = self._running.index(state)
            self._running.remove(state)
            if state.siblings:  # the next identical prompt takes over the prefill
                heir, heir.siblings = state.siblings[0], state.siblings[1:]
                state.siblings = []
                self._running.insert(position, heir)
            outputs.append(self._finish_state(state, "abort"))
        return outputs

    def _admit(self) -> None:
        with self._lock:
            while self._waiting and self.num_running < self.max_batch_size:
                request = self._waiting[0]
                if not self._try_admit(request):
                    break  # first come, first served: later requests wait too
                self._waiting.popleft()

    def _try_admit(self, request: Request) -> bool:
        prompt_len = len(request.prompt_ids)
        total = self.blocks.blocks_for(prompt_len + request.max_new_tokens)
        leader = self._leader_for(request)
        if leader is not None:
            hits = leader.request.blocks[:leader.hit_blocks]
        else:
            hits = self.blocks.cached_prefix(self._prompt_hashes(request)[:(prompt_len - 1) // self.blocks.block_size])
        if total - len(hits) + self.blocks.num_unused(hits) > self.blocks.num_free:
            return False
        self.blocks.acquire(hits)
        request.blocks = list(hits) + self.blocks.allocate_blocks(total - len(hits))
        state = self._new_state(request)
        state.hit_blocks = state.registered = len(hits)
        state.kv_len = request.cached_tokens = len(hits) * self.blocks.block_size
        self.prefix_cache_queries += prompt_len
        self.prefix_cache_hits += state.kv_len
        if leader is not None:
            leader.siblings.append(state)
        else:
            self._running.append(state)
        return True

    def _leader_for(self, request: Request) -> _Running | None:
        """A prompt being prefilled whose K/V this request can copy (e.g. the n sequences of one request)."""
        identity = self._prompt_identity(request)
        for state in self._running:
            if not state.started and self._prompt_identity(state.request) == identity:
                return state
        return None

    @staticmethod
    def _prompt_identity(request: Request) -> tuple:
        """Requests with the same identity have the same prompt KV (e.g. the n sequences of one request)."""
        video = request.video_key
        if video is None:
            tensor = request.vision_embeds if request.vision_embeds is not None else request.pixel_values
            video = None if tensor is None else id(tensor)
        return tuple(request.prompt_ids), video

    def _new_state(self, request: Request) -> _Running:
        sampling = request.sampling
        state = _Running(request, IncrementalDetokenizer(
            self.runner.tokenizer, list(request.prompt_ids), skip_special_tokens=sampling.skip_special_tokens,
            stop=sampling.stop, include_stop_str_in_output=sampling.include_stop_str_in_output),
            make_generator(sampling.seed))
        seed, hash_tokens = self._hash_basis(request)
        state.hash_seed, state.hash_tokens = seed, hash_tokens
        state.hashes = list(request.prompt_hashes or [])
        if request.has_video:
            mask = self._vision_mask(request.prompt_ids)
            state.vision_before = np.concatenate([[0], np.cumsum(mask)])
            state.slot_positions = np.flatnonzero(mask)
        if request.position_ids is None:
            request.position_ids = np.asarray(self.runner.generate_position_ids(np.asarray(request.prompt_ids)),
                                              dtype=np.int64)
        return state

    # -- prefix cache ------------------------------------------------------------------------
    def _hash_basis(self, request: Request) -> tuple[bytes | None, list[int]]:
        """The seed of a request's block-hash chain and its prompt tokens as hashed (vision slots as -1: the
        video's content hash in the seed tells videos apart). No seed: the request is not cached (prefix cache
        off, a video without a content key, or position ids given by the caller)."""
        if not self.enable_prefix_cache or request.position_ids is not None:
            return None, []
        if request.has_video:
            if request.video_key is None:
                return None, []
            seed = b"video:" + request.video_key.encode()
            mask = self._vision_mask(request.prompt_ids)
            tokens = [-1 if vision else int(t) for t, vision in zip(request.prompt_ids, mask)]
        else:
            seed, tokens = b"text", [int(t) for t in request.prompt_ids]
        return seed, tokens

    def _chain(self, seed: bytes, tokens: Sequence[int], hashes: list[bytes], full_blocks: int) -> list[bytes]:
        """Extend ``hashes`` to the first ``full_blocks`` blocks of ``tokens``."""
        bs = self.blocks.block_size
        previous = hashes[-1] if hashes else hashlib.sha256(seed).digest()
        for i in range(len(hashes), full_blocks):
            block = np.asarray(tokens[i * bs:(i + 1) * bs], dtype=np.int64).tobytes()
            previous = hashlib.sha256(previous + block).digest()
            hashes.append(previous)
        return hashes

    def _prompt_hashes(self, request: Request) -> list[bytes]:
        """Hashes of the prompt's full blocks (kept on the request while it waits for admission)."""
        if request.prompt_hashes is None:
            seed, tokens = self._hash_basis(request)
            full = len(tokens) // self.blocks.block_size
            request.prompt_hashes = [] if seed is None else self._chain(seed, tokens, [], full)
        return request.prompt_hashes

    def _register_blocks(self, state: _Running) -> None:
        """Offer the sequence's computed full blocks to the prefix cache."""
        if state.hash_seed is None:
            return
        full = state.kv_len // self.blocks.block_size
        if full <= state.registered:
            return
        tokens = state.hash_tokens
        if full * self.blocks.block_size > len(tokens):
            tokens = tokens + list(state.request.output_ids)
        self._chain(state.hash_seed, tokens, state.hashes, full)
        blocks = state.request.blocks
        for i in range(state.registered, full):
            self.blocks.register(blocks[i], state.hashes[i])
        state.registered = full

    # -- scheduling --------------------------------------------------------------------------
    def _plan(self) -> tuple[list[tuple[_Running, int, int, torch.Tensor | None]], list[StepOutput]]:
        """This step's prompt work, first come first served within ``max_prefill_tokens`` prompt tokens, the
        vision tower's work counted in the same tokens (``vision_layer_cost``): the chunks (state, start, end,
        their vision features), and the outputs of requests whose video failed (only those fail)."""
        budget = self.max_prefill_tokens if self.max_prefill_tokens > 0 else math.inf
        chunks, failed = [], []
        for state in list(self._running):
            if state.started:
                continue
            if budget <= 0:
                break
            want = int(min(state.prompt_len, state.kv_len + budget))
            try:
                end = min(want, self._ready_end(state))
                budget -= end - state.kv_len
                if end < want and budget > 0:  # the chunk waits for frames: run the tower with what is left
                    while self._ready_end(state) < want and budget > 0:
                        budget -= self._advance_vision(state, budget)
                    grown = int(min(want, self._ready_end(state), end + max(budget, 0)))
                    budget -= grown - end
                    end = grown
                features = self._chunk_features(state, state.kv_len, end) if end > state.kv_len else None
            except Exception as error:
                self._running.remove(state)
                failed += self._fail_with_siblings(state, f"video: {error}")
                continue
            if end > state.kv_len:
                chunks.append((state, state.kv_len, int(end), features))
        return chunks, failed

    def _vision_source(self, state: _Running) -> None:
        """On first need: the request's complete features (given, or cached), else its frames."""
        if state.features is not None or state.vision_complete:
            return
        request = state.request
        complete = request.vision_embeds if request.vision_embeds is not None else self.vision_cache.get(
            request.video_key)
        if complete is not None:
            state.features, state.vision_complete = complete, True
            return
        if request.pixel_values is None:
            # Service path: the frames wait in shared memory, named by codes in the vision slots.
            request.pixel_values = self.runner.model.pixels_from_ids(torch.tensor(request.prompt_ids))
        frames, slots = int(request.pixel_values.shape[0]), int(state.vision_before[-1])
        if frames < 1 or slots % frames:
            raise ValueError(f"{frames} frames cannot fill {slots} vision slots")

    def _ready_end(self, state: _Running) -> int:
        """The prompt index up to which the inputs of this sequence are ready (vision slots need features)."""
        if state.vision_before is None or state.vision_complete:
            return state.prompt_len
        self._vision_source(state)
        if state.vision_complete:
            return state.prompt_len
        slots = int(state.vision_before[-1])
        ready = state.encoded_frames * (slots // int(state.request.pixel_values.shape[0]))
        return state.prompt_len if ready >= slots else int(state.slot_positions[ready])

    def _advance_vision(self, state: _Running, budget: float) -> float:
        """Run the tower on the next frames for at most ``budget`` prompt tokens' worth (at least one layer);
        returns the tokens' worth spent. A whole video in one go when the budget allows."""
        model = self.runner.model
        pixels = state.request.pixel_values
        frames = int(pixels.shape[0])
        cost = float(getattr(model, "vision_layer_cost", 0.0) or 0.0)
        if not hasattr(model, "start_video_encoding"):  # a model without stepwise encoding: all at once
            left = frames - state.encoded_frames
            self._store_features(state, model.encode_video(pixels[state.encoded_frames:]), left)
            return 0.0
        if state.vision_job is None:
            left = frames - state.encoded_frames
            depth = max(1, len(model.vision.layers)) if hasattr(model, "vision") else 1
            count = left if budget == math.inf or not cost else int(min(left, max(1, budget // (cost * depth))))
            state.vision_job = model.start_video_encoding(pixels[state.encoded_frames:state.encoded_frames + count])
        job = state.vision_job
        layers = job.layers_left if budget == math.inf or not cost else int(
            min(job.layers_left, max(1, budget // (cost * job.frames))))
        job.advance(layers)
        spent = layers * cost * job.frames
        if not job.layers_left:
            state.vision_job = None
            self._store_features(state, job.result(), job.frames)
        return spent

    def _store_features(self, state: _Running, features: torch.Tensor, frames: int) -> None:
        request = state.request
        total, slots = int(request.pixel_values.shape[0]), int(state.vision_before[-1])
        per_frame = slots // total
        if features.shape[0] != frames * per_frame:
            raise ValueError(f"{total} frames give {features.shape[0] // frames * total} vision features for "
                             f"{slots} vision slots")
        if state.features is None:
            state.features = features.new_empty((slots, features.shape[1]))
        first = state.encoded_frames * per_frame
        state.features[first:first + features.shape[0]] = features
        state.encoded_frames += frames
        if state.encoded_frames == total:
            state.vision_complete = True
            if request.video_key is not None:
                self.vision_cache.put(request.video_key, state.features, total)

    def _chunk_features(self, state: _Running, start: int, end: int) -> torch.Tensor | None:
        if state.vision_before is None:
            return None
        first, last = int(state.vision_before[start]), int(state.vision_before[end])
        if first == last:
            return None
        self._vision_source(state)
        return state.features[first:last]

    def _forward_step(self, decodes: list[_Running], ready: list[tuple[_Running, int, int, torch.Tensor | None]]
                      ) -> list[StepOutput]:
        """One forward for the generating sequences (one token each) and this step's prompt chunks."""
        outputs = []
        bs = self.blocks.block_size
        ids, positions, slots, q_lens, lengths, features, sampled = [], [], [], [], [], [], []
        for state in decodes:
            blocks = state.request.blocks
            ids.append(state.tokens.output_ids[-1])
            positions.append(state.next_position)
            slots.append(blocks[state.kv_len // bs] * bs + state.kv_len % bs)
            q_lens.append(1)
            lengths.append(state.kv_len + 1)
            features.append(None)
            sampled.append(len(ids) - 1)
        for state, start, end, chunk_features in ready:
            request = state.request
            ids.extend(request.prompt_ids[start:end])
            positions.extend(int(p) for p in request.position_ids[start:end])
            slots.extend(request.blocks[i // bs] * bs + i % bs for i in range(start, end))
            q_lens.append(end - start)
            lengths.append(end)
            features.append(chunk_features)
            if end == state.prompt_len:
                sampled.append(len(ids) - 1)
        states = decodes + [r[0] for r in ready]
        plain = not decodes and all(start == 0 for _, start, _, _ in ready)  # nothing cached: a plain prefill
        device = self.device
        extra = {} if plain else {"q_lens": torch.tensor(q_lens, dtype=torch.int32)}
        self.last_step = {"prompt_tokens": sum(q_lens[len(decodes):]), "decodes": len(decodes),
                          "prefilling": len(ready)}
        try:
            logits = self.runner.forward(
                input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
                position_ids=torch.tensor(positions, dtype=torch.int64, device=device),
                is_prefill=True, kv_cache=self.cache.kv_cache,
                block_tables=self._block_tables([s.request for s in states], lengths),
                slots=torch.tensor(slots, dtype=torch.int64, device=device),
                input_lengths=torch.tensor(lengths, dtype=torch.int64, device=device),
                max_seq_len=max(lengths), lm_head_indices=torch.tensor(sampled or [len(ids) - 1], device=device),
                vision_embeds=features, **extra)
        except Exception as error:
            logger.error(f"forward failed: {error}")
            for state in states:
                self._running.remove(state)
            return outputs + [o for state in states for o in self._fail_with_siblings(state, str(error))]
        self.prefill_tokens += self.last_step["prompt_tokens"]
        for state in decodes:
            state.kv_len += 1
            state.next_position += 1
        to_sample, rows = list(decodes), list(range(len(decodes)))
        row = len(decodes) - 1  # the logits row of the last sampled position so far (siblings share their leader's)
        for state, _, end, _ in ready:
            state.kv_len = end
            self._register_blocks(state)
            if end < state.prompt_len:
                continue
            row += 1
            for member in [state, *state.siblings]:
                if member is not state:
                    self._copy_prompt_kv(state, member)
                    member.request.position_ids = state.request.position_ids
                    self._running.append(member)
                self._start(member)
                to_sample.append(member)
                rows.append(row)
            state.siblings = []
        if not to_sample:
            return outputs
        index = torch.tensor(rows, device=logits.device)
        return outputs + self._sample_and_update(to_sample, logits.index_select(0, index))

    def _copy_prompt_kv(self, source: _Running, target: _Running) -> None:
        """The prompt's cached K/V from ``source``'s blocks into ``target``'s (whole blocks: slots past the
        prompt are overwritten as ``target`` decodes). Blocks both share (prefix cache hits) stay as they are."""
        count = self.blocks.blocks_for(source.prompt_len)
        pairs = [(s, t) for s, t in zip(source.request.blocks[:count], target.request.blocks[:count]) if s != t]
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([t for _, t in pairs], device=self.device)
        # Through the runner when it has followers (their caches need the same copy); MindIE's has none.
        copy = getattr(self.runner, "copy_kv_blocks", None) or copy_kv_blocks
        copy(self.cache.kv_cache, src, dst)
        target.kv_len = source.kv_len

    def _start(self, state: _Running) -> None:
        """The prompt is in the KV cache: the sequence generates from now on."""
        state.started = True
        state.kv_len = state.prompt_len
        state.next_position = int(state.request.position_ids[-1]) + 1
        state.request.first_token_time = time.perf_counter()

    def _decode(self, states: list[_Running]) -> list[StepOutput]:
        bs = self.blocks.block_size
        device = self.device
        slots = [s.request.blocks[s.kv_len // bs] * bs + s.kv_len % bs for s in states]
        try:
            logits = self.runner.forward(
                input_ids=torch.tensor([s.tokens.output_ids[-1] for s in states], dtype=torch.int64, device=device),
                position_ids=torch.tensor([s.next_position for s in states], dtype=torch.int64, device=device),
                is_prefill=False, kv_cache=self.cache.kv_cache,
                block_tables=self._block_tables([s.request for s in states], [s.kv_len + 1 for s in states]),
                slots=torch.tensor(slots, dtype=torch.int64, device=device),
                input_lengths=torch.tensor([s.kv_len + 1 for s in states], dtype=torch.int64, device=device),
                max_seq_len=max(s.kv_len + 1 for s in states))
        except Exception as error:
            logger.error(f"decode failed: {error}")
            for state in states:
                self._running.remove(state)
            return [self._finish_request(s.request, "error", error=str(error)) for s in states]
        for state in states:
            state.kv_len += 1
            state.next_position += 1
        return self._sample_and_update(states, logits)

    def _block_tables(self, requests: list[Request], lengths: list[int]) -> torch.Tensor:
        """Each request's blocks that hold its first ``length`` tokens, padded with 0 (the reservation for
        tokens not generated yet stays out, so attention never reads it)."""
        used = [r.blocks[:self.blocks.blocks_for(n)] for r, n in zip(requests, lengths)]
        width = max(len(blocks) for blocks in used)
        table = [blocks + [0] * (width - len(blocks)) for blocks in used]
        return torch.tensor(table, dtype=torch.int64, device=self.device)

    def _sample_and_update(self, states: list[_Running], logits: torch.Tensor) -> list[StepOutput]:
        if self.on_logits is not None:
            self.on_logits([s.request.request_id for s in states], logits)
        tokens = self.sampler(logits, [s.request.sampling for s in states], [s.tokens for s in states],
                              [s.generator for s in states])
        if self.lockstep_ranks:  # every rank runs this engine: they must sample alike
            torch.distributed.broadcast(tokens, src=0)
        logprobs = self._logprobs(states, logits, tokens)
        tokens = tokens.tolist()
        outputs = []
        for i, (state, token) in enumerate(zip(states, tokens)):
            request = state.request
            state.tokens.append(token)
            request.output_ids.append(token)
            delta = state.detokenizer.add_token(token)
            reason = self._stop_reason(state, token)
            if reason is None:
                output = StepOutput(request.request_id, [token], delta, False)
            else:
                if reason != "stop" or not state.detokenizer.stopped:
                    delta += state.detokenizer.finish()
                request.text = state.detokenizer.text
                self._running.remove(state)
                output = self._finish_state(state, reason, token_ids=[token], delta=delta)
            if i in logprobs:
                chosen, top = logprobs[i]
                request.output_logprobs.append(chosen)
                output.logprobs, output.top_logprobs = [chosen], [top]
            outputs.append(output)
        return outputs

    @staticmethod
    def _logprobs(states: list[_Running], logits: torch.Tensor, tokens: torch.Tensor) -> dict:
        """Row -> (logprob of the sampled token, top-k (id, logprob)) under the model's distribution,
        for the rows that asked for logprobs."""
        rows = [i for i, s in enumerate(states) if s.request.sampling.logprobs is not None]
        if not rows:
            return {}
        index = torch.tensor(rows, device=logits.device)
        logp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
        chosen = logp.gather(1, tokens.to(logits.device).index_select(0, index).view(-1, 1)).squeeze(1).tolist()
        result = {}
        for j, row in enumerate(rows):
            k = states[row].request.sampling.logprobs
            top = torch.topk(logp[j], k) if k else None
            pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            result[row] = (chosen[j], pairs)
        return result

    def _stop_reason(self, state: _Running, token: int) -> str | None:
        sampling = state.request.sampling
        if state.detokenizer.stopped:
            return "stop"
        if token in sampling.stop_token_ids:
            return "stop"
        if not sampling.ignore_eos and token in self.eos_token_ids:
            return "eos"
        if len(state.request.output_ids) >= state.request.max_new_tokens:
            return "length"
        return None

    def _fail_with_siblings(self, state: _Running, error: str) -> list[StepOutput]:
        members, state.siblings = [state, *state.siblings], []
        return [self._finish_state(member, "error", error=error) for member in members]

    def _finish_state(self, state: _Running, reason: str, error: str | None = None,
                      token_ids: list[int] | None = None, delta: str = "") -> StepOutput:
        if error is None and state.request.blocks:
            self._register_blocks(state)  # what it computed stays reusable after it ends
        return self._finish_request(state.request, reason, error=error, token_ids=token_ids, delta=delta)

    def _finish_request(self, request: Request, reason: str, error: str | None = None,
                        token_ids: list[int] | None = None, delta: str = "") -> StepOutput:
        if request.blocks:
            self.blocks.free(request.blocks)
            request.blocks = []
        request.finish_reason = reason
        request.error = error
        request.finish_time = time.perf_counter()
        if request.on_release is not None:
            try:
                request.on_release()
            except Exception as release_error:
                logger.warning(f"releasing resources of {request.request_id} failed: {release_error}")
            request.on_release = None
        return StepOutput(request.request_id, token_ids or [], delta, True, reason, error)

    # -- offline use -------------------------------------------------------------------------
    def generate(self, requests: Sequence[Request]) -> list[Request]:
        """Run the given requests to completion (bad ones end with ``error`` set)."""
        for request in requests:
            try:
                self.add_request(request)
            except (RequestError, ValueError) as error:
                request.finish_reason, request.error = "error", str(error)
                if request.on_release is not None:
                    request.on_release()
        while self.has_unfinished():
            self.step()
        return list(requests)
