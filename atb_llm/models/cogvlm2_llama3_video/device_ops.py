"""Attention-side operations behind one interface, chosen by the tensors' device.

``PortableOps`` is plain PyTorch (CPU, CUDA). The Ascend implementation lives in ``ascend_ops`` and is
imported only when tensors are on an NPU, so ``torch_npu`` is never needed elsewhere.
"""
import contextlib
import contextvars
import functools
import os
import time
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


# ----------------------------------------------------------------------------------------------
# Linear layers
# ----------------------------------------------------------------------------------------------
# Forces the CPU linear kernel: "plain" (F.linear on the checkpoint's weight), "packed" (oneDNN-prepacked in the
# compute dtype, or in fp32 where oneDNN cannot pack that dtype on this CPU), "split" (bf16 / fp16 packed in fp32:
# one-row calls on the stored weight, the others on the packed copy), "fp16" (bf16 / fp16 weights packed in fp16 for
# FBGEMM's GEMM, on CPUs without native bf16 / fp16 matmuls), or "auto" (default: the fastest of those, measured once
# per weight shape). A kind that does not apply to a weight falls back to "packed".
LINEAR_ENV = "COGVLM2_LINEAR"
# Quantization schemes ``make_linear`` takes (the portable runner's ``--quantize``).
LINEAR_QUANTIZATIONS = ("w8a16",)


class DenseLinear(nn.Module):
    """``y = x W^T (+ b)`` with ``F.linear`` on the weight as loaded (CUDA, and CPU where nothing is faster)."""

    kind = "plain"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class UpcastLinear(DenseLinear):
    """``y = x W^T (+ b)`` for bf16 / fp16 weights on a CPU without native matmuls in that dtype: the weight stays
    stored as loaded (memory-mapped from the checkpoint, no second copy) and each call multiplies in fp32 over a
    transient upcast of it. For layers fed many rows at once (the vision tower: 66-257 rows per frame), where the
    upcast costs ~1/rows of the matmul and PyTorch's emulated bf16 GEMM runs ~8x slower than fp32 on AVX2."""

    kind = "upcast"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)


class PackedLinear(nn.Module):
    """``y = x W^T`` over a oneDNN-prepacked copy of ``W`` (blocked for the CPU's GEMM kernels, so no per-call
    reordering): the original tensor is not kept. ``pack_dtype`` is the weight's dtype when oneDNN can pack it,
    else fp32 (bf16 weights on a CPU without AVX512-BF16 / AVX-NE-CONVERT: inputs are cast up and outputs back)."""

    kind = "packed"

    def __init__(self, weight: torch.Tensor, pack_dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.pack_dtype = pack_dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(pack_dtype).contiguous(), None)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (a new tensor, in the dtype it was given in): for inspection, not for compute."""
        return self.packed.to_dense().to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.pack_dtype).contiguous()
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, None, "none", [], "")
        return out.to(self.dtype).view(*x.shape[:-1], self.out_features)


class SplitLinear(nn.Module):
    """``y = x W^T`` for a bf16 / fp16 weight that oneDNN can only pack in fp32 on this CPU, with both kernels: a
    one-row call (a decode step at batch 1) runs ``F.linear`` over the stored weight (torch's reduced-precision
    gemv reads 2 bytes per weight, the fp32-packed one 4: ~1.7x faster on a 2-core AVX2 CPU), a call of more rows
    the fp32-packed copy (the stored-dtype GEMM runs a gemv per row there). Holds both: the stored weight
    (memory-mapped from the checkpoint where it was loaded so) and a packed copy twice its size."""

    kind = "split"

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.packed = PackedLinear(weight, torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:
            return F.linear(x, self.weight)
        return self.packed(x)


# fp16's largest finite value: a weight beyond it cannot be packed in fp16 (FBGEMM would saturate it).
FP16_MAX = torch.finfo(torch.float16).max


class Fp16Linear(nn.Module):
    """``y = x W^T`` for a bf16 / fp16 weight on a CPU without native bf16 / fp16 matmuls: FBGEMM's fp16 GEMM
    (``quantized.linear_prepack_fp16`` once at load, ``quantized.linear_dynamic_fp16`` per call), which reads 2 bytes
    per weight at every row count, converts them to fp32 in its micro-kernel and multiplies fp32 activations with
    fp32 accumulation. Measured on a 2-core AVX2 CPU (``benchmarks/bench_linears.py``, cold): 1.1-1.4x torch's bf16
    gemv at 1 row, 1.2-2x the fp32-packed oneDNN weight at 8-16 rows, at a third of split's memory.

    A bf16 weight is exactly an fp16 one where ``|w| >= 2**-17`` (fp16 has more mantissa bits; its subnormals
    reach down to 2**-24): smaller weights (~0.02% of a layer drawn with std 0.02) round to a multiple of 2**-24,
    a change of at most 2**-25, far below the bf16 rounding of the layer's output. A weight beyond fp16's range is
    never packed so (``fits_fp16``). The original tensor is not kept."""

    kind = "fp16"

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight.contiguous(), None)

    @property
    def weight(self) -> torch.Tensor:
        """The packed weight as a new tensor in the dtype it was given in: for inspection, not for compute."""
        return torch.ops.quantized.linear_unpack_fp16(self.packed)[0].to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float().contiguous()
        out = torch.ops.quantized.linear_dynamic_fp16(rows, self.packed)
        return out.to(self.dtype).view(*x.shape[:-1], self.out_features)


@functools.cache
def fbgemm_fp16_available() -> bool:
    """Whether this torch has FBGEMM's fp16-weight GEMM (x86 builds; not ARM, where FBGEMM is absent)."""
    try:
        packed = torch.ops.quantized.linear_prepack_fp16(torch.ones(1, 1), None)
        torch.ops.quantized.linear_dynamic_fp16(torch.ones(1, 1), packed)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return True


def fp16_packing_applies(dtype: torch.dtype) -> bool:
    """Whether ``Fp16Linear`` is a candidate kernel for a ``dtype`` weight: bf16 / fp16 that oneDNN can only pack
    in a wider dtype on this CPU (no native matmuls in that dtype), with FBGEMM present."""
    pack_dtype = onednn_pack_dtype(dtype)
    return pack_dtype is not None and pack_dtype != dtype and fbgemm_fp16_available()


def fits_fp16(weight: torch.Tensor) -> bool:
    """Whether every value of ``weight`` lies within fp16's finite range (packing it in fp16 saturates nothing). A
    reduction, no copy of the weight (a 128k-vocabulary lm_head is 1 GB in bf16)."""
    if not weight.numel():
        return True
    low, high = torch.aminmax(weight)
    return bool(low.item() >= -FP16_MAX and high.item() <= FP16_MAX)


# From this many rows per call, ``Int8Linear`` multiplies a transient dequantized weight instead (measured crossover
# ~256-300 rows for a 4096 x 4096 weight on a 2-core AVX2 CPU; 1.5x faster at 1024 rows).
INT8_DEQUANT_ROWS = 512


class Int8Linear(nn.Module):
    """w8a16: int8 weights with one fp scale per output channel (symmetric, round to nearest), multiplied by
    torch's int8 weight-pack kernel (``aten._weight_int8pack_mm``) with bf16 activations; outputs in the model's
    dtype. The float weight is not kept."""

    kind = "w8a16"

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.act_dtype = torch.bfloat16 if weight.device.type == "cpu" else weight.dtype
        w32 = weight.float()
        # The kernel takes the scales in the activations' dtype: round them first and quantize against the
        # rounded scales, so every weight stays within half a (rounded) step of its original.
        self.scales = (w32.abs().amax(dim=1).clamp(min=1e-12) / 127.0).to(self.act_dtype)
        steps = self.scales.float()[:, None]
        self.qweight = torch.round(w32 / steps).clamp_(-127, 127).to(torch.int8).contiguous()
        # The float GEMM of prefills: in the activations' dtype where the CPU multiplies it natively, else fp32.
        self.prefill_dtype = self.act_dtype if _native_low_precision_matmul(self.act_dtype) else torch.float32

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The effective weight, ``q * scale`` per output channel, as a new ``dtype`` tensor."""
        return (self.qweight * self.scales.float()[:, None]).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (a new tensor): for inspection, not for compute."""
        return self.dequantized(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.act_dtype).contiguous()
        if rows.shape[0] >= INT8_DEQUANT_ROWS:
            # A prefill: the int8 kernel is built for decode-sized inputs (~80 GFLOPS at 1000+ rows on a 2-core
            # AVX2 CPU); a transient dequantized weight and the float GEMM run 1.5x faster there. The same bf16
            # inputs and the same effective weight: only the accumulation order differs.
            out = F.linear(rows.to(self.prefill_dtype), self.dequantized(self.prefill_dtype))
        else:
            out = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scales)
        return out.to(self.dtype).view(*x.shape[:-1], self.out_features)


def onednn_pack_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype oneDNN can prepack a ``dtype`` weight in on this CPU: itself when supported, fp32 for bf16 / fp16
    where the CPU lacks the instructions (detected, never assumed), None when oneDNN is absent."""
    if not torch.backends.mkldnn.is_available():
        return None
    if dtype == torch.float32:
        return torch.float32
    if dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    if dtype == torch.float16 and torch.ops.mkldnn._is_mkldnn_fp16_supported():
        return torch.float16
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else None


def _time_linears(modules: Sequence[nn.Module], in_features: int, dtype: torch.dtype, rows: Sequence[int],
                  rounds: int = 5) -> list[list[float]]:
    """Best-of-``rounds`` seconds of each module (outer list) at each row count (inner list), the modules
    interleaved in every round so that a noisy neighbour slows them alike."""
    inputs = [torch.randn(n, in_features).to(dtype) for n in rows]
    best = [[float("inf")] * len(inputs) for _ in modules]
    with torch.inference_mode():
        for module in modules:
            for x in inputs:
                module(x)  # warm-up: first calls pay for oneDNN primitive creation
        for _ in range(rounds):
            for i, module in enumerate(modules):
                for j, x in enumerate(inputs):
                    start = time.perf_counter()
                    module(x)
                    best[i][j] = min(best[i][j], time.perf_counter() - start)
    return best


_CPU_LINEAR_CHOICE: dict[tuple, str] = {}
# Output rows of the proxy weight a choice is measured on (time scales with them; a 128k-row lm_head is not timed
# whole) and the decode batch sizes it is measured at (1 and the host's batch size, see ``decode_batch_hint``).
_PROBE_MAX_ROWS = 4096
_PROBE_BATCHES: contextvars.ContextVar[tuple[int, ...]] = contextvars.ContextVar("probe_batches", default=(1, 16))


@contextlib.contextmanager
def decode_batch_hint(max_batch_size: int | None) -> Iterator[None]:
    """Within the block, linear choices are measured at 1 and ``max_batch_size`` rows (the batch sizes the host will
    decode at; at most 64); None or a non-positive size (MindIE's ModelRunner passes -1 when it is not told) keeps
    the default (1 and 16)."""
    if not max_batch_size or max_batch_size < 1:
        yield
        return
    batches = tuple(sorted({1, min(int(max_batch_size), 64)}))
    token = _PROBE_BATCHES.set(batches)
    try:
        yield
    finally:
        _PROBE_BATCHES.reset(token)


def cpu_linear_kind(out_features: int, in_features: int, dtype: torch.dtype) -> str:
    """"plain", "packed", "split" or "fp16" for a CPU weight of this shape and dtype: ``COGVLM2_LINEAR`` when set,
    else measured once per (shape, dtype, threads, batch sizes) on a random weight of the same width: each kernel is
    timed at 1 row and at the host's batch size, and the one with the least time over those calls wins. "split"
    (the stored weight's time at 1 row, the packed copy's at the batch size) is a candidate only for a weight
    oneDNN packs in a wider dtype than its own, with more than one batch size; "fp16" only for a bf16 / fp16 weight
    on such a CPU, where FBGEMM is present. A forced kind that does not apply gives "packed"."""
    forced = os.environ.get(LINEAR_ENV, "").strip().lower() or "auto"
    if forced not in ("auto", "plain", "packed", "split", "fp16"):
        raise ValueError(f"{LINEAR_ENV} must be 'auto', 'plain', 'packed', 'split' or 'fp16', got {forced!r}")
    pack_dtype = onednn_pack_dtype(dtype)
    if pack_dtype is None or forced == "plain":
        return "plain"
    widened = pack_dtype != dtype  # bf16 / fp16 on a CPU without native matmuls in that dtype
    fp16_applies = fp16_packing_applies(dtype)
    if forced in ("split", "fp16") and not (fp16_applies if forced == "fp16" else widened):
        return "packed"
    if forced != "auto":
        return forced
    batches = _PROBE_BATCHES.get()
    key = (out_features, in_features, dtype, torch.get_num_threads(), batches)
    if key not in _CPU_LINEAR_CHOICE:
        probe = torch.randn(min(out_features, _PROBE_MAX_ROWS), in_features).to(dtype)
        modules = {"plain": DenseLinear(probe), "packed": PackedLinear(probe, pack_dtype)}
        if fp16_applies:
            modules["fp16"] = Fp16Linear(probe)
        times = dict(zip(modules, _time_linears(list(modules.values()), in_features, dtype, batches)))
        if widened and len(batches) > 1:
            times["split"] = times["plain"][:1] + times["packed"][1:]
        _CPU_LINEAR_CHOICE[key] = min(times, key=lambda kind: sum(times[kind]))
    return _CPU_LINEAR_CHOICE[key]


def make_linear(ops, weight: torch.Tensor, quantize: str | None = None, bias: torch.Tensor | None = None,
                many_rows: bool = False) -> nn.Module:
    """The linear module the device backend ``ops`` offers for ``weight`` (``[out, in]``) and ``bias``; a backend
    without ``make_linear`` (Ascend) gets plain ``F.linear``. ``many_rows``: the layer is fed many rows per call
    (the vision tower), so its kernel is chosen for throughput rather than for decode-sized inputs. The model calls
    this and never branches on devices."""
    factory = getattr(ops, "make_linear", None)
    if factory is not None:
        return factory(weight, quantize, bias=bias, many_rows=many_rows)
    if quantize is not None:
        raise ValueError(f"quantize={quantize!r} is not supported by the {getattr(ops, '__name__', ops)} backend")
    return DenseLinear(weight, bias)


def _block_runs(blocks: Sequence[int]) -> list[tuple[int, int]]:
    """``(first block, count)`` for each run of consecutive block ids, in order."""
    runs: list[tuple[int, int]] = []
    for block in blocks:
        if runs and block == runs[-1][0] + runs[-1][1]:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block, 1))
    return runs


def _context_runs(cache: torch.Tensor, table: Sequence[int], length: int) -> list[torch.Tensor]:
    """A sequence's first ``length`` cached tokens as views of ``cache`` (``[blocks, block_size, kv_heads,
    head_dim]``), one ``[tokens, kv_heads, head_dim]`` view per run of consecutive blocks in ``table``, cut at
    ``length``: no copy, and no slot past the context is in any view."""
    block_size, kv_heads, head_dim = cache.shape[1], cache.shape[2], cache.shape[3]
    views, left = [], length
    for first, count in _block_runs(table[:-(-length // block_size)]):
        tokens = min(count * block_size, left)
        left -= tokens
        views.append(cache[first:first + count].view(-1, kv_heads, head_dim)[:tokens])
    return views


def _joined(views: list[torch.Tensor]) -> torch.Tensor:
    return views[0] if len(views) == 1 else torch.cat(views)


@functools.cache  # a property of the CPU, asked per layer and step by decode attention
def _native_low_precision_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` (bf16 / fp16) natively (AVX512-BF16, AMX, AVX-NE-CONVERT)."""
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return True


class PortableOps:
    """Reference semantics every backend must match."""

    @staticmethod
    def make_linear(weight: torch.Tensor, quantize: str | None = None, bias: torch.Tensor | None = None,
                    many_rows: bool = False) -> nn.Module:
        """A module computing ``x W^T (+ b)``. Decode-fed layers (the LM, no bias): on CPU the oneDNN-prepacked
        weight where measured faster than ``F.linear``, or both split by row count, or bf16 / fp16 weights packed in
        fp16 for FBGEMM (``cpu_linear_kind``), or int8 weights for ``quantize="w8a16"``. Layers fed many rows
        (``many_rows``): fp32 compute over the stored bf16 / fp16 weight on a CPU without native matmuls in that
        dtype (``UpcastLinear``). Elsewhere ``F.linear``."""
        if many_rows:
            if quantize is not None:
                raise ValueError("quantize applies to the language model's linears, not to many-row layers")
            if weight.device.type == "cpu" and not _native_low_precision_matmul(weight.dtype):
                return UpcastLinear(weight, bias)
            return DenseLinear(weight, bias)
        if bias is not None:
            raise ValueError("the portable backend's decode-fed linears take no bias")
        if quantize is not None:
            if quantize not in LINEAR_QUANTIZATIONS:
                raise ValueError(f"quantize={quantize!r}: the portable backend supports {LINEAR_QUANTIZATIONS}")
            if weight.device.type != "cpu":
                raise ValueError(f"quantize={quantize!r} is implemented for CPU only, not {weight.device.type}")
            return Int8Linear(weight)
        kind = cpu_linear_kind(*weight.shape, weight.dtype) if weight.device.type == "cpu" else "plain"
        if kind == "fp16" and not fits_fp16(weight):
            kind = "packed"
        if kind == "fp16":
            return Fp16Linear(weight)
        if kind == "packed":
            return PackedLinear(weight, onednn_pack_dtype(weight.dtype))
        if kind == "split":
            return SplitLinear(weight)
        return DenseLinear(weight)

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # Normalise in fp32 whatever the compute dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(x.dtype)

    @staticmethod
    def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """GPT-NeoX rotate-half RoPE; q/k ``[T, heads, head_dim]``, cos/sin ``[T, head_dim]``."""
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    @staticmethod
    def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slots: torch.Tensor) -> None:
        """Store ``k/v [T, kv_heads, head_dim]`` at flat slots ``block * block_size + offset``."""
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))

    @staticmethod
    def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: Sequence[int],
                          scale: float) -> torch.Tensor:
        """Causal attention within each sequence of a flattened ragged batch ``[T, heads, head_dim]``."""
        outputs = []
        start = 0
        for length in seq_lens:
            qs, ks, vs = (t[start:start + length].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
            outputs.append(out.squeeze(0).transpose(0, 1))
            start += length
        return torch.cat(outputs, dim=0)

    @staticmethod
    def prefix_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor, q_lens: Sequence[int], context_lens: torch.Tensor,
                                 scale: float) -> torch.Tensor:
        """New tokens of sequences that may already have K/V in the cache: ``q [T, heads, head_dim]`` holds
        ``q_lens[b]`` rows for sequence b, its tokens ``context_lens[b] - q_lens[b] .. context_lens[b] - 1``,
        whose K/V were written to the cache before this call. Row j of sequence b attends causally over that
        sequence's first ``context_lens[b] - q_lens[b] + j + 1`` cached tokens, read through
        ``block_tables[b]``; nothing past ``context_lens[b]`` is read.

        One-row sequences (decodes sharing the step) go through ``paged_decode_attention`` together; the
        others run SDPA with the causal offset as a mask over their context read in place (``_context_runs``;
        copied only where the context spans several runs of blocks)."""
        lengths = [int(n) for n in context_lens.tolist()]
        q_lens = [int(n) for n in q_lens]
        starts = [0]
        for n in q_lens:
            starts.append(starts[-1] + n)
        out = torch.empty_like(q)
        single = [b for b, n in enumerate(q_lens) if n == 1]
        if single:
            rows = torch.tensor([starts[b] for b in single], device=q.device)
            index = torch.tensor(single, device=q.device)
            out[rows] = PortableOps.paged_decode_attention(
                q.index_select(0, rows), k_cache, v_cache, block_tables.index_select(0, index),
                context_lens.index_select(0, index), scale)
        tables = block_tables.tolist()
        for b, n in enumerate(q_lens):
            if n == 1:
                continue
            length = lengths[b]
            keys, values = (_joined(_context_runs(cache, tables[b], length)).to(q.dtype)
                            for cache in (k_cache, v_cache))
            past = length - n
            allowed = torch.arange(length, device=q.device) <= torch.arange(past, length, device=q.device)[:, None]
            query = q[starts[b]:starts[b + 1]].transpose(0, 1).unsqueeze(0)  # [1, heads, n, head_dim]
            attended = F.scaled_dot_product_attention(query, keys.transpose(0, 1).unsqueeze(0),
                                                      values.transpose(0, 1).unsqueeze(0), attn_mask=allowed,
                                                      scale=scale, enable_gqa=True)
            out[starts[b]:starts[b + 1]] = attended.squeeze(0).transpose(0, 1)
        return out

    @staticmethod
    def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
        """One query token per sequence ``q [B, heads, head_dim]`` over its cached context.

        On CPU, K/V are read in place (``paged_decode_attention_in_place``); elsewhere through a gather of the
        sequences' blocks (``paged_decode_attention_gathered``), whose one batched matmul suits a GPU better than a
        loop over sequences."""
        if q.device.type == "cpu":
            return PortableOps.paged_decode_attention_in_place(q, k_cache, v_cache, block_tables, context_lens,
                                                               scale)
        return PortableOps.paged_decode_attention_gathered(q, k_cache, v_cache, block_tables, context_lens, scale)

    @staticmethod
    def paged_decode_attention_in_place(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                        block_tables: torch.Tensor, context_lens: torch.Tensor,
                                        scale: float) -> torch.Tensor:
        """Decode attention reading K/V where they lie in the paged cache, with no copy of the blocks.

        Per sequence, its block list is split into runs of consecutive block ids (a sequence's blocks are usually
        one run); a run is a strided view ``[tokens, kv_heads, head_dim]`` of the cache, cut at the context length,
        so an unwritten slot (the cache is ``torch.empty``, as MindIE's: NaN, anything) is never read, not even
        masked. Scores and the weighted sum are batched matmuls over the KV heads with the query heads grouped per
        KV head, over those views. In bf16 on a CPU without native bf16 matmuls, each run is cast to fp32 first
        (its own small copy: bf16 batched matmuls are ~10x slower there). The loop's ops are small, so they run on
        one thread: with a busy core, each multi-threaded small op waited a scheduler slice for its second thread
        (measured 3.7 ms per tiny matmul on a loaded 2-core machine, against microseconds on one thread)."""
        batch, heads, head_dim = q.shape
        kv_heads = k_cache.shape[2]
        compute = q.dtype
        if compute != torch.float32 and not _native_low_precision_matmul(compute):
            compute = torch.float32
        grouped = (q.to(compute) * scale).view(batch, kv_heads, heads // kv_heads, head_dim)
        out = torch.empty(batch, kv_heads, heads // kv_heads, head_dim, dtype=compute, device=q.device)
        tables, lengths = block_tables.tolist(), context_lens.tolist()
        threads = torch.get_num_threads()
        if threads > 1:
            torch.set_num_threads(1)
        try:
            PortableOps._in_place_rows(grouped, k_cache, v_cache, tables, lengths, out)
        finally:
            if threads > 1:
                torch.set_num_threads(threads)
        return out.view(batch, heads, head_dim).to(q.dtype)

    @staticmethod
    def _in_place_rows(grouped: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: list,
                       lengths: list, out: torch.Tensor) -> None:
        """The per-sequence loop of ``paged_decode_attention_in_place``: ``out[b]`` for each sequence b."""
        compute = grouped.dtype
        for b in range(len(lengths)):
            keys = [k.to(compute) for k in _context_runs(k_cache, tables[b], lengths[b])]
            values = [v.to(compute) for v in _context_runs(v_cache, tables[b], lengths[b])]
            # [kv_heads, group, tokens]: one batched matmul per run over the KV heads.
            scores = [torch.matmul(grouped[b], k.permute(1, 2, 0)) for k in keys]
            probs = torch.softmax(scores[0] if len(scores) == 1 else torch.cat(scores, dim=-1), dim=-1,
                                  dtype=torch.float32).to(compute)
            if len(values) == 1:
                torch.matmul(probs, values[0].transpose(0, 1), out=out[b])
                continue
            start = 0
            out[b].zero_()
            for v in values:
                out[b] += torch.matmul(probs[..., start:start + v.shape[0]], v.transpose(0, 1))
                start += v.shape[0]

    @staticmethod
    def paged_decode_attention_gathered(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                        block_tables: torch.Tensor, context_lens: torch.Tensor,
                                        scale: float) -> torch.Tensor:
        """Decode attention over a gather of each sequence's blocks, as two batched matmuls with the query heads
        grouped per KV head (with a one-token query, SDPA takes a slow masked path). Slots past a sequence's
        context were never written: their scores are masked and their values zeroed, since a masked probability
        of 0 times NaN is still NaN."""
        batch, heads, head_dim = q.shape
        max_blocks = block_tables.shape[1]
        block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
        length = max_blocks * block_size
        padding = torch.arange(length, device=q.device).unsqueeze(0) >= context_lens.unsqueeze(1)  # [B, S]
        # [B, kv_heads, S, head_dim] gathered from the blocks of each sequence.
        keys = k_cache[block_tables].view(batch, length, kv_heads, head_dim).transpose(1, 2)
        values = v_cache[block_tables].view(batch, length, kv_heads, head_dim)
        values = values.masked_fill_(padding.view(batch, length, 1, 1), 0).transpose(1, 2)
        grouped = q.view(batch, kv_heads, heads // kv_heads, head_dim)
        scores = torch.matmul(grouped, keys.transpose(2, 3).to(q.dtype)).float() * scale  # [B, kv, group, S]
        scores.masked_fill_(padding.view(batch, 1, 1, length), float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        return torch.matmul(probs, values.to(q.dtype)).view(batch, heads, head_dim)


# Forces a backend whatever the device ("ascend" or "portable"); tests use it to run the Ascend
# implementation on CPU over a fake torch_npu.
DEVICE_OPS_ENV = "COGVLM2_DEVICE_OPS"


def get_device_ops(device: torch.device | str):
    choice = os.environ.get(DEVICE_OPS_ENV, "").strip().lower()
    if choice not in ("", "ascend", "portable"):
        raise ValueError(f"{DEVICE_OPS_ENV} must be 'ascend' or 'portable', got {choice!r}")
    if choice == "ascend" or (not choice and torch.device(device).type == "npu"):
        from atb_llm.models.cogvlm2_llama3_video.ascend_ops import AscendOps

        AscendOps.check_available()
        return AscendOps
    return PortableOps
