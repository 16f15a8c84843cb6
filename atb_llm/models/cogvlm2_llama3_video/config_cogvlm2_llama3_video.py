"""Config of cogvlm2-video-llama3-chat: the HF config.json fields of docs/MODEL.md section 1."""
from dataclasses import dataclass
from typing import Any

from atb_llm.models.base.config import BaseConfig

# The checkpoint has no rope_theta field; the model was trained with this base.
ROPE_THETA = 500000.0
VISION_TOKENS_PER_FRAME = 66  # boi + 8x8 patches + eoi
TEMPLATES = ("chat", "base", "vqa")


@dataclass
class VisionConfig:
    hidden_size: int = 1792
    intermediate_size: int = 15360
    num_heads: int = 16
    num_hidden_layers: int = 63
    image_size: int = 224
    patch_size: int = 14
    num_positions: int = 257
    layer_norm_eps: float = 1e-6
    in_channels: int = 3
    hidden_act: str = "gelu"

    @classmethod
    def from_dict(cls, values: dict) -> "VisionConfig":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class Cogvlm2_llama3_videoConfig(BaseConfig):
    model_type: str = "cogvlm2_llama3_video"
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_attention_heads: int = 32
    num_multi_query_heads: int = 8
    num_hidden_layers: int = 32
    rms_norm_eps: float = 1e-5
    vocab_size: int = 128256
    max_position_embeddings: int = 2048
    bos_token_id: int = 128000
    eos_token_id: Any = 128001
    pad_token_id: int = 128002
    template_version: str = "chat"
    rope_theta: float = ROPE_THETA
    vision_config: Any = None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        vision = kwargs.get("vision_config") or {}
        self.vision_config = vision if isinstance(vision, VisionConfig) else VisionConfig.from_dict(vision)
        # The framework's runtime reads num_key_value_heads; the checkpoint calls them multi-query heads.
        self.num_key_value_heads = self.num_multi_query_heads
        if getattr(self, "rope_theta", None) is None:
            self.rope_theta = ROPE_THETA

    def validate(self) -> None:
        super().validate()
        if self.template_version not in TEMPLATES:
            raise ValueError(f"template_version must be one of {TEMPLATES}, got {self.template_version!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_multi_query_heads:
            raise ValueError("num_attention_heads must be a multiple of num_multi_query_heads")
        vision = self.vision_config
        grid = vision.image_size // vision.patch_size
        if vision.num_positions != grid * grid + 1:
            raise ValueError(f"vision_config.num_positions must be {grid * grid + 1} for image_size "
                             f"{vision.image_size} and patch_size {vision.patch_size}")
        if grid % 2:
            raise ValueError("the vision patch grid must be even (2x2 downsampling conv)")
