"""The HF config class vLLM builds for a CogVLM2-Video checkpoint (docs/MODEL.md section 1).

The published checkpoint ships its config as remote code (``auto_map``) and its ``config.json`` carries no
``model_type``; MindIE's instructions add ``"model_type": "cogvlm2_llama3_video"``. The plugin registers this
class for that model type and maps the architecture ``CogVLMVideoForCausalLM`` to it, so both forms load
without ``--trust-remote-code``.
"""
from typing import Any, ClassVar

from transformers import PretrainedConfig

from vllm_cogvlm2._shared import ROPE_THETA, TEMPLATES

MODEL_TYPE = "cogvlm2_llama3_video"
ARCHITECTURE = "CogVLMVideoForCausalLM"

VISION_DEFAULTS = {
    "hidden_size": 1792, "intermediate_size": 15360, "num_heads": 16, "num_hidden_layers": 63,
    "image_size": 224, "patch_size": 14, "num_positions": 257, "layer_norm_eps": 1e-6, "in_channels": 3,
    "hidden_act": "gelu",
}


def _mrope_section(head_dim: int) -> list[int]:
    """Three sections over head_dim / 2. The plugin feeds three identical position rows, so M-RoPE is the
    model's 1-D RoPE whatever the split; declaring a section is what makes vLLM call
    ``get_mrope_input_positions`` (the hook that carries CogVLM's non-contiguous positions)."""
    half = head_dim // 2
    first = half // 4
    second = (half - first) // 2
    return [first, second, half - first - second]


class CogVLM2VideoConfig(PretrainedConfig):
    model_type = MODEL_TYPE
    # transformers 5 validates rope_parameters: the M-RoPE key is ours, not an error
    ignore_keys_at_rope_validation: ClassVar[set[str]] = {"mrope_section"}

    def __init__(self, vocab_size: int = 128256, hidden_size: int = 4096, intermediate_size: int = 14336,
                 num_hidden_layers: int = 32, num_attention_heads: int = 32, num_multi_query_heads: int = 8,
                 hidden_act: str = "silu", max_position_embeddings: int = 2048, rms_norm_eps: float = 1e-5,
                 template_version: str = "chat", vision_config: dict | None = None,
                 bos_token_id: int = 128000, eos_token_id: Any = 128001, pad_token_id: int = 128002,
                 tie_word_embeddings: bool = False, **kwargs):
        # The published config.json names no dtype (MindIE's instructions add torch_dtype): the weights are bf16.
        if kwargs.get("torch_dtype") is None and kwargs.get("dtype") is None:
            kwargs["dtype"] = "bfloat16"
        rope_theta = kwargs.pop("rope_theta", None) or ROPE_THETA  # the checkpoint has none: 500000
        kwargs.pop("rope_parameters", None)
        kwargs.pop("rope_scaling", None)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_multi_query_heads = num_multi_query_heads
        self.num_key_value_heads = num_multi_query_heads  # what vLLM reads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.template_version = template_version
        self.vision_config = dict(VISION_DEFAULTS, **(vision_config or {}))
        self.head_dim = hidden_size // num_attention_heads
        self.rope_theta = rope_theta
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta,
                                "mrope_section": _mrope_section(self.head_dim)}
        self.check()

    def check(self) -> None:
        if self.template_version not in TEMPLATES:
            raise ValueError(f"template_version must be one of {TEMPLATES}, got {self.template_version!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_multi_query_heads:
            raise ValueError("num_attention_heads must be a multiple of num_multi_query_heads")
        vision = self.vision_config
        grid = vision["image_size"] // vision["patch_size"]
        if vision["num_positions"] != grid * grid + 1 or grid % 2:
            raise ValueError(f"vision_config: num_positions must be {grid * grid + 1} and the patch grid even "
                             f"(image_size {vision['image_size']}, patch_size {vision['patch_size']})")
        if vision["hidden_size"] % vision["num_heads"]:
            raise ValueError("vision_config.hidden_size must be a multiple of vision_config.num_heads")
