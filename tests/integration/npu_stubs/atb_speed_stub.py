"""Stand-in for ``libatb_speed_torch.so``, the ATB C++ graph runtime MindIE loads with
``torch.classes.load_library`` (real-MindIE integration test only, no NPU present).

MindIE's ``ModelRunner`` makes one ``torch.classes.ModelTorch.ModelTorch`` as a handle for clearing the
graph runtime's internal tensors; our plugin runs no ATB graph, so those calls have nothing to clear.
Anything that would run a graph (``set_param`` / ``execute``, ``OperationTorch``) raises.
"""
import os
import types

import torch

LIBRARY = "libatb_speed_torch.so"


def _noop(*args, **kwargs) -> None:
    return None


def _unavailable(*args, **kwargs):
    raise NotImplementedError("the ATB graph runtime (libatb_speed_torch.so) needs an NPU")


class _ModelTorch:
    def __init__(self, model_name: str):
        self.model_name = model_name

    clear_internal_tensors = reset_execution_status = _noop
    set_param = execute = execute_out = set_weight = set_kv_cache = _unavailable


MODEL_TORCH = types.SimpleNamespace(
    ModelTorch=_ModelTorch,
    Context=types.SimpleNamespace(enable_cache_workspace=_noop, resume_hccl_comm=_noop),
    Event=types.SimpleNamespace(wait=_noop, record=_noop),
)


def install() -> None:
    """Make ``torch.classes.load_library(<...>/libatb_speed_torch.so)`` register the stand-ins."""
    original = torch.classes.load_library

    def load_library(path: str) -> None:
        if os.path.basename(path) != LIBRARY:
            return original(path)
        torch.classes.ModelTorch = MODEL_TORCH
        torch.classes.OperationTorch = types.SimpleNamespace(OperationTorch=_unavailable)
        return None

    torch.classes.load_library = load_library
