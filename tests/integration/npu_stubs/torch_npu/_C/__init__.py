"""``torch_npu._C``: the one runtime query MindIE makes at model load (the SoC version)."""

SOC_VERSION = 223  # Ascend910B3 (Atlas 800I A2): bf16 supported, ND KV caches


def _npu_get_soc_version() -> int:
    return SOC_VERSION
