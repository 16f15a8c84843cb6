"""BaseRouter: finds a model's config, tokenizer, input builder and model class by naming rules
(MindIE's ``BaseRouter``; docs/DESIGN.md section 2)."""
import importlib
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import PretrainedConfig

from atb_llm.models.base.config import GenerationConfig
from atb_llm.models.base.input_builder import InputBuilder
from atb_llm.models.base.model_utils import safe_get_tokenizer_from_pretrained
from atb_llm.utils.log import logger


@dataclass
class BaseRouter:
    model_name_or_path: str = ""
    config_dict: Any = None
    is_flash_causal_lm: bool = True
    load_tokenizer: bool = True
    max_position_embeddings: int | None = None
    revision: str | None = None
    tokenizer_path: str | None = None
    trust_remote_code: bool = False
    enable_atb_torch: bool = False
    enable_edge: bool = False
    llm_config: Any = None
    sub_model_path: str = ""
    prealloc_weight_mem_on_npu: bool = False

    _config: Any = None
    _generation_config: Any = None
    _input_builder: Any = None
    _model_cls: Any = None
    _tokenizer: Any = None

    def __post_init__(self):
        self.model_type = self.config_dict["model_type"]
        self.model_type_cap = self.model_type.capitalize()
        if not self.tokenizer_path:
            self.tokenizer_path = self.model_name_or_path

    # Lazy properties: computed once, not meant to be overridden.
    @property
    def config(self):
        if self._config is None:
            generation = self.generation_config
            self.config_dict.update({k: v for k, v in generation.items() if k not in self.config_dict})
            self.config_dict["generation_config"] = generation
            config = self.get_config()
            if not hasattr(config, "quantize"):
                config.quantize = None
            if self.max_position_embeddings:
                config.max_position_embeddings = self.max_position_embeddings
            self._config = config
        return self._config

    @property
    def generation_config(self) -> dict:
        if self._generation_config is None:
            self._generation_config = self.get_generation_config()
        return self._generation_config

    @property
    def input_builder(self):
        if self._input_builder is None:
            self._input_builder = self.get_input_builder()
        return self._input_builder

    @property
    def model_cls(self):
        if self._model_cls is None:
            self._model_cls = self.get_model_cls()
        return self._model_cls

    @property
    def model_version(self) -> str:
        return ""

    @property
    def tokenizer(self):
        if self._tokenizer is None and self.load_tokenizer:
            self._tokenizer = self.get_tokenizer()
        return self._tokenizer

    # Overridable hooks.
    def get_config(self):
        config_cls = self.get_config_cls()
        try:
            config = config_cls.from_dict(dict(self.config_dict))
        except Exception as error:
            logger.warning(f"{config_cls.__name__}.from_dict failed ({error}); using PretrainedConfig")
            config = PretrainedConfig.from_dict(dict(self.config_dict))
        self.check_config(config)
        return config

    def _module_path(self, kind: str) -> str:
        version = f".{self.model_version}" if self.model_version else ""
        return f"atb_llm.models.{self.model_type}{version}.{kind}_{self.model_type}"

    def get_config_cls(self):
        module = importlib.import_module(self._module_path("config"))
        return getattr(module, f"{self.model_type_cap}Config")

    @staticmethod
    def check_config(config) -> None:
        limits = {"num_hidden_layers": (1, 1000), "num_attention_heads": (1, 10000),
                  "hidden_size": (1, 2147483647), "vocab_size": (1, 2147483647),
                  "max_position_embeddings": (1, 2147483647)}
        for name, (low, high) in limits.items():
            value = getattr(config, name, None)
            if value is not None and not low <= value <= high:
                raise ValueError(f"config.{name}={value} is outside [{low}, {high}]")
        vocab = getattr(config, "vocab_size", None)
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(config, name, None)
            if isinstance(value, int) and vocab and not 0 <= value < vocab:
                raise ValueError(f"config.{name}={value} is outside the vocabulary [0, {vocab})")
        for eos in _flatten_ids(getattr(config, "eos_token_id", None)):
            if vocab and not 0 <= eos < vocab:
                raise ValueError(f"eos token id {eos} is outside the vocabulary [0, {vocab})")

    def get_generation_config(self) -> dict:
        path = os.path.join(self.model_name_or_path, "generation_config.json")
        if not os.path.isfile(path):
            return {}
        with open(path, encoding="utf-8") as file:
            return json.load(file)

    def get_tokenizer(self):
        return safe_get_tokenizer_from_pretrained(
            self.tokenizer_path, revision=self.revision, padding_side="left", truncation_side="left",
            trust_remote_code=self.trust_remote_code, use_fast=True)

    def get_input_builder(self):
        return InputBuilder(self.tokenizer, max_length=self.config.max_position_embeddings)

    def get_model_cls(self):
        prefix = "flash_causal" if self.is_flash_causal_lm else "causal"
        module = importlib.import_module(self._module_path(prefix))
        name = f"{self.model_type_cap}ForCausalLM"
        return getattr(module, f"Flash{name}" if self.is_flash_causal_lm else name)

    def tokenize(self, inputs: list[str | dict[str, str]], **kwargs) -> np.ndarray:
        first = inputs[0]
        text = first["text"] if isinstance(first, dict) else first
        return np.array(self.tokenizer.encode(text), dtype=np.int64)


def _flatten_ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    flat = []
    for item in value:
        flat.extend(_flatten_ids(item))
    return flat


__all__ = ["BaseRouter", "GenerationConfig"]
