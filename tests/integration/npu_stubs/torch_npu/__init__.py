"""Stand-in for ``torch_npu`` when MindIE-LLM's own code runs on a machine without an NPU.

Only for ``tests/integration/test_real_mindie.py``'s driver process; never on ``sys.path`` otherwise.
What it stands in for, and nothing else:

- the NPU device: ``"npu"`` parses as a device type (PyTorch's private-use backend renamed), and every
  tensor asked for on it is made on the CPU (a function mode rewrites ``device=npu`` and ``.npu()``), so
  MindIE's ``torch.zeros(..., device="npu")`` and ``tensor.npu()`` run unchanged;
- ``torch.npu`` (set_device, config, compile mode, synchronize ...) as no-ops over that one device;
- the fused operators our plugin's Ascend backend calls: the documented-semantics fake of
  ``tests/fake_npu/torch_npu`` (counted in ``CALLS``);
- the format helpers MindIE calls on caches and weights (ND only: ``npu_format_cast_`` is the identity);
- ``torch_npu._C``: the SoC version (an Atlas 800I A2, 910B: bf16, no NZ) and HCCL placeholders.
"""
import importlib.util
import os
import sys
import types

import torch
from torch.overrides import TorchFunctionMode

_FAKE_OPS = os.path.join(os.path.dirname(__file__), "..", "..", "..", "fake_npu", "torch_npu", "__init__.py")
_spec = importlib.util.spec_from_file_location("_fake_npu_operators", os.path.abspath(_FAKE_OPS))
_ops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ops)
CALLS = _ops.CALLS
npu_rms_norm = _ops.npu_rms_norm
npu_rotary_mul = _ops.npu_rotary_mul
_npu_reshape_and_cache = _ops._npu_reshape_and_cache
_npu_flash_attention = _ops._npu_flash_attention
_npu_paged_attention = _ops._npu_paged_attention

__version__ = "2.13.0+cpu-stub"
IS_FAKE = True

_CPU = torch.device("cpu")


def _on_cpu(value):
    if isinstance(value, torch.device) and value.type == "npu":
        return _CPU
    if isinstance(value, str) and value.split(":")[0] == "npu":
        return "cpu"
    return value


class _NpuIsCpu(TorchFunctionMode):
    """Every ``device="npu[:i]"`` becomes the CPU; ``Tensor.npu()`` stays where it is."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        if func is torch.Tensor.npu:
            return args[0]
        if func is torch.device:  # the device itself stays "npu": code that asks what it runs on is told the truth
            return func(*args, **(kwargs or {}))
        args = tuple(_on_cpu(a) for a in args)
        kwargs = {k: _on_cpu(v) for k, v in (kwargs or {}).items()}
        return func(*args, **kwargs)


def _noop(*args, **kwargs):
    return None


class _NpuConfig:
    allow_internal_format = False


class _Event:
    def __init__(self, *args, **kwargs):
        pass

    record = wait = synchronize = _noop

    def elapsed_time(self, other) -> float:
        return 0.0


_npu = types.ModuleType("torch.npu")
_npu.__dict__.update(
    is_available=lambda: True, device_count=lambda: 1, current_device=lambda: 0, set_device=_noop,
    synchronize=_noop, empty_cache=_noop, set_compile_mode=_noop, config=_NpuConfig(), Event=_Event,
    get_device_name=lambda *a: "Ascend910B3 (CPU stand-in)", manual_seed=_noop, manual_seed_all=_noop,
    mem_get_info=lambda *a: (64 << 30, 64 << 30), reset_peak_memory_stats=_noop, max_memory_allocated=lambda *a: 0,
    memory_allocated=lambda *a: 0, current_stream=lambda *a: None, is_initialized=lambda: True,
    Stream=_Event,  # one device, one stream: nothing to order
)

torch.utils.rename_privateuse1_backend("npu")
torch._register_device_module("npu", _npu)
torch.utils.generate_methods_for_privateuse1_backend(for_tensor=True, for_module=True, for_storage=False)
npu = _npu
_NpuIsCpu().__enter__()  # for the life of the process: it exists only in the driver


def npu_format_cast_(tensor: torch.Tensor, acl_format: int) -> torch.Tensor:
    return tensor


def npu_format_cast(tensor: torch.Tensor, acl_format: int) -> torch.Tensor:
    return tensor


def get_npu_format(tensor: torch.Tensor) -> int:
    return 2  # ND


def empty_with_format(size, dtype=None, device=None, acl_format=2, **kwargs) -> torch.Tensor:
    return torch.empty(size, dtype=dtype, device=_on_cpu(device))


sys.modules.setdefault("torch_npu.npu", _npu)


class _ProfilerLevel:
    """The level names MindIE's ENV validates ``PROFILING_LEVEL`` against."""

    Level0 = "Level0"
    Level1 = "Level1"
    Level2 = "Level2"
    Level_none = "Level_none"


profiler = types.SimpleNamespace(ProfilerLevel=_ProfilerLevel)
