"""vllm.LLM with the plugin against the dense fp32 reference (tests/reference.py): greedy tokens must be equal.

One in-process engine per checkpoint (VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps the engine in this process, which
saves two ~25 s interpreter starts on a 2-core machine); the chat engine is closed before the base one starts.
"""
import gc
import importlib.util
import os

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed (bash scripts/setup.sh vllm fills .venv-vllm)", allow_module_level=True)

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import torch
from transformers import AutoTokenizer

from atb_llm.models.cogvlm2_llama3_video.data_preprocess_cogvlm2_llama3_video import (
    load_video,
    load_video_frames,
)
from tests.reference import DenseReference, chat_token_ids

STEPS = 12
BASE_STEPS = 6  # the reference recomputes 1591 tokens a step
QUESTION = "What is the general content of this video?"


def _engine(model_dir: str, media_dir: str):
    from vllm import LLM

    return LLM(model_dir, dtype="float32", enforce_eager=True, max_model_len=2048, max_num_seqs=4, seed=0,
               allowed_local_media_path=media_dir)


def _greedy(steps: int = STEPS, **kwargs):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True, **kwargs)


class _Case:
    """One model directory: its engine, reference and tokenizer."""

    def __init__(self, model_dir: str, media_dir: str):
        self.dir = model_dir
        self.reference = DenseReference(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.llm = _engine(model_dir, media_dir)

    def close(self) -> None:
        """Stop the engine and free the process-wide state a second engine would trip over."""
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
            gc.collect()
            cleanup_dist_env_and_memory()

    def expected(self, query: str, history, pixels, template: str, steps: int = STEPS):
        frames = 0 if pixels is None else pixels.shape[0]
        ids, vision = chat_token_ids(self.tokenizer, self.reference.config, query, history, frames, template)
        tokens, logits = self.reference.greedy(ids, vision, pixels, steps)
        return ids, tokens, logits


@pytest.fixture(scope="module")
def chat(vllm_chat_dir, vllm_media_dir):
    case = _Case(vllm_chat_dir, vllm_media_dir)
    yield case
    case.close()


def test_text_only_matches_reference(chat):
    prompts = [f"Question: {QUESTION} Answer:", "Question: Who are you? Answer:"]
    outputs = chat.llm.generate(prompts, _greedy(logprobs=0))
    for prompt, output in zip(prompts, outputs):
        ids = chat.tokenizer(prompt)["input_ids"]
        tokens, logits = chat.reference.greedy(ids, [False] * len(ids), None, STEPS)
        assert output.prompt_token_ids == ids
        assert list(output.outputs[0].token_ids) == tokens
        # The sampled token's logprob agrees with the reference's distribution (fp32 both sides).
        for step, token in enumerate(tokens):
            expected = torch.log_softmax(logits[step].double(), -1)[token].item()
            assert abs(output.outputs[0].logprobs[step][token].logprob - expected) < 1e-3


def test_chat_video_matches_reference(chat, vllm_video):
    pixels = load_video(vllm_video, template="chat")
    assert pixels.shape[0] == 6  # 5 s: one frame per second, seconds 0..5
    ids, tokens, _ = chat.expected(QUESTION, [], pixels, "chat")
    [output] = chat.llm.generate([{"prompt": f"Question: {QUESTION} Answer:",
                                   "multi_modal_data": {"video": vllm_video}}], _greedy())
    assert output.prompt_token_ids == ids  # bos, per frame 66 slots + the time index, the prompt
    assert list(output.outputs[0].token_ids) == tokens


def test_video_as_frames_or_pixels_answers_the_same(chat, vllm_video):
    """A path, the chosen uint8 frames and the model-ready pixels are three spellings of one input."""
    frames = load_video_frames(vllm_video, template="chat").permute(1, 2, 3, 0).contiguous().numpy()  # [T, H, W, 3]
    pixels = load_video(vllm_video, template="chat")
    prompt = f"Question: {QUESTION} Answer:"
    outputs = chat.llm.generate([{"prompt": prompt, "multi_modal_data": {"video": video}}
                                 for video in (vllm_video, frames, pixels)], _greedy())
    answers = [list(output.outputs[0].token_ids) for output in outputs]
    assert answers[0] == answers[1] == answers[2]


@pytest.mark.parametrize("answer_role", ["system", "assistant"])
def test_two_turn_chat_matches_reference(chat, vllm_video, answer_role):
    """The seed's multi-turn request: the earlier answer comes back as "system" (or "assistant"), the video in the
    second user turn as a file:// URL; the chat template ships with the plugin."""
    first, answer, second = ("what is the general content of this video?", " A bird flies over the sea.",
                             "Please give me a more detailed description.")
    messages = [
        {"role": "user", "content": [{"type": "text", "text": first}]},
        {"role": answer_role, "content": [{"type": "text", "text": answer}]},
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{vllm_video}"}},
                                     {"type": "text", "text": second}]},
    ]
    pixels = load_video(vllm_video, template="chat")
    ids, tokens, _ = chat.expected(second, [(first, answer)], pixels, "chat")
    [output] = chat.llm.chat(messages, _greedy())
    assert output.prompt_token_ids == ids
    assert list(output.outputs[0].token_ids) == tokens


def test_text_chat_matches_reference(chat):
    messages = [{"role": "user", "content": "Who are you?"}]
    ids, tokens, _ = chat.expected("Who are you?", [], None, "chat")
    [output] = chat.llm.chat(messages, _greedy())
    assert output.prompt_token_ids == ids
    assert list(output.outputs[0].token_ids) == tokens


@pytest.fixture(scope="module")
def base(chat, vllm_base_published_dir, vllm_media_dir):
    """Started after the chat engine is closed (module fixtures tear down in reverse order: request `chat`)."""
    chat.close()
    case = _Case(vllm_base_published_dir, vllm_media_dir)
    yield case
    case.close()


def test_base_video_matches_reference_from_published_config(base, vllm_video):
    """config.json as published (no model_type, no torch_dtype): routed by its architecture. Base template:
    24 frames over the first minute in one 66 x 24 slot block, the query alone."""
    pixels = load_video(vllm_video, template="base")
    assert pixels.shape[0] == 24
    ids, tokens, _ = base.expected(QUESTION, [], pixels, "base", BASE_STEPS)
    [output] = base.llm.generate([{"prompt": QUESTION, "multi_modal_data": {"video": vllm_video}}],
                                 _greedy(BASE_STEPS))
    assert output.prompt_token_ids == ids
    assert list(output.outputs[0].token_ids) == tokens
    [chat_output] = base.llm.chat([{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": f"file://{vllm_video}"}}, {"type": "text", "text": QUESTION}]}],
        _greedy(BASE_STEPS))
    assert chat_output.prompt_token_ids == ids
    assert list(chat_output.outputs[0].token_ids) == tokens
