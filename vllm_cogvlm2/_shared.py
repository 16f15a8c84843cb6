"""The one place this plugin takes CogVLM2-Video model knowledge from: the ATB plugin's own modules.

Frame choice, decoding and the frame transform (docs/MODEL.md section 3), the prompt text and the
conversation rules (section 4) and the CogVLM position ids (section 5) live in
``atb_llm/models/cogvlm2_llama3_video/``; the vLLM plugin imports them from there instead of keeping a
second copy. Only those model modules are imported, never the portable host (engine, runner, ``Weights``,
``ModelRunner``).

``atb_llm`` must be importable. From a checkout (``pip install -e ./vllm_cogvlm2``, what
``scripts/setup.sh vllm`` does) the checkout holding this package is put on ``sys.path`` when it is not;
elsewhere install or point ``PYTHONPATH`` at a tree that has ``atb_llm/models/cogvlm2_llama3_video``
(a MindIE ``atb_models`` tree where the model was installed does).
"""
import importlib.util
import os
import sys

_MODEL_PACKAGE = "atb_llm.models.cogvlm2_llama3_video"


def _checkout_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ensure_importable() -> None:
    try:
        if importlib.util.find_spec(_MODEL_PACKAGE) is not None:
            return
    except ImportError:  # no atb_llm at all
        pass
    root = _checkout_root()
    if os.path.isdir(os.path.join(root, *_MODEL_PACKAGE.split("."))):
        sys.path.append(root)
        return
    raise ImportError(
        f"vllm_cogvlm2 needs the CogVLM2-Video model package {_MODEL_PACKAGE!r} (frame choice, prompt text, "
        "position ids). Install the plugin from a checkout with `pip install -e ./vllm_cogvlm2`, or put a tree "
        "holding atb_llm/models/cogvlm2_llama3_video on PYTHONPATH.")


_ensure_importable()

# ruff: noqa: E402
from atb_llm.models.cogvlm2_llama3_video.config_cogvlm2_llama3_video import (  # noqa: F401
    ROPE_THETA,
    TEMPLATES,
    VISION_TOKENS_PER_FRAME,
)
from atb_llm.models.cogvlm2_llama3_video.data_preprocess_cogvlm2_llama3_video import (  # noqa: F401
    IMAGE_SIZE,
    NUM_FRAMES,
    VideoError,
    load_video,
    transform_frames,
)
from atb_llm.models.cogvlm2_llama3_video.input_builder_cogvlm2_llama3_video import (  # noqa: F401
    ANSWER_ROLES,
    parse_conversation,
    prompt_text,
    vision_aware_positions,
)
