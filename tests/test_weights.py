"""atb_llm/utils/weights.py: tensors by name from safetensors files, and what their reads leave in memory."""
import gc

import pytest
import torch
from safetensors.torch import save_file

from atb_llm.utils.dist import FakeGroup
from atb_llm.utils.weights import Weights

MIB = 1 << 20


def _rss_file_bytes() -> int:
    """Pages of mapped files resident in this process (the RssFile line of /proc/self/status)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile line in /proc/self/status")


@pytest.fixture
def checkpoint(tmp_path):
    tensors = {"kept.weight": torch.randn(256, 1024), "dropped.weight": torch.randn(64 * 256, 1024)}  # 1, 64 MiB
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path, tensors


def test_tensors_equal_the_file_and_shards_split_rows(checkpoint):
    folder, tensors = checkpoint
    weights = Weights(str(folder), "cpu", torch.float32, process_group=FakeGroup(0, 1))
    assert torch.equal(weights.get_tensor("kept.weight"), tensors["kept.weight"])
    assert weights.get_shape("dropped.weight") == [64 * 256, 1024]
    second_half = Weights(str(folder), "cpu", torch.bfloat16, process_group=FakeGroup(1, 2))
    shard = second_half.get_sharded("kept.weight", dim=0)
    assert shard.dtype == torch.bfloat16
    assert torch.equal(shard, tensors["kept.weight"][128:].to(torch.bfloat16))


def test_a_dropped_tensor_takes_its_pages_with_it_while_others_of_its_file_are_kept(checkpoint):
    """A weight transformed at load (quantized, repacked) is read, used and dropped while other tensors of the same
    file stay in the model; the dropped one's file pages must leave the process's RSS with it. (Through one shared
    mapping per file they stayed as long as any tensor of that file lived.)"""
    folder, _ = checkpoint
    weights = Weights(str(folder), "cpu", torch.float32, process_group=FakeGroup(0, 1))
    kept = weights.get_tensor("kept.weight")
    float(kept.sum())  # resident, as a kept weight is once used
    dropped = weights.get_tensor("dropped.weight")
    quantized = dropped.to(torch.int8)  # reads every page of the source
    before = _rss_file_bytes()
    del dropped
    gc.collect()
    released = before - _rss_file_bytes()
    assert released >= 48 * MIB, f"only {released / MIB:.1f} MiB of the dropped 64 MiB tensor left RSS"
    assert kept.shape == (256, 1024) and quantized.numel() == 64 * 256 * 1024
    weights.release_file_handler()
