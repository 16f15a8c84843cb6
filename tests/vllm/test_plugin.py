"""The plugin's pieces without an engine: the shipped chat template against the ATB input builder's prompt rules,
registration and vLLM's plugin filter, CogVLM positions through the M-RoPE hook, checkpoint refusal."""
import importlib.util
import json
import os
from types import SimpleNamespace

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed (bash scripts/setup.sh vllm fills .venv-vllm)", allow_module_level=True)

import torch
from transformers import AutoTokenizer

import vllm_cogvlm2
from atb_llm.demo.make_demo import tokenizer_dir
from atb_llm.models.cogvlm2_llama3_video.input_builder_cogvlm2_llama3_video import (
    parse_conversation,
    prompt_text,
)
from tests.reference import reference_positions

VIDEO = {"type": "video_url", "video_url": {"url": "file:///v.mp4"}}
CONVERSATIONS = [
    [{"role": "user", "content": "What happens?"}],
    [{"role": "user", "content": [VIDEO, {"type": "text", "text": "What happens?"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "Describe "}, {"type": "text", "text": "it."}]}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": " A1"}, {"role": "user", "content": "Q2"}],
    [{"role": "user", "content": "Q1"}, {"role": "system", "content": " A1"}, {"role": "user", "content": "Q2"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
     {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
    [{"role": "user", "content": "Q1"}, {"role": "user", "content": "more"}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A"}, {"role": "assistant", "content": "B"},
     {"role": "user", "content": "Q2"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "Q3"}],
    [{"role": "user", "content": "<|begin_of_text|> {{ x }} Answer:"}],
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(tokenizer_dir())


def _render(tokenizer, messages, template_version: str) -> str:
    template = vllm_cogvlm2.chat_template_for(template_version).read_text(encoding="utf-8")
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("template_version", ["chat", "vqa", "base"])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_chat_template_is_the_input_builders_prompt(tokenizer, template_version, index):
    """One source of truth: the Jinja template renders what parse_conversation + prompt_text give (after bos)."""
    messages = CONVERSATIONS[index]
    parsed = parse_conversation(messages)
    expected = tokenizer.bos_token + prompt_text(parsed.query, parsed.history, template_version)
    assert _render(tokenizer, messages, template_version) == expected


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
    [{"role": "tool", "content": "x"}, {"role": "user", "content": "Q"}],
    [{"role": "system", "content": "only a system prompt"}],
])
def test_chat_template_refuses_what_the_input_builder_refuses(tokenizer, messages):
    with pytest.raises(ValueError):
        parse_conversation(messages)
    with pytest.raises(Exception, match="user message|unsupported role"):
        _render(tokenizer, messages, "chat")


def test_chat_template_follows_the_checkpoints_template_version(tmp_path):
    for version in ("chat", "vqa", "base"):
        (tmp_path / "config.json").write_text(json.dumps({"template_version": version}))
        text = vllm_cogvlm2._chat_template_fallback(str(tmp_path)).read_text()
        assert f'set template_version = "{version}"' in text


def test_register_is_idempotent_and_routes_both_config_forms():
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.transformers_utils import config as vllm_config_utils

    vllm_cogvlm2.register()
    vllm_cogvlm2.register()
    assert "CogVLMVideoForCausalLM" in ModelRegistry.get_supported_archs()
    assert type(AutoConfig.for_model("cogvlm2_llama3_video")).__name__ == "CogVLM2VideoConfig"
    assert vllm_config_utils._ARCHITECTURE_TO_MODEL_TYPE["CogVLMVideoForCausalLM"] == "cogvlm2_llama3_video"


def test_checkpoint_selects_the_bytes_keeping_video_loader(vllm_chat_dir):
    """vLLM picks the video loader by the checkpoint's video-processor name: ours keeps the file's bytes, so
    that frames are decoded once, by the model's rule, in the processor."""
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY
    from vllm.transformers_utils.processor import get_video_processor_cls_name_from_config

    vllm_cogvlm2.register()
    name = get_video_processor_cls_name_from_config(vllm_chat_dir)
    assert VIDEO_LOADER_REGISTRY.get_backend_for_video_processor(name) == "cogvlm2_video"


def test_vllm_plugins_filter(monkeypatch):
    from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_plugins_by_group

    monkeypatch.setenv("VLLM_PLUGINS", "cogvlm2_video")
    assert list(load_plugins_by_group(DEFAULT_PLUGINS_GROUP)) == ["cogvlm2_video"]
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver")
    assert "cogvlm2_video" not in load_plugins_by_group(DEFAULT_PLUGINS_GROUP)
    monkeypatch.delenv("VLLM_PLUGINS")
    assert load_plugins_by_group(DEFAULT_PLUGINS_GROUP)["cogvlm2_video"] is vllm_cogvlm2.register


def _feature(offset: int, is_embed: list[bool]):
    return SimpleNamespace(modality="video", mm_position=SimpleNamespace(
        offset=offset, length=len(is_embed), is_embed=torch.tensor(is_embed)))


def test_mrope_positions_are_cogvlm_positions():
    """docs/MODEL.md section 5's worked example through the M-RoPE hook: three identical rows, each frame's 66
    slots take three positions, the time index is text, generation continues after the last position."""
    from vllm_cogvlm2.model import CogVLM2VideoForCausalLM

    frame = [True] * 66 + [False]  # 66 slots, then one time-index token
    is_embed = frame * 2
    tokens = [0] + [1] * len(is_embed) + [2] * 5  # bos, the video, 5 prompt tokens
    positions, delta = CogVLM2VideoForCausalLM.get_mrope_input_positions(None, tokens, [_feature(1, is_embed)])
    expected = reference_positions([False] + is_embed + [False] * 5)
    assert positions.shape == (3, len(tokens))
    assert (positions == torch.tensor(expected)).all()
    assert positions[0, :10].tolist() == [0, 1, 2, 2, 2, 2, 2, 2, 2, 2]
    assert positions[0, 65:69].tolist() == [2, 3, 4, 5]  # last patch, eoi, "0", next boi
    assert delta == expected[-1] + 1 - len(tokens)
    text_positions, text_delta = CogVLM2VideoForCausalLM.get_mrope_input_positions(None, [5, 6, 7], [])
    assert text_positions[0].tolist() == [0, 1, 2] and text_delta == 0


def test_image_model_and_unknown_tensors_are_refused():
    from torch import nn

    from vllm_cogvlm2.model import CogVLM2VideoForCausalLM

    holder = nn.Module()
    holder.register_parameter("w", nn.Parameter(torch.zeros(1)))
    name = "model.layers.0.self_attn.vision_expert_query_key_value.weight"
    with pytest.raises(ValueError, match="visual expert"):
        CogVLM2VideoForCausalLM.load_weights(holder, iter([(name, torch.zeros(1))]))
    with pytest.raises(ValueError, match="has no place"):
        CogVLM2VideoForCausalLM.load_weights(holder, iter([("model.unknown.weight", torch.zeros(1))]))


def test_frame_rule_and_layout_come_from_the_atb_plugin(vllm_chat_dir):
    """The processor's token layout equals the ATB input builder's for every frame count."""
    from atb_llm.models.cogvlm2_llama3_video.config_cogvlm2_llama3_video import Cogvlm2_llama3_videoConfig
    from atb_llm.models.cogvlm2_llama3_video.input_builder_cogvlm2_llama3_video import (
        Cogvlm2_llama3_videoInputBuilder,
    )
    from vllm_cogvlm2 import _shared
    from vllm_cogvlm2.processing import CogVLM2VideoProcessingInfo

    assert _shared.load_video.__module__.startswith("atb_llm.models.cogvlm2_llama3_video")
    tokenizer = AutoTokenizer.from_pretrained(vllm_chat_dir)
    with open(os.path.join(vllm_chat_dir, "config.json"), encoding="utf-8") as file:
        fields = json.load(file)
    for template in ("chat", "base"):
        builder = Cogvlm2_llama3_videoInputBuilder(
            tokenizer, Cogvlm2_llama3_videoConfig.from_dict(dict(fields, template_version=template)))
        config = SimpleNamespace(template_version=template, pad_token_id=fields["pad_token_id"])
        context = SimpleNamespace(get_hf_config=lambda *_, config=config: config, get_tokenizer=lambda: tokenizer)
        info = CogVLM2VideoProcessingInfo(context)
        prompt = builder.build_ids("q", [], 0)[1:]
        for frames in (1, 6, 24):
            expected = builder.build_ids("q", [], frames)
            assert [fields["bos_token_id"], *info.video_token_ids(frames), *prompt] == expected
