"""Attention-side operations behind one interface, chosen by the tensors' device.

``PortableOps`` is plain PyTorch (CPU, CUDA). The Ascend implementation lives in ``ascend_ops`` and is
imported only when tensors are on an NPU, so ``torch_npu`` is never needed elsewhere.
"""
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class PortableOps:
    """Reference semantics every backend must match."""

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
        others gather their context and run SDPA with the causal offset as a mask."""
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
        block_size, kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
        for b, n in enumerate(q_lens):
            if n == 1:
                continue
            length = lengths[b]
            blocks = block_tables[b, :-(-length // block_size)]
            keys = k_cache[blocks].reshape(-1, kv_heads, head_dim)[:length].to(q.dtype)
            values = v_cache[blocks].reshape(-1, kv_heads, head_dim)[:length].to(q.dtype)
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

        Written as two batched matmuls with the query heads grouped per KV head: with a one-token query,
        SDPA on CPU takes a slow masked path (measured ~10x slower than this at batch 8).
        Slots past a sequence's context were never written (the cache is ``torch.empty``, as MindIE's): their
        scores are masked and their values zeroed, since a masked probability of 0 times NaN is still NaN.
        """
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
