"""Runtime behaviour: batching, positions, the shm service path, user text, KV accounting, checkpoints."""
import glob
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from atb_llm.demo.make_demo import make_demo_checkpoint
from atb_llm.models import get_model
from atb_llm.runner.sampler import SamplingParams
from tests.reference import poison_kv_cache, reference_positions
from tests.test_model_equivalence import make_runner, run_with_logits


def greedy(steps: int = 16) -> SamplingParams:
    return SamplingParams(max_new_tokens=steps, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def runner(chat_model_dir):
    return make_runner(chat_model_dir, max_batch_size=4, block_size=4)


def ask(runner, text, video=None, sampling=None):
    content = [{"text": text}] if video is None else [{"video": video}, {"text": text}]
    return runner.prepare_conversation([{"role": "user", "content": content}], sampling or greedy())


def test_batch_invariance(runner, video_6_frames, video_24_frames, video_3_frames):
    inputs = [("What happens first?", video_6_frames), ("Describe this long clip in detail please.", video_24_frames),
              ("Colours?", video_3_frames), ("A question without any video at all, just text.", None)]
    alone = []
    for text, video in inputs:
        request = ask(runner, text, video)
        runner.run([request])
        alone.append(request.output_ids)
    batch = [ask(runner, text, video) for text, video in inputs]
    poison_kv_cache(runner.make_cache_manager())
    engine = runner.make_engine()
    steps_with_four = []
    engine.on_logits = lambda ids, rows: steps_with_four.append(len(ids))
    engine.generate(batch)
    assert max(steps_with_four) == 4, "the four requests never shared a batch"
    assert [len(r.blocks) for r in batch] == [0, 0, 0, 0]
    assert engine.blocks.all_free
    for request, expected in zip(batch, alone):
        assert request.error is None
        assert len(expected) == 16
        assert request.output_ids == expected
    # Sequences span many 4-slot blocks.
    assert len(batch[1].prompt_ids) > 100 * runner.block_size


def test_chat_position_ids_match_model_md(runner, video_6_frames):
    request = ask(runner, "Hi", video_6_frames)
    ids = request.prompt_ids
    positions = list(runner.model.generate_position_ids(np.asarray(ids)))
    # docs/MODEL.md section 5, by hand: bos=0; per frame boi, 64 patches sharing one position, eoi, time index.
    expected = [0]
    for _ in range(6):
        last = expected[-1]
        expected += [last + 1] + [last + 2] * 64 + [last + 3, last + 4]  # "0".."5" are one token each
    prompt_tokens = len(ids) - len(expected)
    expected += [expected[-1] + 1 + i for i in range(prompt_tokens)]
    assert positions == expected
    assert positions[:4] == [0, 1, 2, 2] and positions[65:70] == [2, 3, 4, 5, 6]
    assert positions == reference_positions([i == 128002 for i in ids])


def test_decode_positions_continue_from_last_position(runner, video_6_frames):
    request = ask(runner, "Hi", video_6_frames, greedy(5))
    seen = []
    original = runner.model.forward

    def spy(**kwargs):
        seen.append((kwargs["is_prefill"], kwargs["position_ids"].tolist(), kwargs["input_lengths"].tolist()))
        return original(**kwargs)

    runner.model.forward = spy
    try:
        runner.run([request])
    finally:
        runner.model.forward = original
    prefill_positions = seen[0][1]
    decode_positions = [p[0] for is_prefill, p, _ in seen[1:]]
    assert decode_positions == [prefill_positions[-1] + 1 + i for i in range(4)]
    # KV length is not the position: it grows from the prompt length.
    assert [lengths[0] for _, _, lengths in seen[1:]] == [len(request.prompt_ids) + 1 + i for i in range(4)]
    assert prefill_positions[-1] + 1 < len(request.prompt_ids)


def test_service_path_shm_matches_direct_path(runner, video_6_frames, tmp_path):
    before = set(glob.glob("/dev/shm/psm_*"))
    media = tmp_path / "cache" / "video"
    media.mkdir(parents=True)
    video = str(media / "clip.mp4")
    shutil.copyfile(video_6_frames, video)
    # The runner may hold this content's features already: the shm path is the one that decodes.
    ids = runner.model.router.tokenize([{"video": video}, {"text": "What is shown?"}], use_video_cache=False)
    assert ids.dim() == 1 and ids.dtype == torch.int64
    codes = ids[ids < 0]
    assert len(codes) == 2
    save_path = tmp_path / "cache" / "shm_name.txt"  # the MindIE default: dirname(dirname(video))
    names = save_path.read_text().split()
    assert len(names) == 1 and os.path.exists(f"/dev/shm/{names[0]}")

    direct = ask(runner, "What is shown?", video)
    assert [i if i >= 0 else 128002 for i in ids.tolist()] == direct.prompt_ids
    # Positions from the ids alone agree with the direct path's.
    assert list(runner.model.generate_position_ids(ids.numpy())) == list(
        runner.model.generate_position_ids(np.asarray(direct.prompt_ids)))

    from atb_llm.runner.engine import Request
    from atb_llm.utils.shm_utils import release_shared_memory

    service = Request(prompt_ids=ids.tolist(), sampling=greedy(),
                      on_release=lambda: release_shared_memory(str(save_path)))
    logits = run_with_logits(runner, [service, direct])
    assert service.error is None and direct.error is None
    assert service.output_ids == direct.output_ids
    assert (logits[service.request_id] - logits[direct.request_id]).abs().max().item() < 1e-4
    assert set(glob.glob("/dev/shm/psm_*")) == before, "shared memory left behind"


def test_prefill_from_ids_alone_through_forward(runner, video_6_frames, tmp_path):
    """The framework's own service calls forward with shm codes in the ids and no keyword video."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    video = str(tmp_path / "a" / "b" / "v.mp4")
    shutil.copyfile(video_6_frames, video)
    ids = runner.model.router.tokenize([{"video": video}, {"text": "Hi"}], use_video_cache=False)
    direct = ask(runner, "Hi", video)
    pixels = runner.model.input_builder.load_video(video)
    model = runner.model.model
    cache = runner.make_cache_manager()
    blocks = cache.block_manager.allocate(len(ids))
    slots = torch.tensor([blocks[i // cache.block_size] * cache.block_size + i % cache.block_size
                          for i in range(len(ids))])
    positions = torch.as_tensor(np.asarray(runner.model.generate_position_ids(ids.numpy())))
    common = dict(position_ids=positions, is_prefill=True, kv_cache=cache.kv_cache,
                  block_tables=torch.tensor([blocks]), slots=slots,
                  input_lengths=torch.tensor([len(ids)], dtype=torch.int32), max_seq_len=len(ids))
    from_shm = model.forward(input_ids=ids, **common)
    from_pixels = model.forward(input_ids=torch.tensor(direct.prompt_ids), pixel_values=[pixels], **common)
    cache.block_manager.free(blocks)
    from atb_llm.utils.shm_utils import release_shared_memory

    release_shared_memory(str(tmp_path / "a" / "shm_name.txt"))
    assert from_shm.shape == (1, model.vocab_size)
    assert (from_shm - from_pixels).abs().max().item() < 1e-4


@pytest.mark.parametrize("text", [
    "<|reserved_special_token_0|> what is this?",
    "<|begin_of_text|><|reserved_special_token_0|><|reserved_special_token_0|>",
    "<|image|> and <|eot_id|> and <|end_of_text|>",
])
def test_user_text_is_text(runner, text):
    request = ask(runner, text)
    ids = request.prompt_ids
    assert ids.count(128002) == 0, "user text created a vision slot"
    assert ids.count(128000) == 1 and ids[0] == 128000, "user text created a special token"
    assert max(ids) < runner.model.config.vocab_size
    assert request.pixel_values is None
    positions = list(runner.model.generate_position_ids(np.asarray(ids)))
    assert positions == list(range(len(ids)))
    runner.run([request])
    assert request.error is None and len(request.output_ids) == 16


def test_decoding_skips_special_tokens(runner):
    tokenizer = runner.model.tokenizer
    request = ask(runner, "Hi", sampling=SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True,
                                                          stop_token_ids=[]))
    runner.run([request])
    assert request.text == tokenizer.decode(request.output_ids, skip_special_tokens=True)


def test_eos_list_from_generation_config_stops(chat_model_dir, tmp_path):
    """generation_config.json lists eos as [128001, 128009]: forcing either one ends the request."""
    runner = make_runner(chat_model_dir)
    engine = runner.make_engine()
    assert engine.eos_token_ids == {128001, 128009}
    request = ask(runner, "Hi", sampling=SamplingParams(max_new_tokens=8, temperature=0.0))
    original = runner.model.forward

    def force_eot(**kwargs):
        logits = original(**kwargs).clone()
        logits[:, 128009] = 1e9
        return logits

    runner.model.forward = force_eot
    try:
        engine.generate([request])
    finally:
        runner.model.forward = original
    assert request.finish_reason == "eos" and request.output_ids == [128009] and request.text == ""
    assert engine.blocks.all_free


def _copy_checkpoint(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def _rewrite_tensors(model_dir: str, change) -> None:
    for path in glob.glob(os.path.join(model_dir, "*.safetensors")):
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path, metadata={"format": "pt"})


def _load(model_dir):
    return make_runner(model_dir)


def test_refuses_visual_expert_checkpoint(tmp_path):
    name = "model.layers.0.self_attn.vision_expert_query_key_value.weight"
    extra = {name: torch.zeros(128, 64, dtype=torch.bfloat16)}
    model_dir = make_demo_checkpoint(str(tmp_path / "image_model"), shards=1, extra_tensors=extra)
    with pytest.raises(ValueError, match="visual-expert.*vision_expert_query_key_value"):
        _load(model_dir)


def test_refuses_missing_tensor(tmp_path):
    model_dir = make_demo_checkpoint(str(tmp_path / "m"), shards=1)
    _rewrite_tensors(model_dir, lambda t: t.pop("model.layers.1.mlp.language_mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.language_mlp\.up_proj\.weight is missing"):
        _load(model_dir)


def test_refuses_shape_mismatch(tmp_path):
    model_dir = make_demo_checkpoint(str(tmp_path / "m"), shards=1)

    def shrink(tensors):
        tensors["model.vision.conv.weight"] = tensors["model.vision.conv.weight"][:, :, :1].contiguous()

    _rewrite_tensors(model_dir, shrink)
    with pytest.raises(ValueError, match=r"model\.vision\.conv\.weight has shape \[32, 32, 1, 2\]"):
        _load(model_dir)


def test_sharded_and_single_file_checkpoints_agree(tmp_path, video_3_frames):
    sharded = make_demo_checkpoint(str(tmp_path / "sharded"), seed=7, shards=3)
    single = make_demo_checkpoint(str(tmp_path / "single"), seed=7, shards=1)
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    outputs = []
    for model_dir in (sharded, single):
        runner = make_runner(model_dir)
        request = ask(runner, "Hi", video_3_frames, greedy(4))
        runner.run([request])
        outputs.append(request.output_ids)
    assert outputs[0] == outputs[1]


def test_get_model_resolves_the_plugin_by_model_type(chat_model_dir):
    router = get_model(chat_model_dir)
    assert type(router).__name__ == "Cogvlm2_llama3_videoRouter"
    assert router.model_cls.__name__ == "FlashCogvlm2_llama3_videoForCausalLM"
    assert type(router.config).__name__ == "Cogvlm2_llama3_videoConfig"
    assert router.config.torch_dtype == torch.bfloat16
    assert router.config.num_key_value_heads == 2


def test_config_without_model_type_is_refused(tmp_path, chat_model_dir):
    import json

    model_dir = _copy_checkpoint(chat_model_dir, str(tmp_path / "m"))
    config_path = os.path.join(model_dir, "config.json")
    with open(config_path) as file:
        config = json.load(file)
    del config["model_type"]
    with open(config_path, "w") as file:
        json.dump(config, file)
    with pytest.raises(ValueError, match="model_type"):
        get_model(model_dir)


def test_prepare_prefill_token_for_the_multimodal_runner(runner, video_6_frames):
    """MindIE's multimodal runner passes embeddings as input_ids at prefill, with our position ids."""
    from types import SimpleNamespace

    model = runner.model.model
    embeds, positions = model.prepare_prefill_token(
        SimpleNamespace(text="What is shown?", video=video_6_frames, image=None), runner.model.tokenizer)
    direct = ask(runner, "What is shown?", video_6_frames)
    assert embeds.shape == (len(direct.prompt_ids), model.hidden_size)
    assert positions.tolist() == list(runner.model.generate_position_ids(np.asarray(direct.prompt_ids)))
    cache = runner.make_cache_manager()
    blocks = cache.block_manager.allocate(len(positions))
    slots = torch.tensor([blocks[i // cache.block_size] * cache.block_size + i % cache.block_size
                          for i in range(len(positions))])
    common = dict(position_ids=positions, is_prefill=True, kv_cache=cache.kv_cache, block_tables=torch.tensor([blocks]),
                  slots=slots, input_lengths=torch.tensor([len(positions)]), max_seq_len=len(positions))
    from_embeds = model.forward(input_ids=embeds, **common)
    pixels = runner.model.input_builder.load_video(video_6_frames)
    from_ids = model.forward(input_ids=torch.tensor(direct.prompt_ids), pixel_values=[pixels], **common)
    cache.block_manager.free(blocks)
    assert (from_embeds - from_ids).abs().max().item() < 1e-5


def test_follow_up_skips_decoding_and_the_vision_tower(runner, video_6_frames, video_3_frames, tmp_path):
    model, builder = runner.model.model, runner.model.input_builder
    encoded, decoded = [], []
    original_encode, original_load = model.start_video_encoding, builder.load_video

    def counting_encode(pixels):  # the engine runs the tower through it, a few layers per step when chunking
        encoded.append(pixels.shape[0])
        return original_encode(pixels)

    def counting_load(path):
        decoded.append(os.path.basename(path))
        return original_load(path)

    model.start_video_encoding, builder.load_video = counting_encode, counting_load
    copy = str(tmp_path / "same_content.mp4")  # another name, the same bytes: the same video
    shutil.copyfile(video_6_frames, copy)
    prefix_cache = runner.make_cache_manager().block_manager
    try:
        runner.forget_videos()
        prefix_cache.reset_prefix_cache()  # cached prompt blocks would spare the tower too (a prefix-cache test)
        # Two questions on one video prepared together decode it once; the tower runs once per video.
        first = [ask(runner, "First question?", video_6_frames), ask(runner, "Other video?", video_3_frames),
                 ask(runner, "Again the first?", video_6_frames)]
        runner.run(first)
        assert decoded == ["six.mp4", "three.mp4"] and encoded == [6, 3]
        second = ask(runner, "A second question about the first video?", copy)
        assert second.pixel_values is None and second.vision_embeds is not None  # neither decoded nor encoded
        runner.run([second])
    finally:
        del model.start_video_encoding, builder.load_video  # the class's methods again
    assert decoded == ["six.mp4", "three.mp4"] and encoded == [6, 3]
    assert all(r.error is None for r in [*first, second])
    runner.forget_videos()
    prefix_cache.reset_prefix_cache()
    fresh = ask(runner, "A second question about the first video?", video_6_frames)
    assert fresh.pixel_values is not None
    runner.run([fresh])  # decoded and encoded again: the same answer
    assert second.output_ids == fresh.output_ids


# -- prefix cache and chunked prefill ------------------------------------------------------------------------

def _greedy_with_logits(engine, requests):
    logits = {}
    engine.on_logits = lambda ids, rows: [logits.setdefault(i, []).append(r.clone()) for i, r in zip(ids, rows)]
    engine.generate(requests)
    engine.on_logits = None
    return [torch.stack(logits[r.request_id]) for r in requests]


@pytest.mark.parity
def test_chunked_prefill_and_prefix_cache_match_the_dense_reference(chat_model_dir, video_6_frames):
    """A video prompt prefilled in 48-token chunks while another sequence decodes, then the next turn of its
    conversation reusing the first turn's blocks: greedy tokens equal the dense reference's and logits are
    within 1e-4, over a NaN-poisoned cache (nothing outside a sequence's context is ever read)."""
    from tests.reference import DenseReference
    from tests.test_model_equivalence import video_pixels

    steps = 12
    runner = make_runner(chat_model_dir, max_batch_size=2, block_size=16, max_prefill_tokens=48,
                         max_output_length=steps)
    reference = DenseReference(chat_model_dir)
    poison_kv_cache(runner.make_cache_manager())
    engine = runner.make_engine()
    runner.forget_videos()
    video = [{"type": "video_url", "video_url": video_6_frames}]
    first_turn = [{"role": "user", "content": [*video, {"type": "text", "text": "What happens first?"}]}]
    text = ask(runner, "A text question that decodes meanwhile.", sampling=greedy(steps))
    first = runner.prepare_conversation(first_turn, greedy(steps))
    shared, jobs = [], []
    original, start_encoding = runner.model.forward, runner.model.model.start_video_encoding

    def spy(**kwargs):
        if kwargs["is_prefill"]:
            shared.append(dict(engine.last_step))
        return original(**kwargs)

    def encoding(pixels):
        jobs.append(pixels.shape[0])
        return start_encoding(pixels)

    runner.model.forward, runner.model.model.start_video_encoding = spy, encoding
    try:
        logits = _greedy_with_logits(engine, [text, first])
    finally:
        runner.model.forward = original
        del runner.model.model.start_video_encoding
    assert len(first.prompt_ids) > 400 and first.error is None  # far longer than one chunk: not refused
    assert jobs == [1] * 6, "a frame's tower work costs more than 48 tokens: one frame at a time, over steps"
    assert all(step["prompt_tokens"] <= 48 for step in shared)
    assert sum(1 for step in shared if step["decodes"] and step["prompt_tokens"]) >= 5, shared
    second_turn = [*first_turn, {"role": "assistant", "content": first.text},
                   {"role": "user", "content": "And then?"}]
    second = runner.prepare_conversation(second_turn, greedy(steps))
    logits += _greedy_with_logits(engine, [second])
    common = next((i for i, (a, b) in enumerate(zip(first.prompt_ids, second.prompt_ids)) if a != b),
                  len(first.prompt_ids))
    assert second.cached_tokens >= common // 16 * 16 >= 400, "the second turn recomputed the first turn's prompt"
    stats = engine.cache_stats()["prefix_cache"]
    assert stats["hits"] >= second.cached_tokens and stats["queries"] >= len(second.prompt_ids)
    assert engine.blocks.all_free
    for request, got in zip([text, first, second], logits):
        conversation = ([{"role": "user", "content": "A text question that decodes meanwhile."}]
                        if request is text else first_turn if request is first else second_turn)
        pixels = video_pixels(runner, conversation)
        ids = request.prompt_ids
        tokens, want = reference.greedy(ids, [i == 128002 for i in ids], pixels, steps)
        assert request.output_ids == tokens
        assert (got - want).abs().max().item() < 1e-4


def test_two_videos_with_the_same_text_never_share(chat_model_dir, video_6_frames, tmp_path):
    """Same frame count, same question, so the same token ids: only the videos' content hashes differ."""
    from atb_llm.demo.synthetic_video import write_synthetic_video

    other = write_synthetic_video(str(tmp_path / "other.mp4"), seconds=5, fps=10, size=(96, 64), seed=9)
    same = str(tmp_path / "renamed.mp4")
    shutil.copyfile(video_6_frames, same)
    runner = make_runner(chat_model_dir, max_batch_size=1, block_size=16, max_output_length=8)
    poison_kv_cache(runner.make_cache_manager())
    engine = runner.make_engine()
    a = ask(runner, "Same question?", video_6_frames, greedy(8))
    b = ask(runner, "Same question?", other, greedy(8))
    assert a.prompt_ids == b.prompt_ids
    a_logits, b_logits = _greedy_with_logits(engine, [a]) + _greedy_with_logits(engine, [b])
    assert b.cached_tokens == 0
    again = ask(runner, "Same question?", same, greedy(8))  # the first video's bytes under another name
    again_logits = _greedy_with_logits(engine, [again])[0]
    assert again.cached_tokens == (len(a.prompt_ids) - 1) // 16 * 16
    assert again.output_ids == a.output_ids and (again_logits - a_logits).abs().max().item() < 1e-4
    runner.forget_videos()
    poison_kv_cache(runner.make_cache_manager())
    alone = ask(runner, "Same question?", other, greedy(8))
    alone_logits = _greedy_with_logits(runner.make_engine(), [alone])[0]
    assert alone.output_ids == b.output_ids and (alone_logits - b_logits).abs().max().item() < 1e-5
    assert engine.blocks.all_free
