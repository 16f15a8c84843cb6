"""Stand-in for ``_libatb_torch``, the Python binding of the Ascend Transformer Boost graph library
(real-MindIE integration test only, no NPU present).

MindIE's ATB-graph models build their networks with it; our plugin is plain PyTorch and never does. Every
name resolves to a placeholder class that can be subclassed or referenced at import time, and raises if
anything tries to use it, so a code path that really needs ATB fails loudly instead of silently.
"""


def __getattr__(name: str):
    def unavailable(*args, **kwargs):
        raise NotImplementedError(f"_libatb_torch.{name}: the ATB graph library needs an NPU")

    placeholder = type(name, (), {"__init__": unavailable, "__call__": unavailable})
    globals()[name] = placeholder
    return placeholder
