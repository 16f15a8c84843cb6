"""BaseConfig: an HF ``PretrainedConfig`` with the fields and checks the framework relies on."""
from dataclasses import dataclass, fields
from typing import Any

from transformers import PretrainedConfig

from atb_llm.utils import file_utils

# transformers 5 keeps the compute dtype in ``dtype`` (``torch_dtype`` is its alias property); 4.x in ``torch_dtype``.
_READS_DTYPE = isinstance(getattr(PretrainedConfig, "torch_dtype", None), property)


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
        # transformers 5 renamed torch_dtype to dtype; 4.x still reads torch_dtype. Pass the spelling the installed
        # PretrainedConfig reads (it turns a string into a torch.dtype); both stay readable, backed by self.dtype.
        if _READS_DTYPE and "torch_dtype" in kwargs and "dtype" not in kwargs:
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        elif not _READS_DTYPE and "dtype" in kwargs:
            kwargs["torch_dtype"] = kwargs.pop("dtype") or kwargs.get("torch_dtype")
        super().__init__(**kwargs)
        self.parse_obj()

    @property
    def torch_dtype(self):
        return self.dtype

    @torch_dtype.setter
    def torch_dtype(self, value):  # transformers 4.x's PretrainedConfig.__init__ assigns torch_dtype
        self.dtype = value

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "BaseConfig":
        config_dict.update(kwargs)
        config = cls(**config_dict)
        if "top_k" not in config_dict:
            config.top_k = 1000
        config.validate()
        return config

    @classmethod
    def from_pretrained(cls, model_path: str, **kwargs) -> "BaseConfig":
        """Checks the path and reads config.json locally; unlike ``from_dict`` it skips ``validate``."""
        model_path = file_utils.standardize_path(model_path, check_link=False)
        file_utils.check_path_permission(model_path)
        return super().from_pretrained(model_path, local_files_only=True, **kwargs)

    def parse_obj(self) -> None:
        """``generation_config`` as the dataclass of the fields the framework keeps."""
        generation = getattr(self, "generation_config", None)
        if isinstance(generation, dict):
            self.generation_config = GenerationConfig.from_dict(generation)
        elif generation is None:
            self.generation_config = GenerationConfig()

    def validate(self) -> None:
        if not self.max_position_embeddings:
            raise ValueError("config.json must set max_position_embeddings (top level, non-zero)")
        if not self.vocab_size:
            raise ValueError("config.json must set vocab_size (top level, non-zero)")
