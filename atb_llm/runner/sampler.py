"""Token sampling: sampling parameters, per-sequence token bookkeeping and the sampler.

Logits processing order (per row, always in float32):

1. repetition penalty (HF semantics) over the *set* of prompt + generated tokens:
   a positive logit is divided by the penalty, a non-positive one multiplied by it;
2. frequency & presence penalties (OpenAI semantics) over generated tokens only:
   ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``;
3. greedy rows: ``argmax`` (first index wins ties) and stop here;
4. temperature: ``logit / temperature``;
5. top-k: keep tokens whose logit is >= the k-th largest logit;
6. top-p (nucleus): keep the smallest set of most probable tokens whose cumulative
   probability reaches ``top_p`` (never fewer than one token);
7. typical-p: locally typical sampling with the HF ``TypicalLogitsWarper`` semantics;
8. softmax and ``torch.multinomial`` with the row's own ``torch.Generator``.

Each row is processed on its own tensor and sampled with its own generator, so the token
chosen for a row never depends on which other rows share the batch (batch invariance).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["Sampler", "SamplingParams", "SequenceTokens", "make_generator"]

_MAX_SEED = 2**63 - 1
# Candidate set size tried by top-p before resorting to a full sort of the vocabulary.
_TOP_P_CANDIDATES = 1024


def _invalid(message: str) -> ValueError:
    # validate() reports wrong types as ValueError too, so callers (the HTTP layer) map
    # every bad parameter to one error kind.
    return ValueError(message)


def _is_int(value: object) -> bool:
    # bool is a subclass of int, but True/False as a count or seed is almost surely a bug.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """Per-request decoding parameters (names follow the MindIE / OpenAI conventions)."""

    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 => greedy
    top_k: int = 0  # 0 or -1 => off
    top_p: float = 1.0  # 1.0 => off
    typical_p: float = 1.0  # 1.0 => off
    repetition_penalty: float = 1.0  # HF semantics over prompt + generated tokens
    presence_penalty: float = 0.0  # OpenAI semantics over generated tokens
    frequency_penalty: float = 0.0  # OpenAI semantics over generated tokens
    do_sample: bool = True  # False => greedy
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None => none; k >= 0 => the chosen token's logprob and the top k

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field if any value is out of range."""
        if not _is_int(self.max_new_tokens):
            raise ValueError(
                f"max_new_tokens must be an int, got {self.max_new_tokens!r}"
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

        self._check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")

        if not _is_int(self.top_k):
            raise ValueError(f"top_k must be an int, got {self.top_k!r}")
        if self.top_k < -1:
            raise ValueError(
                f"top_k must be >= -1 (0 or -1 disables it), got {self.top_k}"
            )

        for name in ("top_p", "typical_p"):
            value = getattr(self, name)
            self._check_float(name, value)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")

        self._check_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}"
            )

        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            self._check_float(name, value)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")

        for name in (
            "do_sample",
            "ignore_eos",
            "skip_special_tokens",
            "include_stop_str_in_output",
        ):
            if not isinstance(getattr(self, name), bool):
                raise _invalid(f"{name} must be a bool, got {getattr(self, name)!r}")

        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            raise ValueError(f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")

        if self.seed is not None:
            if not _is_int(self.seed):
                raise ValueError(f"seed must be an int or None, got {self.seed!r}")
            if not 0 <= self.seed <= _MAX_SEED:
                raise ValueError(f"seed must be in [0, 2**63-1], got {self.seed}")

        if not isinstance(self.stop, (list, tuple)):
            raise _invalid(
                f"stop must be a list of strings, got {type(self.stop).__name__}"
            )
        for s in self.stop:
            if not isinstance(s, str):
                raise _invalid(f"stop must contain only strings, got {s!r}")
            if not s:
                raise ValueError("stop must not contain empty strings")

        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise _invalid(
                f"stop_token_ids must be a list of ints, got {type(self.stop_token_ids).__name__}"
            )
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise ValueError(
                    f"stop_token_ids must contain non-negative ints, got {t!r}"
                )

    @staticmethod
    def _check_float(name: str, value: object) -> None:
        if not _is_number(value):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")

    @property
    def is_greedy(self) -> bool:
        """True when decoding reduces to argmax (after penalties)."""
        return self.temperature == 0 or not self.do_sample or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """True when any penalty changes the logits."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


class SequenceTokens:
    """One sequence's prompt and generated token ids, with incrementally kept statistics.

    The penalties need (a) the set of distinct prompt+output ids and (b) per-id counts of
    output ids.  Both are kept as Python structures updated in O(1) per token, and the
    tensors handed to the sampler are cached until the next token changes them.
    """

    __slots__ = (
        "_out_counts",
        "_out_ids",
        "_out_index",
        "_out_tensors",
        "_seen",
        "_seen_order",
        "_seen_tensor",
        "output_ids",
        "prompt_ids",
    )

    def __init__(
        self, prompt_ids: Iterable[int] = (), output_ids: Iterable[int] = ()
    ) -> None:
        self.prompt_ids: list[int] = list(prompt_ids)
        self.output_ids: list[int] = []
        # Distinct prompt+output ids, in first-seen order so the tensor can be grown by
        # appending instead of being rebuilt.
        self._seen: set[int] = set()
        self._seen_order: list[int] = []
        self._seen_tensor: torch.Tensor | None = None
        for t in self.prompt_ids:
            self._add_seen(t)
        # Distinct output ids -> position in _out_ids/_out_counts.
        self._out_index: dict[int, int] = {}
        self._out_ids: list[int] = []
        self._out_counts: list[int] = []
        self._out_tensors: tuple[torch.Tensor, torch.Tensor] | None = None
        for t in output_ids:
            self.append(t)

    def _add_seen(self, token: int) -> None:
        if token not in self._seen:
            self._seen.add(token)
            self._seen_order.append(token)

    def append(self, token: int) -> None:
        """Record one generated token."""
        token = int(token)
        self.output_ids.append(token)
        self._add_seen(token)
        pos = self._out_index.get(token)
        if pos is None:
            self._out_index[token] = len(self._out_ids)
            self._out_ids.append(token)
            self._out_counts.append(1)
        else:
            self._out_counts[pos] += 1
        self._out_tensors = None

    def extend(self, tokens: Iterable[int]) -> None:
        """Record several generated tokens."""
        for t in tokens:
            self.append(t)

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def seen_ids(self) -> torch.Tensor:
        """Distinct ids of prompt + output as a LongTensor (cached, grown incrementally)."""
        cached = self._seen_tensor
        if cached is None:
            cached = torch.tensor(self._seen_order, dtype=torch.long)
        elif cached.numel() != len(self._seen_order):
            new = torch.tensor(self._seen_order[cached.numel() :], dtype=torch.long)
            cached = torch.cat((cached, new))
        self._seen_tensor = cached
        return cached

    def output_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(distinct output ids as LongTensor, their counts as float32 tensor), cached."""
        if self._out_tensors is None:
            self._out_tensors = (
                torch.tensor(self._out_ids, dtype=torch.long),
                torch.tensor(self._out_counts, dtype=torch.float32),
            )
        return self._out_tensors


def make_generator(
    seed: int | None, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A fresh generator seeded with ``seed``, or with OS entropy when ``seed`` is None."""
    if seed is None:
        # Independent randomness per request, not derived from the global RNG state.
        seed = secrets.randbits(63)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _apply_penalties(
    row: torch.Tensor, params: SamplingParams, tokens: SequenceTokens
) -> None:
    """Apply repetition, then frequency/presence penalties to a float32 row in place."""
    rep = params.repetition_penalty
    if rep != 1.0:
        ids = tokens.seen_ids().to(row.device)
        if ids.numel():
            vals = row.index_select(0, ids)
            row.index_copy_(0, ids, torch.where(vals > 0, vals / rep, vals * rep))
    if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
        ids, counts = tokens.output_counts()
        if ids.numel():
            ids = ids.to(row.device)
            counts = counts.to(row.device)
            # count > 0 for every listed id, so the presence term is a constant.
            delta = counts * params.frequency_penalty + params.presence_penalty
            row.index_add_(0, ids, -delta)


def _top_k(row: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= row.numel():
        return row
    # Threshold rather than scatter: ties with the k-th value are kept, which makes the
    # result independent of how topk orders equal values.
    kth = torch.topk(row, k).values[-1]
    return row.masked_fill(row < kth, -math.inf)


def _top_p(row: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return row
    probs = torch.softmax(row, dim=-1)
    # LLM distributions usually put top_p of their mass on a few tokens: try the largest
    # _TOP_P_CANDIDATES first and fall back to a full sort (slow at V=128k) only when
    # they do not reach top_p.  Both give the same sorted prefix, hence the same cutoff.
    sorted_probs = cum = None
    if row.numel() > _TOP_P_CANDIDATES:
        sorted_probs = torch.topk(probs, _TOP_P_CANDIDATES).values
        cum = torch.cumsum(sorted_probs, dim=-1)
        if float(cum[-1]) < top_p:
            sorted_probs = cum = None
    if sorted_probs is None or cum is None:
        sorted_probs, _ = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
    # Number of tokens strictly needed before the cumulative mass reaches top_p, + the one
    # that crosses it; clamp guards against float round-off leaving cum[-1] < top_p.
    n_keep = int(torch.count_nonzero(cum < top_p)) + 1
    n_keep = min(n_keep, row.numel())
    cutoff = sorted_probs[n_keep - 1]
    return row.masked_fill(probs < cutoff, -math.inf)


def _typical_p(row: torch.Tensor, mass: float) -> torch.Tensor:
    if mass >= 1.0:
        return row
    log_probs = torch.log_softmax(row, dim=-1)
    probs = log_probs.exp()
    # Masked tokens have p = 0 and log p = -inf; their 0 * -inf = nan term is dropped.
    entropy = -torch.nansum(log_probs * probs)
    # Distance of each token's surprisal from the entropy; masked tokens get +inf.
    surprise_gap = (-log_probs - entropy).abs()
    sorted_gap, order = torch.sort(surprise_gap)
    cum = torch.cumsum(probs.index_select(0, order), dim=-1)
    last = min(int(torch.count_nonzero(cum < mass)), row.numel() - 1)
    # Keep every token at least as typical as the one that crosses the mass (ties kept);
    # the most typical token is always kept.
    return row.masked_fill(surprise_gap > sorted_gap[last], -math.inf)


def _sample_row(
    row: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """Sample one token id from a penalised float32 row (non-greedy params)."""
    row = row / params.temperature
    row = _top_k(row, params.top_k)
    row = _top_p(row, params.top_p)
    row = _typical_p(row, params.typical_p)
    probs = torch.softmax(row, dim=-1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0.0:
        # All logits were -inf/nan (or overflowed): nothing sensible to sample from.
        return int(torch.argmax(row))
    return int(torch.multinomial(probs, 1, generator=generator))


class Sampler:
    """Turns a batch of next-token logits into token ids (see module docstring for order)."""

    @staticmethod
    def apply_penalties(
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        token_histories: Sequence[SequenceTokens],
    ) -> torch.Tensor:
        """Float32 copy of ``logits`` [B, V] with each row's penalties applied (steps 1-2)."""
        # Own copy: penalties are applied in place and the caller's logits must stay
        # untouched.
        work = logits.to(torch.float32, copy=True)
        for i, (p, hist) in enumerate(zip(params, token_histories)):
            if p.has_penalties:
                _apply_penalties(work[i], p, hist)
        return work

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        token_histories: Sequence[SequenceTokens],
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:
        """logits ``[B, V]`` (any float dtype) -> LongTensor ``[B]`` of sampled ids."""
        if logits.dim() != 2:
            raise ValueError(
                f"logits must be 2-D [B, V], got shape {tuple(logits.shape)}"
            )
        batch = logits.shape[0]
        if not len(params) == len(token_histories) == len(generators) == batch:
            raise ValueError(
                f"batch size mismatch: logits {batch}, params {len(params)}, "
                f"token_histories {len(token_histories)}, generators {len(generators)}"
            )
        if batch == 0:
            return torch.empty(0, dtype=torch.long, device=logits.device)

        # Fast path: plain greedy for the whole batch.  argmax is exact, so batching it
        # cannot change any row's result.
        if all(p.is_greedy and not p.has_penalties for p in params):
            return torch.argmax(logits.float(), dim=-1)

        work = self.apply_penalties(logits, params, token_histories)
        out = torch.empty(batch, dtype=torch.long)
        for i, (p, gen) in enumerate(zip(params, generators)):
            row = work[i]
            if p.is_greedy:
                out[i] = int(torch.argmax(row))
            else:
                out[i] = _sample_row(row, p, gen)
        return out.to(logits.device)
