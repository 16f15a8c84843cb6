"""BaseConfig: an HF ``PretrainedConfig`` with the fields and checks the framework relies on."""
from dataclasses import dataclass, fields
from typing import Any

from transformers import PretrainedConfig


@dataclass
class GenerationConfig:
    """The generation fields the framework keeps from ``generation_config.json``."""

    max_new_tokens: int | None = None
    pad_token_id: int | None = None
    eos_token_id: Any = None
    max_length: int | None = None
    user_token_id: int | None = None
    assistant_token_id: int | None = None
    system_token_id: int | None = None
    bot_token_id: int | None = None

    @classmethod
    def from_dict(cls, values: dict) -> "GenerationConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class BaseConfig(PretrainedConfig):
    max_position_embeddings: int = 0
    vocab_size: int = 0
    quantize: str | None = None
    rope_scaling: Any = None
    quantization_config: Any = None
    reasoning_config: Any = None
    generation_config: Any = None
    is_reasoning_model: bool = False

    def __init__(self, **kwargs):
        # transformers 5 renamed torch_dtype to dtype; keep both spellings readable.
        if "torch_dtype" in kwargs and "dtype" not in kwargs:
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        super().__init__(**kwargs)
        generation = getattr(self, "generation_config", None)
        if isinstance(generation, dict):
            self.generation_config = GenerationConfig.from_dict(generation)
        elif generation is None:
            self.generation_config = GenerationConfig()

    @property
    def torch_dtype(self):
        return self.dtype

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "BaseConfig":
        config_dict.update(kwargs)
        config = cls(**config_dict)
        if getattr(config, "top_k", None) is None:
            config.top_k = 1000
        config.validate()
        return config

    def validate(self) -> None:
        if not self.max_position_embeddings:
            raise ValueError("config.json must set max_position_embeddings (top level, non-zero)")
        if not self.vocab_size:
            raise ValueError("config.json must set vocab_size (top level, non-zero)")
