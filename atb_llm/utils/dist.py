"""Process groups: a single-process stand-in and torch.distributed for tensor parallelism."""
import os

import torch
import torch.distributed as torch_dist


class FakeGroup:
    """A group of one process (or a placeholder exposing only rank/size, as in the framework)."""

    def __init__(self, rank: int = 0, size: int = 1):
        self._rank = rank
        self._size = size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def backend_for(device: torch.device) -> str:
    return {"cuda": "nccl", "npu": "hccl"}.get(device.type, "gloo")


def initialize_distributed(rank: int, world_size: int, device: torch.device | None = None):
    """Returns the tensor-parallel group: FakeGroup for one process, the default group otherwise."""
    if world_size <= 1:
        return FakeGroup(0, 1)
    if not torch_dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        torch_dist.init_process_group(backend_for(device or torch.device("cpu")), rank=rank, world_size=world_size)
    return torch_dist.group.WORLD


def destroy_distributed() -> None:
    """Tear the process group down before exit: left to interpreter shutdown, gloo's threads can abort
    the process ("terminate called without an active exception") and turn a clean exit into a failure."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
