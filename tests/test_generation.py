"""Generation controls through the engine: seeds, stop strings and ids, penalties, limits, dtypes."""
import os
import subprocess
import sys

import pytest
import torch

from atb_llm.demo.make_demo import make_demo_checkpoint
from atb_llm.models.cogvlm2_llama3_video.input_builder_cogvlm2_llama3_video import parse_conversation, prompt_text
from atb_llm.runner.engine import Request
from atb_llm.runner.sampler import SamplingParams
from tests.test_model_equivalence import make_runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def runner(chat_model_dir):
    return make_runner(chat_model_dir, max_batch_size=4, block_size=8, max_output_length=64)


def text_request(runner, text, **sampling):
    return runner.prepare_conversation([{"role": "user", "content": text}], SamplingParams(**sampling))


@pytest.mark.parity
def test_seeded_sampling_is_reproducible_and_batch_invariant(runner):
    params = dict(max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95, seed=1234, ignore_eos=True)
    alone = text_request(runner, "Tell me a story.", **params)
    runner.run([alone])
    again = text_request(runner, "Tell me a story.", **params)
    others = [text_request(runner, f"Other question number {i}?", max_new_tokens=12, temperature=1.0, seed=i,
                           ignore_eos=True) for i in range(3)]
    runner.run([others[0], again, others[1], others[2]])
    assert again.output_ids == alone.output_ids
    other_seed = text_request(runner, "Tell me a story.", **dict(params, seed=99))
    runner.run([other_seed])
    assert other_seed.output_ids != alone.output_ids  # 12 tokens from 50 candidates: a clash is ~impossible


def test_greedy_does_not_depend_on_seed(runner):
    a = text_request(runner, "Hello there", max_new_tokens=8, temperature=0.0, seed=1, ignore_eos=True)
    b = text_request(runner, "Hello there", max_new_tokens=8, temperature=0.0, seed=2, ignore_eos=True)
    c = text_request(runner, "Hello there", max_new_tokens=8, temperature=0.7, do_sample=False, ignore_eos=True)
    runner.run([a, b, c])
    assert a.output_ids == b.output_ids == c.output_ids


@pytest.mark.parity
def test_stop_string_cuts_the_text(runner):
    free = text_request(runner, "Say something", max_new_tokens=20, temperature=0.0, ignore_eos=True)
    runner.run([free])
    text = free.text
    assert len(text) > 6
    stop = text[3:6]  # a stop string in the middle of the greedy answer
    stopped = text_request(runner, "Say something", max_new_tokens=20, temperature=0.0, ignore_eos=True, stop=[stop])
    included = text_request(runner, "Say something", max_new_tokens=20, temperature=0.0, ignore_eos=True,
                            stop=[stop], include_stop_str_in_output=True)
    runner.run([stopped, included])
    cut = text.index(stop)
    assert stopped.finish_reason == "stop" and stopped.text == text[:cut]
    assert included.text == text[:cut + len(stop)]
    assert len(stopped.output_ids) < 20


@pytest.mark.parity
def test_stop_token_ids_and_max_new_tokens(runner):
    free = text_request(runner, "Count", max_new_tokens=10, temperature=0.0, ignore_eos=True)
    runner.run([free])
    target = free.output_ids[4]
    stopped = text_request(runner, "Count", max_new_tokens=10, temperature=0.0, ignore_eos=True,
                           stop_token_ids=[target])
    runner.run([stopped])
    first = free.output_ids.index(target)
    assert stopped.finish_reason == "stop" and stopped.output_ids == free.output_ids[:first + 1]
    assert free.finish_reason == "length" and len(free.output_ids) == 10


def test_max_new_tokens_is_capped_by_the_context(chat_model_dir):
    runner = make_runner(chat_model_dir, max_input_length=40, max_output_length=8)
    request = text_request(runner, "Hello", max_new_tokens=1000, temperature=0.0, ignore_eos=True)
    runner.run([request])
    assert request.error is None
    assert len(request.prompt_ids) + len(request.output_ids) == runner.max_seq_len == 48


def test_repetition_penalty_changes_greedy_output(runner):
    plain = text_request(runner, "Repeat repeat repeat", max_new_tokens=24, temperature=0.0, ignore_eos=True)
    penalised = text_request(runner, "Repeat repeat repeat", max_new_tokens=24, temperature=0.0, ignore_eos=True,
                             repetition_penalty=5.0, frequency_penalty=2.0)
    runner.run([plain, penalised])
    assert penalised.output_ids != plain.output_ids
    assert len(set(penalised.output_ids)) >= len(set(plain.output_ids))
    seen = set(penalised.prompt_ids)
    assert sum(t in seen for t in penalised.output_ids) <= sum(t in seen for t in plain.output_ids)


def test_max_prefill_tokens_bounds_the_prompt_tokens_of_a_step(chat_model_dir):
    """Prompts are prefilled at most 30 tokens a step (a longer one in chunks, not refused), decodes share those
    steps, and the greedy tokens are those of whole-prompt prefills."""
    whole = make_runner(chat_model_dir, max_batch_size=4, max_output_length=4)
    runner = make_runner(chat_model_dir, max_batch_size=4, max_prefill_tokens=30, max_output_length=4)
    texts = [f"Question number {i} about something?" for i in range(3)] + ["A much longer question " * 8]

    def requests(of):
        return [text_request(of, text, max_new_tokens=4, temperature=0.0, ignore_eos=True) for text in texts]

    expected = requests(whole)
    whole.run(expected)
    engine = runner.make_engine()
    runner.make_cache_manager().block_manager.reset_prefix_cache()
    steps = []
    original = runner.model.forward

    def spy(**kwargs):
        if kwargs["is_prefill"]:
            steps.append(dict(engine.last_step))
        return original(**kwargs)

    chunked = requests(runner)
    assert len(chunked[-1].prompt_ids) > 30
    runner.model.forward = spy
    try:
        engine.generate(chunked)
    finally:
        runner.model.forward = original
    assert all(step["prompt_tokens"] <= 30 for step in steps) and len(steps) >= 3
    assert any(step["decodes"] for step in steps)
    assert [r.output_ids for r in chunked] == [r.output_ids for r in expected]
    assert all(r.error is None for r in chunked) and engine.blocks.all_free


@pytest.mark.parametrize("storage", [torch.float16, torch.float32])
@pytest.mark.parity
def test_checkpoint_storage_dtypes(tmp_path, storage, video_3_frames):
    model_dir = make_demo_checkpoint(str(tmp_path / str(storage)), seed=5, shards=1, dtype=storage)
    for compute in ("float32", "bfloat16"):
        runner = make_runner(model_dir, dtype=compute)
        assert runner.model.model.lm_head.weight.dtype == getattr(torch, compute)
        request = runner.prepare_conversation([{"role": "user", "content": [{"video": video_3_frames},
                                                                             {"text": "Hi"}]}],
                                              SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True))
        runner.run([request])
        assert request.error is None and len(request.output_ids) == 3


@pytest.mark.parity
def test_float16_on_cpu_computes_in_bfloat16(chat_model_dir):
    runner = make_runner(chat_model_dir, dtype="float16")
    assert runner.model.dtype == torch.bfloat16


def test_prompt_templates():
    history = [("q1", "a1")]
    assert prompt_text("q2", history, "chat") == "Question: q1 Answer: a1\nQuestion: q2 Answer:"
    assert prompt_text("q2", history, "vqa") == "Question: q1 Short answer: a1\nQuestion: q2 Short answer:"
    assert prompt_text("a cat", [], "base") == "a cat"


def test_conversation_parsing_rules():
    parsed = parse_conversation([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "First?"}]},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "/v.mp4"}}, {"text": "Then?"}]},
    ])
    assert parsed.history == [("Be brief.\nFirst?", "Yes.")] and parsed.query == "Then?" and parsed.video == "/v.mp4"
    for bad, message in [([], "non-empty"), ([{"role": "assistant", "content": "x"}], "end with a user"),
                         ([{"role": "user", "content": [{"type": "image_url", "image_url": "/a.jpg"}]}], "images"),
                         ([{"role": "tool", "content": "x"}], "unsupported role"),
                         ([{"role": "user", "content": [{"video": "/a.mp4"}, {"video": "/b.mp4"}]}], "one video"),
                         ([{"role": "user", "content": 5}], "string or a list")]:
        with pytest.raises(ValueError, match=message):
            parse_conversation(bad)


def test_shared_run_pa_text_runner(chat_model_dir):
    command = [sys.executable, "-m", "examples.run_pa", "--model_path", chat_model_dir, "--input_texts",
               "What's deep learning?", "Hi", "--max_batch_size", "2", "--max_output_length", "4", "--is_chat_model",
               "--ignore_eos", "--block_size", "16"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Answer[0]" in done.stderr and "Answer[1]" in done.stderr and "decode_tokens" in done.stderr


def test_run_pa_sh_single_device(chat_model_dir, video_3_frames, tmp_path):
    results = tmp_path / "r.json"
    env = dict(os.environ, ASCEND_RT_VISIBLE_DEVICES="0", PYTHON=sys.executable)
    done = subprocess.run(["bash", "examples/models/cogvlm2_llama3_video/run_pa.sh", "--model_path", chat_model_dir,
                           "--video_path", video_3_frames, "--max_output_length", "3", "--ignore_eos",
                           "--results_save_path", str(results)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert results.exists() and "Answer[0]" in done.stderr


def test_engine_refuses_empty_prompt(runner):
    engine = runner.make_engine()
    with pytest.raises(ValueError, match="empty"):
        engine.add_request(Request(prompt_ids=[], sampling=SamplingParams()))


def test_runner_input_file_conversations(chat_model_dir, video_3_frames, tmp_path):
    import json

    conversations = tmp_path / "conversations.jsonl"
    lines = [
        [{"role": "user", "content": "what is the general content of this video?"},
         {"role": "system", "content": "Birds over the sea."},
         {"role": "user", "content": [{"type": "video_url", "video_url": video_3_frames},
                                      {"type": "text", "text": "Please give me a more detailed description."}]}],
        {"messages": [{"role": "tool", "content": "not a model role"}]},
    ]
    conversations.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    results = tmp_path / "results.json"
    done = subprocess.run([sys.executable, "-m", "examples.models.cogvlm2_llama3_video.run_pa", "--model_path",
                           chat_model_dir, "--input_file", str(conversations), "--max_output_length", "3",
                           "--ignore_eos", "--results_save_path", str(results)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    good, bad = json.loads(results.read_text())
    assert good["input_text"] == "Please give me a more detailed description."
    assert good["video_path"] == video_3_frames and len(good["output_token_ids"]) == 3
    assert bad["finish_reason"] == "error" and "unsupported role 'tool'" in bad["error"]


@pytest.mark.parity
def test_logprobs_are_the_models_distribution(runner):
    request = text_request(runner, "Hello", max_new_tokens=4, temperature=0.0, ignore_eos=True, logprobs=3)
    plain = text_request(runner, "Hello", max_new_tokens=4, temperature=0.0, ignore_eos=True)
    engine = runner.make_engine()
    rows = {}
    engine.on_logits = lambda ids, logits: [rows.setdefault(i, []).append(r.clone()) for i, r in zip(ids, logits)]
    outputs = []
    for r in (request, plain):
        engine.add_request(r)
    while engine.has_unfinished():
        outputs += engine.step()
    assert plain.output_ids == request.output_ids and plain.output_logprobs == []
    mine = [o for o in outputs if o.request_id == request.request_id]
    assert [o.logprobs[0] for o in mine] == request.output_logprobs and len(mine) == 4
    for step, (output, logits) in enumerate(zip(mine, rows[request.request_id])):
        expected = torch.log_softmax(logits.float(), -1)
        token = request.output_ids[step]
        assert abs(output.logprobs[0] - expected[token].item()) < 1e-5
        top_ids = [t for t, _ in output.top_logprobs[0]]
        assert top_ids == torch.topk(expected, 3).indices.tolist() and top_ids[0] == token  # greedy: the top one
    assert all(o.logprobs is None for o in outputs if o.request_id == plain.request_id)


@pytest.mark.parity
def test_identical_prompts_are_prefilled_once(runner, video_3_frames):
    """The n sequences of one request share one prefill; each still samples with its own seed."""
    def request(seed):
        return runner.prepare_conversation(
            [{"role": "user", "content": [{"video": video_3_frames}, {"text": "Describe it."}]}],
            SamplingParams(max_new_tokens=10, temperature=1.0, top_k=20, seed=seed, ignore_eos=True))

    alone = []
    for seed in (1, 2, 3):
        single = request(seed)
        runner.run([single])
        alone.append(single.output_ids)
    prefill_tokens = []
    original = runner.model.forward

    def spy(**kwargs):
        if kwargs["is_prefill"]:
            prefill_tokens.append(int(kwargs["input_ids"].numel()))
        return original(**kwargs)

    together = [request(seed) for seed in (1, 2, 3)]
    runner.make_cache_manager().block_manager.reset_prefix_cache()  # else the runs above hand the prompt over
    runner.model.forward = spy
    try:
        engine = runner.make_engine()
        engine.generate(together)
    finally:
        runner.model.forward = original
    assert prefill_tokens == [len(together[0].prompt_ids)]  # one prefill of one copy
    assert [r.output_ids for r in together] == alone
    assert len({tuple(ids) for ids in alone}) > 1  # the seeds did make them differ
    assert engine.blocks.all_free

    # A different prompt finishing its prefill in the same step after a leader with siblings: each samples
    # from its own logits row (siblings share their leader's).
    other = runner.prepare_conversation([{"role": "user", "content": [{"text": "Something else."}]}],
                                        SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True))
    runner.run([other])
    mixed = [request(1), request(2), runner.prepare_conversation(
        [{"role": "user", "content": [{"text": "Something else."}]}],
        SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True))]
    runner.make_cache_manager().block_manager.reset_prefix_cache()
    engine = runner.make_engine()
    engine.generate(mixed)
    assert [r.error for r in mixed] == [None] * 3
    assert [r.output_ids for r in mixed] == [alone[0], alone[1], other.output_ids]
    assert engine.blocks.all_free
