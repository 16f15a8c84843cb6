"""The paged runtime computes what the dense reference (written from docs/MODEL.md) computes."""
import pytest
import torch
from transformers import AutoTokenizer

from atb_llm.models.cogvlm2_llama3_video.input_builder_cogvlm2_llama3_video import parse_conversation
from atb_llm.runner.offline_runner import MultimodalPARunner
from atb_llm.runner.sampler import SamplingParams
from tests.reference import DenseReference, chat_token_ids, poison_kv_cache

STEPS = 32


def make_runner(model_dir: str, **overrides) -> MultimodalPARunner:
    options = dict(model_path=model_dir, dtype="float32", device="cpu", max_input_length=2048,
                   max_output_length=STEPS, max_batch_size=1, block_size=16)
    options.update(overrides)
    return MultimodalPARunner(**options)


def greedy() -> SamplingParams:
    return SamplingParams(max_new_tokens=STEPS, temperature=0.0, ignore_eos=True)


def run_with_logits(runner: MultimodalPARunner, requests):
    poison_kv_cache(runner.make_cache_manager())
    engine = runner.make_engine()
    logits = {}
    engine.on_logits = lambda ids, rows: [logits.setdefault(i, []).append(r.clone()) for i, r in zip(ids, rows)]
    engine.generate(requests)
    assert engine.blocks.all_free
    return {r.request_id: torch.stack(logits[r.request_id]) for r in requests}


@pytest.fixture(scope="module")
def chat_runner(chat_model_dir):
    return make_runner(chat_model_dir)


@pytest.fixture(scope="module")
def chat_reference(chat_model_dir):
    return DenseReference(chat_model_dir)


@pytest.fixture(scope="module")
def tokenizer(chat_model_dir):
    return AutoTokenizer.from_pretrained(chat_model_dir)


def video_pixels(runner, conversation):
    """The conversation's video as the model takes it, decoded here (the runner may hold its features)."""
    video = parse_conversation(conversation).video
    return None if video is None else runner.model.input_builder.load_video(video)


def check_against_reference(runner, reference, tokenizer, conversation, query, history, template="chat"):
    request = runner.prepare_conversation(conversation, greedy())
    assert request.error is None, request.error
    pixels = video_pixels(runner, conversation)
    frames = 0 if pixels is None else pixels.shape[0]
    ids, is_vision = chat_token_ids(tokenizer, reference.config, query, history, frames, template)
    assert request.prompt_ids == ids, "token layout differs from docs/MODEL.md section 4"
    logits = run_with_logits(runner, [request])[request.request_id]
    ref_tokens, ref_logits = reference.greedy(ids, is_vision, pixels, STEPS)
    assert request.output_ids == ref_tokens
    assert (logits - ref_logits).abs().max().item() < 1e-4
    return frames


@pytest.mark.parity
def test_chat_six_frames(chat_runner, chat_reference, tokenizer, video_6_frames):
    query = "What is happening in this video?"
    conversation = [{"role": "user", "content": [{"video": video_6_frames}, {"text": query}]}]
    assert check_against_reference(chat_runner, chat_reference, tokenizer, conversation, query, []) == 6


def test_chat_twenty_four_frames(chat_runner, chat_reference, tokenizer, video_24_frames):
    query = "Describe every scene."
    conversation = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video_24_frames}},
                                                 {"type": "text", "text": query}]}]
    assert check_against_reference(chat_runner, chat_reference, tokenizer, conversation, query, []) == 24


@pytest.mark.parity
def test_text_only(chat_runner, chat_reference, tokenizer):
    query = "What's deep learning?"
    conversation = [{"role": "user", "content": query}]
    assert check_against_reference(chat_runner, chat_reference, tokenizer, conversation, query, []) == 0


@pytest.mark.parity
def test_three_turn_conversation(chat_runner, chat_reference, tokenizer, video_6_frames):
    history = [("what is the general content of this video?", "Birds fly over the sea."),
               ("Which colours dominate?", "Blue and white.")]
    query = "Please give me a more detailed description."
    conversation = [
        {"role": "user", "content": [{"type": "text", "text": history[0][0]}]},
        {"role": "system", "content": [{"type": "text", "text": history[0][1]}]},  # the seed sends answers as system
        {"role": "user", "content": history[1][0]},
        {"role": "assistant", "content": history[1][1]},
        {"role": "user", "content": [{"type": "video_url", "video_url": video_6_frames},
                                     {"type": "text", "text": query}]},
    ]
    assert check_against_reference(chat_runner, chat_reference, tokenizer, conversation, query, history) == 6


def test_base_template(base_model_dir, video_6_frames, tokenizer):
    runner = make_runner(base_model_dir)
    reference = DenseReference(base_model_dir)
    query = "A video of"
    conversation = [{"role": "user", "content": [{"video": video_6_frames}, {"text": query}]}]
    # The base rule samples 24 frames over the first minute whatever the length.
    assert check_against_reference(runner, reference, tokenizer, conversation, query, [], template="base") == 24
