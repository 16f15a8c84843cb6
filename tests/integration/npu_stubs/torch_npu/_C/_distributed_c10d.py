"""``torch_npu._C._distributed_c10d``: HCCL process groups. One process here, so none is ever made; the
names exist so MindIE's modules import, and using one raises."""


def __getattr__(name: str):
    def unavailable(*args, **kwargs):
        raise NotImplementedError(f"torch_npu._C._distributed_c10d.{name}: HCCL needs an NPU")

    placeholder = type(name, (), {"__init__": unavailable})
    globals()[name] = placeholder
    return placeholder
