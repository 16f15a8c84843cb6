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


class CacheConfig:
    """How many KV blocks of how many slots (MindIE's ``CacheConfig`` constructor)."""

    def __init__(self, num_blocks=1024, block_size=128, input_max_length=2048, output_max_length=128, batch_size=1,
                 rank=0, world_size=1):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.input_max_length = input_max_length
        self.output_max_length = output_max_length
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size


class ModelConfig:
    """What the KV cache needs to know about the model (MindIE's ``ModelConfig`` constructor)."""

    def __init__(self, num_heads, num_kv_heads, num_kv_heads_origin, k_head_size, v_head_size, num_layers, device,
                 dtype, soc_info, kv_quant_type, fa_quant_type=None, mapping=None, kvcache_quant_layers=None,
                 cla_share_factor=1, model_type=None, enable_nz=False):
        if kv_quant_type is not None or fa_quant_type is not None or enable_nz:
            raise ValueError("the portable KV cache is ND and unquantized (no kv_quant_type, fa_quant_type, NZ)")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.num_kv_heads_origin = num_kv_heads_origin
        self.head_size = k_head_size
        self.k_head_size = k_head_size
        self.v_head_size = v_head_size
        self.num_layers = num_layers
        self.device = device
        self.dtype = dtype
        self.soc_info = soc_info
        self.kv_quant_type = kv_quant_type
        self.fa_quant_type = fa_quant_type
        self.mapping = mapping
        self.kvcache_quant_layers = kvcache_quant_layers
        self.cla_share_factor = cla_share_factor
        self.model_type = model_type
        self.enable_nz = enable_nz


class CacheManager:
    """KV tensors in the framework's ND layout, ``[num_blocks, block_size, kv_heads_per_rank, head_dim]`` per layer,
    plus the free list that hands the blocks out.

    Allocated with ``torch.empty`` as MindIE does: a slot holds garbage (NaN and inf included) until a
    token's K/V is written there, so attention must never read a slot outside a sequence's context.
    """

    def __init__(self, cache_config: CacheConfig, model_config: ModelConfig):
        self.block_size = cache_config.block_size
        self.num_blocks = cache_config.num_blocks
        self.num_layers = model_config.num_layers
        self.device = model_config.device
        self.dtype = model_config.dtype
        k_shape = (self.num_blocks, self.block_size, model_config.num_kv_heads, model_config.k_head_size)
        v_shape = (self.num_blocks, self.block_size, model_config.num_kv_heads, model_config.v_head_size)
        self.kv_cache = [(torch.empty(k_shape, dtype=self.dtype, device=self.device),
                          torch.empty(v_shape, dtype=self.dtype, device=self.device))
                         for _ in range(self.num_layers)]
        self.block_manager = BlockManager(self.num_blocks, self.block_size)
