"""Tensor-parallel collectives of the plugin, with ``torch.distributed`` only.

The plugin gets its rank and world size from ``weights.process_group`` (``rank()`` / ``size()``), as every
framework model does. What that object is differs between hosts:

- the portable host hands over a real ``torch.distributed`` group (gloo on CPU, nccl on CUDA);
- MindIE's ``ModelRunner`` hands over a ``FakeGroup`` that only knows rank and size: its own
  communicators live in the ATB graph, which this pure-PyTorch plugin does not use.

``resolve_group`` turns either into a ``torch.distributed`` group: a real group is used as it is; for a
placeholder the default group is used, initialised here when nobody has done so yet (hccl on Ascend,
nccl on CUDA, gloo on CPU; ``MASTER_ADDR`` / ``MASTER_PORT`` come from torchrun, as in ``run_pa.sh``).
"""
import os

import torch
import torch.distributed as torch_dist

_BACKENDS = {"npu": "hccl", "cuda": "nccl"}


def resolve_group(process_group, device: torch.device | str | None = None):
    """The ``torch.distributed`` group matching ``process_group``; None for a single process."""
    world = process_group.size()
    if world <= 1:
        return None
    if isinstance(process_group, torch_dist.ProcessGroup):
        return process_group
    if not torch_dist.is_initialized():
        device_type = torch.device(device).type if device is not None else "cpu"
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        torch_dist.init_process_group(_BACKENDS.get(device_type, "gloo"), rank=process_group.rank(),
                                      world_size=world)
    group = torch_dist.group.WORLD
    if torch_dist.get_world_size(group) != world or torch_dist.get_rank(group) != process_group.rank():
        raise RuntimeError(f"torch.distributed's default group (rank {torch_dist.get_rank(group)} of "
                           f"{torch_dist.get_world_size(group)}) does not match the weights' process group "
                           f"(rank {process_group.rank()} of {world})")
    return group


def all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    """Sum of ``tensor`` over the ranks, in place (no-op for a single process)."""
    if group is not None:
        torch_dist.all_reduce(tensor, group=group)
    return tensor


def all_gather_last_dim(tensor: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along the last dimension, in rank order."""
    if group is None:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(torch_dist.get_world_size(group))]
    torch_dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=-1)
