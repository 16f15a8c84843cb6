"""Paged KV cache: per-layer (k, v) block tensors and the free list that hands blocks out."""
import math
from collections.abc import Sequence

import torch


class OutOfBlocksError(RuntimeError):
    pass


class BlockManager:
    """A free list of KV blocks. Every block handed out must come back (leaks are bugs)."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one slot, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._used = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def all_free(self) -> bool:
        return not self._used

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= self.num_free

    def allocate(self, num_tokens: int) -> list[int]:
        needed = self.blocks_for(num_tokens)
        if needed > self.num_free:
            raise OutOfBlocksError(f"{needed} KV blocks needed, {self.num_free} free")
        blocks = [self._free.pop() for _ in range(needed)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            if block not in self._used:
                raise ValueError(f"KV block {block} freed twice or never allocated")
            self._used.remove(block)
            self._free.append(block)


def copy_kv_blocks(kv_cache: list, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy whole KV blocks ``src[i] -> dst[i]`` in every layer."""
    for k_cache, v_cache in kv_cache:
        k_cache.index_copy_(0, dst, k_cache.index_select(0, src))
        v_cache.index_copy_(0, dst, v_cache.index_select(0, src))


class CacheManager:
    """KV tensors in the framework's ND layout: ``[num_blocks, block_size, kv_heads_per_rank, head_dim]``."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                 dtype: torch.dtype, device):
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks, block_size, num_kv_heads, head_size)
        self.kv_cache = [tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(2))
                         for _ in range(num_layers)]
        self.block_manager = BlockManager(num_blocks, block_size)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_size: int, dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_size * torch.empty(0, dtype=dtype).element_size()
