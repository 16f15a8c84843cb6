"""Test-only stand-in for ``torch_npu``: the fused operators the plugin's Ascend backend calls,
implemented in plain PyTorch from their documented semantics (argument names and order, layouts,
in-place outputs, index dtypes). It is put on ``sys.path`` only by the tests; it never reaches an NPU.

It is written independently of ``PortableOps`` (explicit loops and softmax, no SDPA) so that comparing
the two checks the Ascend backend's use of the operators, not one implementation against itself.
``CALLS`` counts the calls per operator.
"""
import collections
import math

import torch

__version__ = "0.0.0+fake"
IS_FAKE = True
CALLS: collections.Counter = collections.Counter()

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(f"fake torch_npu: {message}")


def _check_index(tensor: torch.Tensor, name: str) -> None:
    _check(tensor.dtype == torch.int32, f"{name} must be int32, got {tensor.dtype}")


def npu_rms_norm(x: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6):
    """``(y, rstd)``: ``rstd = 1 / sqrt(mean(x^2) + eps)`` over the last dimension(s) of gamma's rank,
    computed in fp32; ``y = x * rstd * gamma`` in x's dtype; rstd is fp32 with the reduced dims kept."""
    CALLS["npu_rms_norm"] += 1
    _check(x.dtype in _FLOAT_DTYPES and gamma.dtype == x.dtype, f"x {x.dtype} and gamma {gamma.dtype} must match")
    _check(tuple(x.shape[-gamma.dim():]) == tuple(gamma.shape), "gamma must match x's trailing dimensions")
    dims = tuple(range(x.dim() - gamma.dim(), x.dim()))
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    y = (x32 * rstd).to(x.dtype) * gamma
    return y, rstd


def npu_rotary_mul(x: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str = "half") -> torch.Tensor:
    """``r1 * x + r2 * rotate(x)`` on 4-D tensors (BNSD, BSND or SBND); r1/r2 broadcast onto x."""
    CALLS["npu_rotary_mul"] += 1
    _check(x.dim() == 4 and r1.dim() == 4 and r2.dim() == 4, "x, r1 and r2 must be 4-D")
    _check(r1.shape == r2.shape, "r1 and r2 must have the same shape")
    _check(x.dtype == r1.dtype == r2.dtype, "x, r1 and r2 must have the same dtype")
    _check(x.shape[-1] % 2 == 0 and r1.shape[-1] == x.shape[-1], "the last dimension must match and be even")
    for x_dim, r_dim in zip(x.shape, r1.shape):
        _check(r_dim in (1, x_dim), f"r1 shape {list(r1.shape)} does not broadcast onto x {list(x.shape)}")
    if rotary_mode == "half":
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    elif rotary_mode == "interleave":
        rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    else:
        raise RuntimeError(f"fake torch_npu: unknown rotary_mode {rotary_mode!r}")
    return r1 * x + r2 * rotated


def _npu_reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, slot_indices: torch.Tensor) -> None:
    """Writes token i's ``key[i] / value[i]`` ``[num_kv_heads, head_dim]`` into the ND caches
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` at block ``slot // block_size``, offset
    ``slot % block_size``; negative slots are skipped. In place; returns nothing."""
    CALLS["_npu_reshape_and_cache"] += 1
    _check_index(slot_indices, "slot_indices")
    _check(key.dim() == 3 and value.dim() == 3, "key and value must be [num_tokens, num_kv_heads, head_dim]")
    _check(key_cache.dim() == 4 and value_cache.dim() == 4, "the caches must be ND [blocks, block_size, heads, dim]")
    _check(key.dtype == key_cache.dtype and value.dtype == value_cache.dtype, "key/value dtype must match the cache")
    _check(tuple(key.shape[1:]) == tuple(key_cache.shape[2:]), "key heads/dim must match the key cache")
    _check(tuple(value.shape[1:]) == tuple(value_cache.shape[2:]), "value heads/dim must match the value cache")
    _check(slot_indices.shape == (key.shape[0],), "one slot per token")
    block_size = key_cache.shape[1]
    for i, slot in enumerate(slot_indices.tolist()):
        if slot < 0:
            continue
        _check(slot < key_cache.shape[0] * block_size, f"slot {slot} is outside the cache")
        key_cache[slot // block_size, slot % block_size] = key[i]
        value_cache[slot // block_size, slot % block_size] = value[i]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """q ``[Lq, N, D]``, k/v ``[Lk, Nkv, D]``, allowed ``[Lq, Lk]`` -> ``[Lq, N, D]`` (fp32 math)."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32)
    for head in range(q.shape[1]):
        kv_head = head // group
        scores = (q[:, head].float() @ k[:, kv_head].float().T) * scale
        scores = scores.masked_fill(~allowed, -math.inf)
        probs = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
        probs = probs / probs.sum(dim=-1, keepdim=True)
        out[:, head] = probs @ v[:, kv_head].float()
    return out


def _npu_flash_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                         seq_len: torch.Tensor, scale_value: float, num_heads: int, num_kv_heads: int,
                         out: torch.Tensor) -> None:
    """Attention within each sequence of a flattened batch: query ``[T, num_heads, D]``, key/value
    ``[T, num_kv_heads, D]``, ``seq_len`` int32 per-sequence lengths summing to T. ``mask`` is
    ``[max_len, max_len]`` (at least the longest sequence; its top-left block is used): zero = attend,
    non-zero = masked (fp16 takes a large negative bias, other dtypes the flag 1). Written into ``out``."""
    CALLS["_npu_flash_attention"] += 1
    _check_index(seq_len, "seq_len")
    _check(query.dim() == 3 and key.dim() == 3 and value.dim() == 3, "query/key/value must be [T, heads, dim]")
    _check(query.shape[1] == num_heads and key.shape[1] == num_kv_heads == value.shape[1], "head counts differ")
    _check(num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads")
    _check(query.dtype == key.dtype == value.dtype == mask.dtype == out.dtype, "dtypes must match")
    _check(out.shape == query.shape, "out must have query's shape")
    lengths = seq_len.tolist()
    _check(sum(lengths) == query.shape[0] == key.shape[0], "seq_len must sum to the number of tokens")
    _check(mask.dim() == 2 and mask.shape[0] >= max(lengths) and mask.shape[1] >= max(lengths),
           "mask must cover the longest sequence")
    start = 0
    for length in lengths:
        rows = slice(start, start + length)
        allowed = mask[:length, :length] == 0
        out[rows] = _attend(query[rows], key[rows], value[rows], allowed, scale_value).to(out.dtype)
        start += length


def _npu_paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         num_kv_heads: int, num_heads: int, scale_value: float, block_table: torch.Tensor,
                         context_lens: torch.Tensor, out: torch.Tensor) -> None:
    """Decode attention: query ``[B, num_heads, D]``, one token per sequence, over the first
    ``context_lens[b]`` cached tokens found through ``block_table[b]`` (int32 ``[B, max_blocks]``) in the ND
    caches ``[num_blocks, block_size, num_kv_heads, D]``. Written into ``out``."""
    CALLS["_npu_paged_attention"] += 1
    _check_index(block_table, "block_table")
    _check_index(context_lens, "context_lens")
    _check(query.dim() == 3 and query.shape[1] == num_heads, "query must be [B, num_heads, dim]")
    _check(key_cache.shape[2] == num_kv_heads and value_cache.shape[2] == num_kv_heads, "num_kv_heads differs")
    _check(num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads")
    _check(query.dtype == key_cache.dtype == value_cache.dtype == out.dtype, "dtypes must match")
    _check(out.shape == query.shape, "out must have query's shape")
    _check(block_table.shape[0] == query.shape[0] == context_lens.shape[0], "one block table row per sequence")
    block_size = key_cache.shape[1]
    for b, length in enumerate(context_lens.tolist()):
        blocks = block_table[b, :math.ceil(length / block_size)].tolist()
        keys = torch.cat([key_cache[block] for block in blocks])[:length]
        values = torch.cat([value_cache[block] for block in blocks])[:length]
        allowed = torch.ones(1, length, dtype=torch.bool)
        out[b] = _attend(query[b:b + 1], keys, values, allowed, scale_value)[0].to(out.dtype)


def _npu_paged_attention_splitfuse(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                   mask: torch.Tensor, block_table: torch.Tensor, seq_len: torch.Tensor,
                                   context_lens: torch.Tensor, num_kv_heads: int, num_heads: int,
                                   scale_value: float, out: torch.Tensor) -> None:
    """SplitFuse attention (chunked prefill, prefix-cache hits, decodes in the same batch): query
    ``[T, num_heads, D]`` holds ``seq_len[b]`` (int32) new tokens of sequence b, in order; ``context_lens[b]``
    (int32) is b's number of cached tokens including the new ones, whose K/V are already in the ND caches
    ``[num_blocks, block_size, num_kv_heads, D]``, found through ``block_table[b]`` (int32). ``mask`` is
    ``[T, >= max(context_lens)]`` in query's dtype, an additive bias per new token over its sequence's keys.
    New token i of sequence b reads only the first ``context_lens[b]`` cached tokens. Written into ``out``."""
    CALLS["_npu_paged_attention_splitfuse"] += 1
    for tensor, name in ((block_table, "block_table"), (seq_len, "seq_len"), (context_lens, "context_lens")):
        _check_index(tensor, name)
    _check(query.dim() == 3 and query.shape[1] == num_heads, "query must be [T, num_heads, dim]")
    _check(key_cache.shape[2] == num_kv_heads and value_cache.shape[2] == num_kv_heads, "num_kv_heads differs")
    _check(num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads")
    _check(query.dtype == key_cache.dtype == value_cache.dtype == mask.dtype == out.dtype, "dtypes must match")
    _check(out.shape == query.shape, "out must have query's shape")
    q_lens, lengths = seq_len.tolist(), context_lens.tolist()
    _check(len(q_lens) == len(lengths) == block_table.shape[0], "one seq_len, context_len and block row per sequence")
    _check(sum(q_lens) == query.shape[0], "seq_len must sum to the number of query tokens")
    _check(all(0 < n <= c for n, c in zip(q_lens, lengths)), "each sequence needs 0 < seq_len <= context_len")
    _check(mask.dim() == 2 and mask.shape[0] == query.shape[0] and mask.shape[1] >= max(lengths),
           "mask must be [query tokens, longest context]")
    block_size = key_cache.shape[1]
    group = num_heads // num_kv_heads
    start = 0
    for b, (n, length) in enumerate(zip(q_lens, lengths)):
        blocks = block_table[b, :math.ceil(length / block_size)].tolist()
        keys = torch.cat([key_cache[block] for block in blocks])[:length]
        values = torch.cat([value_cache[block] for block in blocks])[:length]
        rows = slice(start, start + n)
        bias = mask[rows, :length].float()
        for head in range(num_heads):
            scores = (query[rows, head].float() @ keys[:, head // group].float().T) * scale_value + bias
            probs = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
            probs = probs / probs.sum(dim=-1, keepdim=True)
            out[rows, head] = (probs @ values[:, head // group].float()).to(out.dtype)
        start += n
