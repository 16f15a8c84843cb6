"""Attention-side operations behind one interface, chosen by the tensors' device.

``PortableOps`` is plain PyTorch (CPU, CUDA). The Ascend implementation lives in ``ascend_ops`` and is
imported only when tensors are on an NPU, so ``torch_npu`` is never needed elsewhere.
"""
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
    def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
        """One query token per sequence ``q [B, heads, head_dim]`` over its cached context."""
        batch, max_blocks = block_tables.shape
        block_size = k_cache.shape[1]
        keys = k_cache[block_tables].reshape(batch, max_blocks * block_size, *k_cache.shape[2:])
        values = v_cache[block_tables].reshape(batch, max_blocks * block_size, *v_cache.shape[2:])
        positions = torch.arange(max_blocks * block_size, device=q.device)
        mask = (positions.unsqueeze(0) < context_lens.unsqueeze(1)).view(batch, 1, 1, -1)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys.transpose(1, 2).to(q.dtype), values.transpose(1, 2).to(q.dtype),
            attn_mask=mask, scale=scale, enable_gqa=True)
        return out.squeeze(2)


def get_device_ops(device: torch.device):
    if device.type == "npu":
        from atb_llm.models.cogvlm2_llama3_video.ascend_ops import AscendOps

        return AscendOps
    return PortableOps
