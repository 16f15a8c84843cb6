"""Paged KV cache: per-layer (k, v) block tensors and the free list that hands blocks out."""
import collections
import math
from collections.abc import Sequence

import torch


class OutOfBlocksError(RuntimeError):
    pass


class BlockManager:
    """KV blocks handed out by reference count, with a prefix cache over the free ones.

    Every block handed out must come back (leaks are bugs). A full block whose K/V a sequence has computed can
    be registered under the hash of its content (``register``); when its last user frees it, it joins the free
    list *with* its content, so a later request whose prompt starts with the same tokens takes it back
    (``acquire``) instead of recomputing it. Free blocks are reused least recently used first, cached ones
    last: a cached block is evicted only when a block is needed and no uncached free block is left.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one slot, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Free blocks in the order they are reused: uncached ones first, then cached ones, least recent first.
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict((b, None) for b in range(num_blocks))
        self._refs: dict[int, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks a request can get: the unused ones, cached or not."""
        return len(self._free)

    @property
    def all_free(self) -> bool:
        return not self._refs

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= self.num_free

    def allocate(self, num_tokens: int) -> list[int]:
        return self.allocate_blocks(self.blocks_for(num_tokens))

    def allocate_blocks(self, count: int) -> list[int]:
        if count > self.num_free:
            raise OutOfBlocksError(f"{count} KV blocks needed, {self.num_free} free")
        blocks = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            digest = self._hash_of.pop(block, None)
            if digest is not None:  # its cached content is overwritten from now on
                del self._block_of[digest]
                self.evictions += 1
            self._refs[block] = 1
            blocks.append(block)
        # Which blocks is decided above; in ascending order, a contiguous set (blocks freed tail-first come back
        # reversed) is one run that decode attention reads as a single view of the cache.
        return sorted(blocks)

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; a block nobody uses any more becomes free (keeping its cached
        content, if any, until it is reused). Blocks are given in sequence order: the later ones of a sequence
        are reused before its earlier ones, which other prompts are likelier to share."""
        for block in blocks:
            if block not in self._refs:
                raise ValueError(f"KV block {block} freed twice or never allocated")
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            del self._refs[block]
            self._free[block] = None
            if block not in self._hash_of:
                self._free.move_to_end(block, last=False)  # nothing to keep: reuse it first

    # -- prefix cache ------------------------------------------------------------------------
    def cached_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """The blocks holding the longest run of ``hashes`` from the first one (nothing is taken)."""
        blocks = []
        for digest in hashes:
            block = self._block_of.get(digest)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def num_unused(self, blocks: Sequence[int]) -> int:
        """How many of these (cached) blocks are on the free list: taking them uses up free blocks."""
        return sum(1 for block in blocks if block in self._free)

    def acquire(self, blocks: Sequence[int]) -> None:
        """Take one more reference to each cached block (off the free list if nobody held it)."""
        for block in blocks:
            if block in self._refs:
                self._refs[block] += 1
            else:
                del self._free[block]
                self._refs[block] = 1

    def register(self, block: int, digest: bytes) -> bool:
        """Record that ``block`` (in use, full) holds the content hashed as ``digest``. False when another block
        already holds that content or this one is registered already (the first copy is the one kept)."""
        if block not in self._refs or digest in self._block_of or block in self._hash_of:
            return False
        self._hash_of[block] = digest
        self._block_of[digest] = block
        return True

    def reset_prefix_cache(self) -> None:
        """Forget every cached content (the K/V tensors were overwritten, e.g. re-initialised)."""
        self._hash_of.clear()
        self._block_of.clear()


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
