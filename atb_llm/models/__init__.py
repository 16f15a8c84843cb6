"""get_model: config.json ``model_type`` -> the model's router (MindIE's resolution rules: docs/DESIGN.md section 2)."""
import importlib
import os

from transformers import PretrainedConfig

from atb_llm.utils import file_utils

_MODELS_DIR = os.path.dirname(os.path.abspath(__file__))


def get_model(model_name_or_path: str, is_flash_causal_lm: bool = True, load_tokenizer: bool = True,
              max_position_embeddings=None, revision=None, tokenizer_path=None, trust_remote_code: bool = False,
              enable_atb_torch: bool = False, enable_edge: bool = False, llm_config_path=None, models_dict=None,
              sub_model_path: str = ""):
    model_name_or_path = file_utils.standardize_path(model_name_or_path, check_link=False)
    file_utils.check_path_permission(model_name_or_path)
    if not os.path.isfile(os.path.join(model_name_or_path, "config.json")):
        raise FileNotFoundError(f"{model_name_or_path} has no config.json")
    config_dict, _ = PretrainedConfig.get_config_dict(model_name_or_path, local_files_only=True)
    model_type = config_dict.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"{model_name_or_path}/config.json has no model_type; add "
                         '"model_type": "cogvlm2_llama3_video" for CogVLM2-Video')
    model_type = model_type.lower()
    config_dict["model_type"] = model_type

    supported = [name for name in file_utils.safe_listdir(_MODELS_DIR)
                 if os.path.isdir(os.path.join(_MODELS_DIR, name)) and name != "base" and not name.startswith("_")]
    if model_type not in supported:
        raise NotImplementedError(f"model_type {model_type!r} is not supported; supported: {sorted(supported)}")
    module = importlib.import_module(f"atb_llm.models.{model_type}.router_{model_type}")
    router_cls = getattr(module, model_type.capitalize() + "Router")
    return router_cls(model_name_or_path, config_dict, is_flash_causal_lm, load_tokenizer, max_position_embeddings,
                      revision, tokenizer_path, trust_remote_code, enable_atb_torch, enable_edge, None,
                      sub_model_path)
