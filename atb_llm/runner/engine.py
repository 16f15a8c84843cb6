"""Continuous-batching generation over the paged KV cache.

One thread calls ``step()``; other threads may ``add_request`` and ``abort`` at any time. Each step either
prefills newly admitted requests (bounded by ``max_prefill_tokens``, ``max_batch_size`` and free KV
blocks) or decodes one token for every running request. A request reserves the KV blocks for its prompt
and its whole output budget at admission, so a running request never waits for memory.
"""
import collections
import hashlib
import itertools
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


def video_cache_key(path: str, template: str) -> str:
    """Identity of a decoded video for the vision-feature cache: the file's identity (path, size, mtime),
    or its content hash for inline videos written per request (``inline_*``), plus the frame rule."""
    if os.path.basename(path).startswith("inline_"):
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
        return f"sha256:{digest.hexdigest()}:{template}"
    stat = os.stat(path)
    return f"{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}:{template}"


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
    video_key: str | None = None  # content identity of the video, for the vision-feature cache
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
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


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
    """A request's per-sequence decoding state."""

    def __init__(self, request: Request, detokenizer: IncrementalDetokenizer, generator):
        self.request = request
        self.detokenizer = detokenizer
        self.generator = generator
        # Service path: vision slots may hold negative shm codes, which are not vocabulary ids to penalise.
        self.tokens = SequenceTokens([t for t in request.prompt_ids if t >= 0])
        self.kv_len = 0  # tokens whose K/V are cached
        self.next_position = 0  # CogVLM position of the next token (not its index)


class GenerationEngine:
    def __init__(self, runner, cache: CacheManager, max_batch_size: int, max_prefill_tokens: int,
                 max_seq_len: int, eos_token_ids: Sequence[int] = (), max_input_length: int = 0,
                 max_waiting: int = 0, vision_cache_size: int = 8):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.runner = runner
        self.cache = cache
        self.blocks = cache.block_manager
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
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
        self._vision_cache: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self.vision_cache_size = vision_cache_size
        # Observer of each step's logits (request ids, [B, vocab]): for debugging and logit dumps.
        self.on_logits: Callable[[list[str], torch.Tensor], None] | None = None
        # Under tensor parallelism either every rank runs this engine in lockstep (offline, torchrun), or
        # rank 0 alone does and the others follow its steps (ModelRunner.leads_followers, the service).
        self.lockstep_ranks = (torch.distributed.is_available() and torch.distributed.is_initialized()
                               and torch.distributed.get_world_size() > 1
                               and not getattr(runner, "leads_followers", False))

    # -- admission ---------------------------------------------------------------------------
    def check_request(self, request: Request) -> None:
        """Raise RequestError when the request can never run here."""
        prompt_len = len(request.prompt_ids)
        if prompt_len == 0:
            raise RequestError("the prompt is empty")
        if prompt_len > self.max_input_length:
            raise RequestError(f"the prompt has {prompt_len} tokens, more than the maximum input length "
                               f"{self.max_input_length}")
        if self.max_prefill_tokens > 0 and prompt_len > self.max_prefill_tokens:
            raise RequestError(f"the prompt has {prompt_len} tokens, more than max_prefill_tokens "
                               f"{self.max_prefill_tokens}")
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
        return len(self._running)

    # -- one step ----------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        outputs = self._apply_aborts()
        batch = self._admit()
        if batch:
            outputs += self._prefill(batch)
        elif self._running:
            outputs += self._decode()
        return outputs

    def _apply_aborts(self) -> list[StepOutput]:
        with self._lock:
            aborted, self._aborted = self._aborted, set()
            waiting = [r for r in self._waiting if r.request_id in aborted]
            for request in waiting:
                self._waiting.remove(request)
        outputs = [self._finish_request(request, "abort") for request in waiting]
        for state in [s for s in self._running if s.request.request_id in aborted]:
            self._running.remove(state)
            outputs.append(self._finish_request(state.request, "abort"))
        return outputs

    def _admit(self) -> list[Request]:
        batch, tokens = [], 0
        with self._lock:
            while self._waiting and len(self._running) + len(batch) < self.max_batch_size:
                request = self._waiting[0]
                prompt_len = len(request.prompt_ids)
                if batch and self.max_prefill_tokens > 0 and tokens + prompt_len > self.max_prefill_tokens:
                    break
                if not self.blocks.can_allocate(prompt_len + request.max_new_tokens):
                    break  # first come, first served: later requests wait too
                self._waiting.popleft()
                request.blocks = self.blocks.allocate(prompt_len + request.max_new_tokens)
                batch.append(request)
                tokens += prompt_len
        return batch

    def _vision_features(self, request: Request) -> torch.Tensor | None:
        if request.vision_embeds is not None:
            return request.vision_embeds
        from_shm = request.pixel_values is None and min(request.prompt_ids) < 0
        if request.pixel_values is None and not from_shm:
            return None
        key = request.video_key
        if key is not None and key in self._vision_cache:  # before reading the frames: they are not needed
            self._vision_cache.move_to_end(key)
            return self._vision_cache[key]
        if from_shm:
            # Service path: the frames wait in shared memory, named by codes in the vision slots.
            request.pixel_values = self.runner.model.pixels_from_ids(torch.tensor(request.prompt_ids))
        features = self.runner.model.encode_video(request.pixel_values)
        if key is not None and self.vision_cache_size > 0:
            self._vision_cache[key] = features
            while len(self._vision_cache) > self.vision_cache_size:
                self._vision_cache.popitem(last=False)
        return features

    @staticmethod
    def _prompt_identity(request: Request) -> tuple:
        """Requests with the same identity have the same prompt KV (e.g. the n sequences of one request)."""
        video = request.video_key
        if video is None:
            tensor = request.vision_embeds if request.vision_embeds is not None else request.pixel_values
            video = None if tensor is None else id(tensor)
        return tuple(request.prompt_ids), video

    def _prefill(self, batch: list[Request]) -> list[StepOutput]:
        # Identical prompts (same ids, same video) are computed once; the others copy its KV blocks and
        # sample their first token from its logits.
        leaders: dict[tuple, Request] = {}
        siblings: list[tuple[Request, Request]] = []
        for request in batch:
            leader = leaders.setdefault(self._prompt_identity(request), request)
            if leader is not request:
                siblings.append((request, leader))
        outputs, ready, features = [], [], []
        for request in leaders.values():  # vision per request, so one bad video fails only its request
            try:
                features.append(self._vision_features(request))
                ready.append(request)
            except Exception as error:
                outputs.append(self._finish_request(request, "error", error=f"video: {error}"))
        failed = {id(r) for r in leaders.values()} - {id(r) for r in ready}
        for request, leader in siblings:
            if id(leader) in failed:
                outputs.append(self._finish_request(request, "error", error=f"video: {leader.error}"))
        siblings = [(r, leader) for r, leader in siblings if id(leader) not in failed]
        if not ready:
            return outputs
        bs = self.blocks.block_size
        ids, positions, slots, lengths = [], [], [], []
        row_of: dict[int, int] = {}
        for request in ready:
            prompt = request.prompt_ids
            if request.position_ids is None:
                request.position_ids = np.asarray(self.runner.generate_position_ids(np.asarray(prompt)),
                                                  dtype=np.int64)
            row_of[id(request)] = len(lengths)
            ids.extend(prompt)
            positions.extend(int(p) for p in request.position_ids)
            slots.extend(request.blocks[i // bs] * bs + i % bs for i in range(len(prompt)))
            lengths.append(len(prompt))
        device = self.device
        try:
            logits = self.runner.forward(
                input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
                position_ids=torch.tensor(positions, dtype=torch.int64, device=device),
                is_prefill=True, kv_cache=self.cache.kv_cache, block_tables=self._block_tables(ready, lengths),
                slots=torch.tensor(slots, dtype=torch.int64, device=device),
                input_lengths=torch.tensor(lengths, dtype=torch.int64, device=device),
                max_seq_len=max(lengths), lm_head_indices=torch.tensor(np.cumsum(lengths) - 1, device=device),
                vision_embeds=features)
        except Exception as error:
            logger.error(f"prefill failed: {error}")
            everyone = ready + [r for r, _ in siblings]
            return outputs + [self._finish_request(r, "error", error=str(error)) for r in everyone]
        for request, leader in siblings:
            self._copy_prompt_kv(leader, request)
            request.position_ids = leader.position_ids
            row_of[id(request)] = row_of[id(leader)]
        started = ready + [r for r, _ in siblings]
        states = [self._start(request) for request in started]
        self._running.extend(states)
        rows = torch.tensor([row_of[id(r)] for r in started], device=logits.device)
        return outputs + self._sample_and_update(states, logits.index_select(0, rows))

    def _copy_prompt_kv(self, source: Request, target: Request) -> None:
        """The prompt's cached K/V from ``source``'s blocks into ``target``'s (whole blocks: slots past the
        prompt are overwritten as ``target`` decodes)."""
        count = self.blocks.blocks_for(len(source.prompt_ids))
        src = torch.tensor(source.blocks[:count], device=self.device)
        dst = torch.tensor(target.blocks[:count], device=self.device)
        # Through the runner when it has followers (their caches need the same copy); MindIE's has none.
        copy = getattr(self.runner, "copy_kv_blocks", None) or copy_kv_blocks
        copy(self.cache.kv_cache, src, dst)

    def _start(self, request: Request) -> _Running:
        """Decoding state of a request whose prompt is now in the KV cache."""
        sampling = request.sampling
        state = _Running(request, IncrementalDetokenizer(
            self.runner.tokenizer, list(request.prompt_ids), skip_special_tokens=sampling.skip_special_tokens,
            stop=sampling.stop, include_stop_str_in_output=sampling.include_stop_str_in_output),
            make_generator(sampling.seed))
        state.kv_len = len(request.prompt_ids)
        state.next_position = int(request.position_ids[-1]) + 1
        request.first_token_time = time.perf_counter()
        return state

    def _decode(self) -> list[StepOutput]:
        states = list(self._running)
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
            self._running.clear()
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
                output = self._finish_request(request, reason, token_ids=[token], delta=delta)
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
