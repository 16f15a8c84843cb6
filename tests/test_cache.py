"""The KV block manager: reference counts, the prefix cache over free blocks, LRU eviction only when needed."""
import pytest

from atb_llm.runner.cache import BlockManager, OutOfBlocksError


def digest(n: int) -> bytes:
    return n.to_bytes(32, "little")


def test_allocate_and_free_account_every_block():
    manager = BlockManager(num_blocks=6, block_size=4)
    first = manager.allocate(9)  # 3 blocks
    assert len(first) == 3 and manager.num_free == 3 and not manager.all_free
    with pytest.raises(OutOfBlocksError):
        manager.allocate(13)
    manager.free(first)
    assert manager.all_free and manager.num_free == 6
    with pytest.raises(ValueError, match="freed twice"):
        manager.free(first[:1])


def test_registered_blocks_survive_their_request_and_are_shared():
    manager = BlockManager(num_blocks=4, block_size=4)
    blocks = manager.allocate(16)
    for i, block in enumerate(blocks[:3]):
        assert manager.register(block, digest(i))
    assert not manager.register(blocks[3], digest(0)), "one block per content: the first copy is kept"
    manager.free(blocks)
    assert manager.all_free and manager.num_free == 4 and manager.num_cached == 3
    # A later prompt with the same first two blocks, then different content.
    hits = manager.cached_prefix([digest(0), digest(1), digest(7), digest(2)])
    assert hits == blocks[:2] and manager.num_unused(hits) == 2
    manager.acquire(hits)
    assert manager.num_free == 2
    manager.acquire(hits)  # a second user of the same blocks (reference counted)
    manager.free(hits)
    assert manager.num_free == 2
    manager.free(hits)
    assert manager.num_free == 4 and manager.all_free


def test_cached_blocks_are_evicted_last_and_least_recent_first():
    manager = BlockManager(num_blocks=4, block_size=2)
    old = manager.allocate(2)
    manager.register(old[0], digest(1))
    recent = manager.allocate(2)
    manager.register(recent[0], digest(2))
    manager.free(old)
    manager.free(recent)
    plain = manager.allocate(4)  # the two never-cached blocks come first: nothing is evicted
    assert set(plain).isdisjoint(old + recent) and manager.num_cached == 2 and manager.evictions == 0
    manager.free(plain)
    taken = manager.allocate(6)  # now one cached block must go: the least recently freed one
    assert old[0] in taken and recent[0] not in taken
    assert manager.cached_prefix([digest(1)]) == [] and manager.cached_prefix([digest(2)]) == recent
    assert manager.evictions == 1
    manager.free(taken)
    manager.reset_prefix_cache()
    assert manager.num_cached == 0 and manager.cached_prefix([digest(2)]) == []


def test_a_sequence_frees_its_tail_before_its_head():
    """The first blocks of a prompt are the likeliest to be shared: they are reused last."""
    manager = BlockManager(num_blocks=3, block_size=1)
    blocks = manager.allocate(3)
    for i, block in enumerate(blocks):
        manager.register(block, digest(i))
    manager.free(blocks)
    assert manager.allocate(1) == [blocks[2]]
    assert manager.cached_prefix([digest(0), digest(1)]) == blocks[:2]
