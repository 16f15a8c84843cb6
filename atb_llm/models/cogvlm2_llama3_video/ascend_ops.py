"""Ascend implementation of the attention-side operations, over ``torch_npu`` fused operators.

Same static methods and tensor conventions as ``device_ops.PortableOps``; chosen by ``get_device_ops``
when the model's tensors are on an NPU. ``torch_npu`` is imported inside each call, never at module
level, so this module can be imported (and the portable path used) where CANN is absent.

Operators, called as vllm-ascend / MindIE call them:
- ``torch_npu.npu_rms_norm(x, gamma, epsilon)`` -> ``(y, rstd)``
- ``torch_npu.npu_rotary_mul(x, cos, sin)``, rotate-half mode, ``x`` in BSND layout
- ``torch_npu._npu_reshape_and_cache(key, value, key_cache, value_cache, slot_indices)``, in place
- ``torch_npu._npu_flash_attention(query, key, value, mask, seq_len, scale_value, num_heads,
  num_kv_heads, out)``: causal attention over a flattened ragged batch, written into ``out``
- ``torch_npu._npu_paged_attention(query, key_cache, value_cache, num_kv_heads, num_heads, scale_value,
  block_table, context_lens, out)``: one query token per sequence over its paged context
- ``torch_npu._npu_paged_attention_splitfuse(query, key_cache, value_cache, mask, block_table, seq_len,
  context_lens, num_kv_heads, num_heads, scale_value, out)``: new tokens of sequences that already have K/V
  in the cache (a prefix-cache hit, the next chunk of a prompt, decodes in the same step), ``seq_len`` their
  count per sequence and ``context_lens`` each sequence's whole context, over the paged cache; ``mask`` holds
  one row of the additive causal mask per new token, picked by the token's index in its sequence (vllm-ascend's
  ChunkedPrefill state)
"""
from collections.abc import Sequence
from typing import ClassVar

import torch


def _torch_npu():
    import torch_npu  # only where tensors live on an NPU (or under the test fake)

    return torch_npu


def causal_mask(max_len: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The prefill mask ``[max_len, max_len]`` the flash-attention operator takes: zero where a query may
    attend, and above the diagonal the masked value its kernels expect (a large negative bias for fp16,
    1 as a flag for the other dtypes). Built in fp32 and cast, so the fp16 bias saturates to -inf instead
    of overflowing the fill."""
    masked = torch.ones(max_len, max_len, dtype=torch.bool, device=device).triu_(1)
    value = torch.finfo(torch.float32).min if dtype == torch.float16 else 1.0
    mask = torch.zeros(max_len, max_len, dtype=torch.float32, device=device).masked_fill_(masked, value)
    return mask.to(dtype)


def splitfuse_mask(q_lens: Sequence[int], context_lens: Sequence[int], dtype: torch.dtype, device) -> torch.Tensor:
    """The SplitFuse operator's mask ``[sum(q_lens), max(context_lens)]``: for each new token, the row of the
    causal mask at the token's index in its sequence (its index, not its CogVLM position), as an additive bias:
    zero where it may attend, and where not, -inf for fp16 (the fp32 minimum, saturated) and -10000 for the
    other dtypes (the bf16 bias vllm-ascend scales its mask to)."""
    width = max(int(c) for c in context_lens)
    index = torch.tensor([p for n, c in zip(q_lens, context_lens) for p in range(int(c) - int(n), int(c))],
                         device=device)
    masked = torch.arange(width, device=device).unsqueeze(0) > index.unsqueeze(1)
    value = torch.finfo(torch.float32).min if dtype == torch.float16 else -10000.0
    mask = torch.zeros(masked.shape, dtype=torch.float32, device=device).masked_fill_(masked, value)
    return mask.to(dtype)


class AscendOps:
    """Attention-side operations on ``torch_npu`` fused kernels (see ``PortableOps`` for the semantics)."""

    _mask_cache: ClassVar[dict] = {}

    @staticmethod
    def check_available() -> None:
        try:
            _torch_npu()
        except ImportError as error:
            raise RuntimeError("the Ascend backend needs torch_npu (with the CANN toolkit); install the "
                               "torch_npu wheel matching your torch version") from error

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out, _ = _torch_npu().npu_rms_norm(x, weight.to(x.dtype), epsilon=eps)
        return out

    @staticmethod
    def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q/k ``[T, heads, head_dim]`` and cos/sin ``[T, head_dim]``; the operator takes BSND with
        batch 1 and cos/sin broadcast as ``[1, T, 1, head_dim]``."""
        npu = _torch_npu()
        cos4 = cos.to(q.dtype).unsqueeze(0).unsqueeze(2)
        sin4 = sin.to(q.dtype).unsqueeze(0).unsqueeze(2)
        q_out = npu.npu_rotary_mul(q.unsqueeze(0).contiguous(), cos4, sin4)
        k_out = npu.npu_rotary_mul(k.unsqueeze(0).contiguous(), cos4, sin4)
        return q_out.squeeze(0), k_out.squeeze(0)

    @staticmethod
    def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slots: torch.Tensor) -> None:
        _torch_npu()._npu_reshape_and_cache(
            key=k.to(k_cache.dtype).contiguous(), value=v.to(v_cache.dtype).contiguous(), key_cache=k_cache,
            value_cache=v_cache, slot_indices=slots.to(torch.int32))

    @staticmethod
    def _mask(max_len: int, dtype: torch.dtype, device) -> torch.Tensor:
        key = (dtype, str(device))
        mask = AscendOps._mask_cache.get(key)
        if mask is None or mask.shape[0] < max_len:
            size = max(max_len, 128)
            mask = AscendOps._mask_cache[key] = causal_mask(size, dtype, device)
        return mask[:max_len, :max_len]

    @staticmethod
    def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: Sequence[int],
                          scale: float) -> torch.Tensor:
        lengths = [int(n) for n in seq_lens]
        out = torch.empty_like(q)
        _torch_npu()._npu_flash_attention(
            query=q.contiguous(), key=k.contiguous(), value=v.contiguous(),
            mask=AscendOps._mask(max(lengths), q.dtype, q.device),
            seq_len=torch.tensor(lengths, dtype=torch.int32),  # host tensor, as the kernel reads it on the CPU
            scale_value=scale, num_heads=q.shape[1], num_kv_heads=k.shape[1], out=out)
        return out

    @staticmethod
    def prefix_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor, q_lens: Sequence[int], context_lens: torch.Tensor,
                                 scale: float) -> torch.Tensor:
        lengths = [int(n) for n in context_lens.tolist()]
        q_lens = [int(n) for n in q_lens]
        out = torch.empty_like(q)
        _torch_npu()._npu_paged_attention_splitfuse(
            query=q.contiguous(), key_cache=k_cache, value_cache=v_cache,
            mask=splitfuse_mask(q_lens, lengths, q.dtype, q.device), block_table=block_tables.to(torch.int32),
            seq_len=torch.tensor(q_lens, dtype=torch.int32),  # host tensors, read on the CPU by the kernel
            context_lens=torch.tensor(lengths, dtype=torch.int32), num_kv_heads=k_cache.shape[2],
            num_heads=q.shape[1], scale_value=scale, out=out)
        return out

    @staticmethod
    def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        _torch_npu()._npu_paged_attention(
            query=q.contiguous(), key_cache=k_cache, value_cache=v_cache, num_kv_heads=k_cache.shape[2],
            num_heads=q.shape[1], scale_value=scale, block_table=block_tables.to(torch.int32),
            context_lens=context_lens.to(device="cpu", dtype=torch.int32), out=out)
        return out
