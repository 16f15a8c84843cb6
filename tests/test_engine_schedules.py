"""Any schedule gives each request the tokens it gets alone.

Hypothesis draws a mix of requests (text, two questions about one video, the same question about another video
with the same frame count, a long prompt, a multi-turn conversation, exact repeats) with arrival steps, and
an engine shape (batch slots, prompt tokens per step, prefix cache on or off, a warm or cold cache). Every
request's greedy tokens must equal those of a plain runner that prefills it whole, alone, over a NaN-poisoned
cache with no prefix cache; the KV blocks must all come back.
"""
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atb_llm.runner.sampler import SamplingParams
from examples.models.cogvlm2_llama3_video.synthetic_video import write_synthetic_video
from tests.reference import poison_kv_cache
from tests.test_model_equivalence import make_runner

NEW_TOKENS = 5


@pytest.fixture(scope="module")
def conversations(video_3_frames, video_dir) -> list[list[dict]]:
    # The same frame count as video_3_frames, other pixels: the same token ids, another video.
    other = write_synthetic_video(os.path.join(video_dir, "three_other.mp4"), seconds=2.5, fps=8, size=(64, 96),
                                  seed=11)
    ask = "What happens in the video?"
    return [
        [{"role": "user", "content": "Hello there, who are you?"}],
        [{"role": "user", "content": "Hello there, what is this?"}],  # shares the template's leading tokens
        [{"role": "user", "content": [{"video": video_3_frames}, {"text": ask}]}],
        [{"role": "user", "content": [{"video": video_3_frames}, {"text": "Which colours do you see?"}]}],
        [{"role": "user", "content": [{"video": other}, {"text": ask}]}],
        [{"role": "user", "content": "A much longer question that goes on and on " * 6}],
        [{"role": "user", "content": [{"video": video_3_frames}, {"text": ask}]},
         {"role": "assistant", "content": "Shapes move around."},
         {"role": "user", "content": "And then?"}],
    ]


def greedy() -> SamplingParams:
    return SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def expected(chat_model_dir, conversations) -> list[list[int]]:
    plain = make_runner(chat_model_dir, max_batch_size=1, block_size=8, max_output_length=NEW_TOKENS,
                        no_prefix_cache=True, vision_cache_mb=0)
    answers = []
    for conversation in conversations:
        poison_kv_cache(plain.make_cache_manager())
        request = plain.prepare_conversation(conversation, greedy())
        plain.run([request])
        assert request.error is None, request.error
        answers.append(request.output_ids)
    assert len({tuple(a) for a in answers}) > 3  # the pool's answers differ: a mix-up would show
    return answers


_RUNNERS: dict = {}


def runner_for(model_dir: str, batch: int, chunk: int, prefix_cache: bool):
    key = (model_dir, batch, chunk, prefix_cache)
    if key not in _RUNNERS:
        _RUNNERS[key] = make_runner(model_dir, max_batch_size=batch, block_size=8, max_output_length=NEW_TOKENS,
                                    max_prefill_tokens=chunk, no_prefix_cache=not prefix_cache)
    return _RUNNERS[key]


schedules = st.fixed_dictionaries({
    "batch": st.sampled_from([1, 2, 4]),
    "chunk": st.sampled_from([-1, 5, 16, 40]),
    "prefix_cache": st.booleans(),
    "cold": st.booleans(),
    # (pool index, arrival step): mostly together, so that repeats and neighbours share prefill steps.
    "requests": st.lists(st.tuples(st.integers(0, 6), st.sampled_from([0, 0, 0, 1, 4])), min_size=1, max_size=6),
})


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(schedule=schedules)
def test_every_schedule_gives_each_request_its_own_tokens(chat_model_dir, conversations, expected, schedule):
    runner = runner_for(chat_model_dir, schedule["batch"], schedule["chunk"], schedule["prefix_cache"])
    if schedule["cold"]:
        poison_kv_cache(runner.make_cache_manager())  # also empties the prefix cache
        runner.vision_cache.clear()
    engine = runner.make_engine()
    pending = sorted(((arrival, index, runner.prepare_conversation(conversations[index], greedy()))
                      for index, arrival in schedule["requests"]), key=lambda item: item[0])
    requests = [(index, request) for _, index, request in pending]
    step = 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            engine.add_request(pending.pop(0)[2])
        engine.step()
        step += 1
        assert step < 500, "the engine stopped making progress"
    for index, request in requests:
        assert request.error is None, request.error
        assert request.output_ids == expected[index], (index, schedule)
    assert engine.blocks.all_free
