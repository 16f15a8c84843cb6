"""The service's n / best_of, logprobs and the extra routes (/v1/completions, /infer, the Triton token route and
/stopInfer), against a real server subprocess on the tiny checkpoint (``Server`` from test_service.py).

``test_zz_everything_released`` checks that every KV block is free and no shared-memory segment is left, after
requests that fan one decoded video out to several sequences; the very last test stops the server with SIGTERM
while a stream runs (--shutdown-timeout: the stream ends normally, the exit status is 0).
"""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import time

import httpx
import pytest

from tests.test_service import Server, _sse, _tgi_body, clip, media_dir  # noqa: F401  (fixtures)

MAX_BATCH = 8
OA = {"model": "cogvlm2", "messages": [{"role": "user", "content": "Tell me a story."}]}
CO = {"model": "cogvlm2", "prompt": "Once upon a time"}


@pytest.fixture(scope="module")
def server(chat_model_dir, media_dir):  # noqa: F811
    srv = Server(chat_model_dir, media_dir, "--max-batch-size", str(MAX_BATCH), "--max-seq-len", "640",
                 "--shutdown-timeout", "60")  # drains on SIGTERM: the last test
    yield srv
    assert srv.stop() == 0, srv.output()


def _cumulative(choice: dict) -> float:
    return sum(entry["logprob"] for entry in choice["logprobs"]["content"])


# -- n / best_of ---------------------------------------------------------------------------------------

def test_vllm_n_best_of_shapes_seeded_and_sorted(server):
    body = {"prompt": "Tell me a story.", "n": 2, "best_of": 3, "temperature": 1.0, "seed": 11, "max_tokens": 6}
    first = server.client.post("/generate", json=body)
    assert first.status_code == 200, first.text
    texts = first.json()["text"]
    assert list(first.json()) == ["text"] and len(texts) == 3  # max(best_of, n) entries
    assert all(t.startswith("Tell me a story. ") for t in texts)
    assert server.client.post("/generate", json=body).json() == first.json()  # seeded: reproducible
    other = server.client.post("/generate", json={**body, "seed": 12}).json()["text"]
    assert other != texts
    only_n = server.client.post("/generate", json={**body, "best_of": None, "n": 4}).json()["text"]
    assert len(only_n) == 4


def test_chat_best_of_keeps_the_best_n_by_cumulative_logprob(server):
    base = {**OA, "temperature": 1.0, "seed": 2024, "max_tokens": 6, "ignore_eos": True, "logprobs": True}
    every = server.client.post("/v1/chat/completions", json={**base, "n": 4, "best_of": 4}).json()
    assert [c["index"] for c in every["choices"]] == [0, 1, 2, 3]
    assert every["usage"]["completion_tokens"] == 24
    assert all(len(c["logprobs"]["content"]) == 6 for c in every["choices"])
    ranked = sorted(every["choices"], key=_cumulative, reverse=True)
    best = server.client.post("/v1/chat/completions", json={**base, "n": 2, "best_of": 4}).json()
    assert [c["index"] for c in best["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in best["choices"]] == [c["message"]["content"] for c in ranked[:2]]
    scores = [_cumulative(c) for c in best["choices"]]
    assert scores[0] >= scores[1] >= max(_cumulative(c) for c in ranked[2:]) - 1e-6
    assert best["usage"]["completion_tokens"] == 24  # all generated tokens, the dropped sequences too
    # best_of without logprobs requested: ranked the same way, and no logprobs in the answer.
    quiet = server.client.post("/v1/chat/completions", json={**base, "logprobs": None, "n": 2, "best_of": 4}).json()
    assert [c["message"]["content"] for c in quiet["choices"]] == [c["message"]["content"] for c in best["choices"]]
    assert all(c["logprobs"] is None for c in quiet["choices"])


def test_chat_stream_with_n_has_per_sequence_deltas(server):
    body = {**OA, "temperature": 0.8, "seed": 7, "max_tokens": 8, "n": 3}
    plain = server.client.post("/v1/chat/completions", json=body).json()
    assert len(plain["choices"]) == 3
    raw = server.client.post("/v1/chat/completions", json={**body, "stream": True})
    assert raw.content.endswith(b"data: [DONE]\n\n")
    chunks = [json.loads(c) for c in _sse(raw.content, b"data: ")[:-1]]
    assert [c["choices"][0]["index"] for c in chunks[:3]] == [0, 1, 2]
    assert all(c["choices"][0]["delta"] == {"role": "assistant", "content": ""} for c in chunks[:3])
    texts, finishes = ["", "", ""], [None] * 3
    for c in chunks[3:]:
        choice = c["choices"][0]
        assert choice["delta"]["role"] == "assistant"
        texts[choice["index"]] += choice["delta"]["content"]
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
            assert "usage" in c
    assert texts == [c["message"]["content"] for c in plain["choices"]]
    assert all(finishes)
    assert chunks[-1]["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]


def test_vllm_stream_with_n_has_one_slot_per_sequence(server, clip):  # noqa: F811
    body = {"prompt": [{"type": "text", "text": "Describe."}, {"type": "video_url", "video_url": clip}],
            "n": 2, "temperature": 1.0, "seed": 3, "max_tokens": 6}
    full = server.client.post("/generate", json=body).json()["text"]
    raw = server.client.post("/generate", json={**body, "stream": True})
    assert raw.content.endswith(b"\0")
    chunks = [json.loads(c)["text"] for c in raw.content[:-1].split(b"\0")]
    assert all(len(c) == 2 for c in chunks)
    streamed = ["Describe. " + "".join(c[i] for c in chunks) for i in range(2)]
    assert sorted(streamed) == sorted(full)


N_BEST_OF_ERRORS = [
    ("/generate", {"prompt": "hi", "n": 0}, "Parameter [n] should be in [1, 8192], got 0."),
    ("/generate", {"prompt": "hi", "n": 1.5}, "n must be unsigned type."),
    ("/generate", {"prompt": "hi", "best_of": 129}, "Parameter [best_of] should be in [1, 128], got 129."),
    ("/generate", {"prompt": "hi", "n": MAX_BATCH + 1, "temperature": 1},
     f"The n parameter ({MAX_BATCH + 1}) exceeds 'max_batch_size' ({MAX_BATCH}). Please reduce n or increase "
     "'max_batch_size' in config.json of mindie-service."),
    ("/generate", {"prompt": "hi", "n": 3, "best_of": 2, "temperature": 1},
     "best_of should greater than or equal to n, but best_of is 2, n is 3."),
    ("/generate", {"prompt": "hi", "best_of": 2},
     "Best_of/N can not greater than 1 when temperature is 0 or not set, but best_of is 2, n is None."),
    ("/v1/chat/completions", {**OA, "n": 3, "best_of": 2, "temperature": 1},
     "best_of must be greater than or equal to n, but best_of is 2, n is 3."),
    ("/v1/chat/completions", {**OA, "n": 2, "best_of": 3, "temperature": 1, "stream": True},
     "best_of must be equal to n in stream mode, but best_of is 3, n is 2."),
    ("/v1/chat/completions", {**OA, "best_of": 3, "temperature": 1, "stream": True},
     "best_of must be equal to n in stream mode, but best_of is 3, n is None."),
    ("/v1/chat/completions", {**OA, "n": 2, "temperature": 0},
     "best_of/n can not greater than 1 without using beam search when temperature is 0 or not set, but best_of is "
     "None, n is 2."),
    ("/v1/chat/completions", {**OA, "logprobs": "yes"}, "logprobs must be boolean type."),
    ("/v1/chat/completions", {**OA, "top_logprobs": -1}, "top_logprobs must be unsigned type."),
    ("/v1/chat/completions", {**OA, "logprobs": False, "top_logprobs": 2},
     "Value error, when using top_logprobs, logprobs must be true or null in chat completions"),
    ("/v1/completions", {**CO, "n": 2, "best_of": 3, "temperature": 1, "stream": True},
     "best_of must be equal to n, but best_of is 3 and n is 2."),
    ("/v1/completions", {**CO, "n": 3, "best_of": 2, "temperature": 1},
     "Best_of must be greater than or equal to n, but best_of is 2 and n is 3."),
    ("/v1/completions", {**CO, "n": 2},
     "Best_of and n shouldn't be greater than 1 when sampling is disabled, but best_of is null and n is 2."),
    ("/v1/completions", {**CO, "logprobs": 6}, "logprobs should be in range [0, 5], got 6."),
]


@pytest.mark.parametrize(("path", "body", "message"), N_BEST_OF_ERRORS)
def test_n_best_of_and_logprobs_validation(server, path, body, message):
    resp = server.client.post(path, json=body)
    assert resp.status_code == 422, resp.text
    assert resp.json() == {"error": message, "error_type": "Input Validation Error"}


# -- logprobs ------------------------------------------------------------------------------------------

def test_openai_logprobs_greedy_top1_and_tokens(server):
    body = {**OA, "temperature": 0, "max_tokens": 8, "ignore_eos": True, "logprobs": True, "top_logprobs": 3}
    resp = server.client.post("/v1/chat/completions", json=body).json()
    choice = resp["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == resp["usage"]["completion_tokens"] == 8
    for entry in content:
        assert list(entry) == ["token", "logprob", "bytes", "top_logprobs"]
        assert len(entry["top_logprobs"]) == 3
        top1 = entry["top_logprobs"][0]
        assert math.isclose(entry["logprob"], top1["logprob"], rel_tol=1e-6, abs_tol=1e-6)  # greedy: the argmax
        assert entry["token"] == top1["token"] and entry["bytes"] == list(entry["token"].encode())
        assert entry["logprob"] <= 0
        values = [t["logprob"] for t in entry["top_logprobs"]]
        assert values == sorted(values, reverse=True)
    joined = "".join(e["token"] for e in content)
    if "\ufffd" not in joined:
        assert joined == choice["message"]["content"]
    # The same answer through the official client, and logprobs without alternatives.
    from openai import OpenAI

    client = OpenAI(base_url=server.base + "/v1", api_key="none")
    kwargs = {k: v for k, v in body.items() if k not in ("ignore_eos", "top_logprobs")}
    parsed = client.chat.completions.create(**kwargs, extra_body={"ignore_eos": True})
    assert [t.logprob for t in parsed.choices[0].logprobs.content] == pytest.approx([e["logprob"] for e in content])
    assert all(t.top_logprobs == [] for t in parsed.choices[0].logprobs.content)
    # Streaming carries the same entries, spread over the chunks.
    raw = server.client.post("/v1/chat/completions", json={**body, "stream": True})
    streamed = [e for c in _sse(raw.content, b"data: ")[:-1]
                for e in (json.loads(c)["choices"][0]["logprobs"] or {"content": []})["content"]]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content])


def test_tgi_details_tokens_carry_logprobs(server):
    resp = server.client.post("/generate", json=_tgi_body("Go on.", None, max_new_tokens=6, details=True,
                                                          do_sample=False)).json()
    tokens = resp["details"]["tokens"]
    assert len(tokens) == 6
    assert all(isinstance(t["logprob"], float) and t["logprob"] <= 0 for t in tokens)
    assert all(isinstance(t["text"], str) and t["special"] is False for t in tokens)
    joined = "".join(t["text"] for t in tokens)
    if "\ufffd" not in joined:
        assert joined == resp["generated_text"]


# -- /v1/completions -----------------------------------------------------------------------------------

def test_completions_text_ids_stream_and_logprobs(server):
    resp = server.client.post("/v1/completions", json={**CO, "max_tokens": 5, "temperature": 0, "ignore_eos": True,
                                                       "logprobs": 2})
    assert resp.status_code == 200, resp.text
    obj = resp.json()
    assert list(obj) == ["id", "object", "created", "model", "choices", "usage"]
    assert obj["object"] == "text_completion" and obj["model"] == "cogvlm2"
    choice = obj["choices"][0]
    assert list(choice) == ["index", "text", "logprobs", "stop_reason", "finish_reason"]
    assert choice["finish_reason"] == "length" and choice["stop_reason"] is None
    lp = choice["logprobs"]
    assert set(lp) == {"text_offset", "token_logprobs", "tokens", "top_logprobs"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert lp["text_offset"][0] == 0 and all(len(d) >= 1 for d in lp["top_logprobs"])
    usage = obj["usage"]
    assert usage["completion_tokens"] == 5 and usage["total_tokens"] == usage["prompt_tokens"] + 5

    # A list of token ids is a prompt too; the official client parses both.
    from openai import OpenAI

    client = OpenAI(base_url=server.base + "/v1", api_key="none")
    ids = client.completions.create(model="cogvlm2", prompt=[1, 15, 27, 300], max_tokens=4, temperature=0)
    assert ids.object == "text_completion" and ids.usage.prompt_tokens == 4
    text = client.completions.create(model="cogvlm2", prompt="Once upon a time", max_tokens=5, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert text.choices[0].text == choice["text"]

    raw = server.client.post("/v1/completions", json={**CO, "max_tokens": 5, "temperature": 0, "ignore_eos": True,
                                                      "stream": True})
    assert raw.content.endswith(b"data: [DONE]\n\n")
    chunks = [json.loads(c) for c in _sse(raw.content, b"data: ")[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 5

    many = server.client.post("/v1/completions", json={**CO, "max_tokens": 4, "n": 2, "best_of": 3,
                                                       "temperature": 1, "seed": 5}).json()
    assert [c["index"] for c in many["choices"]] == [0, 1]


COMPLETION_ERRORS = [
    ({"prompt": "x"}, "Request contains not model or model null"),
    ({**CO, "model": "gpt"}, "Not found given model, please check modelName in config file."),
    ({"model": "cogvlm2"}, "Contains not prompt or prompt null"),
    ({**CO, "prompt": ""}, f"Length of Prompt text should be greater than 0 and less than or equal to "
                           f"{40 * 2**20}, but got 0"),
    ({**CO, "prompt": []}, "Prompt array cannot be empty."),
    ({**CO, "prompt": [1, "a"]}, "All elements of the prompt array must be integers."),
    ({**CO, "prompt": {"a": 1}}, "The type of prompt is abnormal,prompt must be str or integer list."),
    ({**CO, "prompt": [{"type": "video_url", "video_url": "/x.mp4"}]},
     "All elements of the prompt array must be integers."),
    ({**CO, "temperature": -1}, "Parameter temperature must be in (0.0,3.40282e+38], got -1."),
]


@pytest.mark.parametrize(("body", "message"), COMPLETION_ERRORS)
def test_completions_validation(server, body, message):
    resp = server.client.post("/v1/completions", json=body)
    assert resp.status_code == 422, resp.text
    assert resp.json() == {"error": message, "error_type": "Input Validation Error"}


def test_completions_bad_token_ids_are_424(server):
    for ids in ([-5, 3], [10**6]):
        resp = server.client.post("/v1/completions", json={**CO, "prompt": ids})
        assert resp.status_code == 424
        assert resp.json() == {"error": "Failed to enqueue inferRequest. Invalid Input Ids",
                               "error_type": "Generation Error"}


# -- POST /infer ---------------------------------------------------------------------------------------

def test_native_infer(server, clip):  # noqa: F811
    plain = server.client.post("/infer", json={"inputs": "Hello there", "parameters": {"max_new_tokens": 4}})
    assert plain.status_code == 200 and list(plain.json()) == ["generated_text"]
    body = {"inputs": [{"type": "text", "text": "What happens?"}, {"type": "video_url", "video_url": clip}],
            "parameters": {"max_new_tokens": 5, "details": True, "seed": 9, "do_sample": False}}
    obj = server.client.post("/infer", json=body).json()
    assert list(obj) == ["generated_text", "details"]
    details = obj["details"]
    assert list(details) == ["finish_reason", "generated_tokens", "generated_token_ids", "seed"]
    assert details["seed"] == 9 and details["generated_tokens"] == len(details["generated_token_ids"])
    assert details["finish_reason"] in ("eos_token", "length", "stop_sequence")

    raw = server.client.post("/infer", json={**body, "stream": True})
    chunks = [json.loads(c) for c in _sse(raw.content, b"data: ")]
    assert all(list(c) == ["prefill_time", "decode_time", "token"] for c in chunks[:-1])
    assert chunks[0]["prefill_time"] is not None and chunks[0]["decode_time"] is None
    last = chunks[-1]
    assert list(last) == ["prefill_time", "decode_time", "generated_text", "details", "token"]
    assert last["generated_text"] == obj["generated_text"] and last["token"]["text"] is None
    assert last["details"] == {"finish_reason": details["finish_reason"],
                               "generated_tokens": details["generated_tokens"], "seed": 9}
    assert [t for c in chunks for t in c["token"]["id"]] == details["generated_token_ids"]

    by_ids = server.client.post("/infer", json={"input_id": [1, 15, 27, 300], "parameters": {
        "max_new_tokens": 3, "details": True}}).json()
    assert by_ids["details"]["generated_tokens"] == len(by_ids["details"]["generated_token_ids"]) <= 3


INFER_ERRORS = [
    ({"inputs": "a", "input_id": [1]}, "Input conflict."),
    ({"parameters": {}}, "Not found inputs."),
    ({"inputs": None}, "Inputs must not be null"),
    ({"inputs": 5}, "The type of inputs is abnormal"),
    ({"inputs": []}, "Inputs arr is empty"),
    ({"inputs": ""}, f"Inputs must be necessary and data type must be string and length in (0, {40 * 2**20}], but "
                     "the length of inputs is 0"),
    ({"input_id": None}, "Input_id should not be empty"),
    ({"input_id": 5}, "Parameter input_id must be an array"),
    ({"input_id": [1, 2.5]}, "Parameter input_id must be integer"),
    ({"input_id": [-1]}, "Data element in param input_id is invalid"),
    ({"input_id": []}, "Inputs token length must be in (0, 1048576], but got 0"),
    ({"inputs": "a", "parameters": {"top_p": 1.0}}, "Parameter top_p must be in (0.0,1.0], got 1.0."),
    ({"inputs": "a", "parameters": {"top_k": 0}}, "Parameter top_k must be in (0,2147483647], got 0"),
    ({"inputs": "a", "parameters": {"priority": 0}}, "Parameter priority must be in [1, 5], got 0"),
    ({"inputs": "a", "parameters": {"timeout": 0}}, "Parameter timeout must be in (0, 65535], got 0"),
    ({"inputs": "a", "stream": 1}, "stream must be boolean type."),
]


@pytest.mark.parametrize(("body", "message"), INFER_ERRORS)
def test_native_infer_validation(server, body, message):
    resp = server.client.post("/infer", json=body)
    assert resp.status_code == 422, resp.text
    assert resp.json() == {"error": message, "error_type": "Input Validation Error"}


# -- Triton token route and stopInfer ------------------------------------------------------------------

def _token_body(data, **extra) -> dict:
    return {"id": "tok-1", "inputs": [{"name": "input0", "shape": [1, len(data)], "datatype": "UINT32",
                                       "data": data, "parameters": {"max_new_tokens": 4, **extra}}],
            "outputs": [{"name": "output0"}]}


def test_triton_token_infer(server):
    resp = server.client.post("/v2/models/cogvlm2/infer", json=_token_body([1, 15, 27, 300]))
    assert resp.status_code == 200, resp.text
    obj = resp.json()
    assert list(obj) == ["id", "outputs"] and obj["id"] == "tok-1"
    out = obj["outputs"][0]
    assert list(out) == ["name", "shape", "datatype", "data"]
    assert out["name"] == "output0" and out["datatype"] == "UINT32" and out["shape"] == [1, len(out["data"])]
    assert 0 < len(out["data"]) <= 4
    # The same ids through /infer, greedy, give the same tokens.
    same = server.client.post("/infer", json={"input_id": [1, 15, 27, 300], "parameters": {
        "max_new_tokens": 4, "details": True}}).json()
    assert same["details"]["generated_token_ids"] == out["data"]
    flat = {**_token_body([1, 15]), "id": None}
    flat["inputs"][0]["shape"] = [2]
    resp = server.client.post("/v2/models/cogvlm2_llama3_video/infer", json=flat)
    assert resp.status_code == 200 and resp.json()["id"].startswith("endpoint_common_")


def _with_input(**changes) -> dict:
    body = _token_body([1, 2])
    body["inputs"][0].update(changes)
    return body


TOKEN_ERRORS = [
    ({"inputs": 5, "outputs": []}, "Req should contain 'inputs' and the type should be array."),
    ({"inputs": [], "outputs": []}, "Inputs count must be 1."),
    (_with_input(name=None), "Cannot find name in inputs or its type is not string"),
    (_with_input(name="n" * 257), "The length of name set in inputs exceeds 256."),
    (_with_input(shape="x"), "Cannot find shape in inputs or its type is not array"),
    (_with_input(shape=[1, -2]), "Shape element must be integer type."),
    (_with_input(shape=[2, 2]), "Shape must be at most two-dimensional, and the last element's value must be in "
                                "(0,1048576]."),
    (_with_input(datatype=None), "Cannot find datatype in inputs or its type is not string"),
    (_with_input(datatype="INT64"), "Unsupported datatype, got INT64."),
    (_with_input(data=None), "Cannot find data in inputs or its type is not array"),
    (_with_input(data=[1, 2, 3]), "Data size should be 2, got 3."),
    (_with_input(data=[1, "a"]), "Data element must be integer type."),
    ({**_token_body([1, 2]), "id": "bad id"}, "The id can contain only digits, letters, underscores(_), hyphens(-) "
                                              "and no more than 256 words in length."),
    ({**_token_body([1, 2]), "outputs": None}, "Req should contain 'outputs' and the type should be array."),
    ({**_token_body([1, 2]), "outputs": []}, "Outputs size should be 1, got 0."),
    ({**_token_body([1, 2]), "outputs": [{"name": 3}]}, "Outputs name must be non-empty string."),
    (_with_input(parameters=[]), "parameters must be object type."),
    (_with_input(parameters={"temperature": 0}), "Parameter temperature must be in (0.0,3.40282e+38], got 0."),
    (_with_input(parameters={"batch_size": 0}), "Parameter batch_size must be in (0,2147483647], got 0"),
]


@pytest.mark.parametrize(("body", "message"), TOKEN_ERRORS)
def test_triton_token_validation(server, body, message):
    resp = server.client.post("/v2/models/cogvlm2/infer", json=body)
    assert resp.status_code == 422, resp.text
    assert resp.json() == {"error": message, "error_type": "Input Validation Error"}


def test_triton_token_unknown_model_and_bad_ids(server):
    resp = server.client.post("/v2/models/other/infer", json=_token_body([1]))
    assert resp.status_code == 404 and resp.json() == {"error": "Model other not found.", "error_type": "NotFoundError"}
    resp = server.client.post("/v2/models/cogvlm2/infer", json=_token_body([10**6]))
    assert resp.status_code == 424 and resp.json()["error"] == "Failed to enqueue inferRequest. Invalid Input Ids"


def test_stop_infer(server):
    assert server.client.post("/v2/models/other/stopInfer", json={"id": "x"}).status_code == 404
    missing = server.client.post("/v2/models/cogvlm2/stopInfer", json={"id": "nobody"})
    assert missing.status_code == 404
    assert missing.json() == {"error": "RequestId is nobody not found.", "error_type": "NotFoundError"}
    for body, message in [({}, "Not found id."), ({"id": None}, "id must not be null."),
                          ({"id": 5}, "id must be string type."),
                          ({"id": "a b"}, "The id can contain only digits, letters, underscores(_), hyphens(-) and no "
                                          "more than 256 words in length.")]:
        resp = server.client.post("/v2/models/cogvlm2/stopInfer", json=body)
        assert resp.status_code == 422 and resp.json()["error"] == message

    # A running request (known by its req-id header) stops early and ends as a normal stop.
    body = {**OA, "stream": True, "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, headers={"req-id": "stop-me"},
                      timeout=60) as resp:
        lines = resp.iter_lines()
        next(lines)
        stopped = server.client.post("/v2/models/cogvlm2/stopInfer", json={"id": "stop-me", "extra": 1})
        assert stopped.status_code == 200 and stopped.json() == {"id": "stop-me", "extra": 1}
        rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    finals = [c for c in rest if c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "stop"
    assert finals[0]["usage"]["completion_tokens"] < 400
    server.wait_idle()

    # A non-streaming Triton request with a body id, stopped from another thread: 200 with the partial output.
    result: dict = {}
    long = {"id": "long-1", "text_input": "Count.", "parameters": {"max_new_tokens": 500, "details": True}}
    thread = threading.Thread(target=lambda: result.update(resp=server.client.post(
        "/v2/models/cogvlm2/generate", json=long)))
    thread.start()
    deadline = time.monotonic() + 20
    while True:
        stop = server.client.post("/v2/models/cogvlm2/stopInfer", json={"id": "long-1"})
        if stop.status_code == 200 or not thread.is_alive() or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    thread.join(60)
    resp = result["resp"]
    assert resp.status_code == 200 and resp.json()["details"]["finish_reason"] in ("stop_sequence", "eos_token")
    if stop.status_code == 200:
        assert resp.json()["details"]["generated_tokens"] < 500


# -- a video fanned out to several sequences; then everything is released ------------------------------

def test_video_fan_out_shares_one_decode(server, clip):  # noqa: F811
    before = server.resources()["released_shm_segments"]
    body = {"model": "cogvlm2", "n": 3, "temperature": 1.0, "seed": 4, "max_tokens": 6, "messages": [
        {"role": "user", "content": [{"type": "video_url", "video_url": clip}, {"type": "text", "text": "What?"}]}]}
    first = server.client.post("/v1/chat/completions", json=body).json()
    assert len(first["choices"]) == 3
    again = server.client.post("/v1/chat/completions", json=body).json()
    assert [c["message"]["content"] for c in again["choices"]] == [c["message"]["content"] for c in first["choices"]]
    res = server.wait_idle()
    released = res["released_shm_segments"][len(before):]
    # Each request decodes at most once (the second, a follow-up on the same video, not at all): gone again.
    assert len(released) <= 1
    assert not [n for n in released if os.path.exists(os.path.join("/dev/shm", n))]
    # A client that gives up on an n=4 request: every sequence is aborted and freed.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base + "/v1/chat/completions", json={**body, "n": 4, "max_tokens": 300, "ignore_eos": True},
                   timeout=0.5)
    server.wait_idle()


def test_zz_everything_released(server):
    res = server.wait_idle()
    assert res["kv_blocks_all_free"] and res["kv_blocks_free"] == res["kv_blocks_total"]
    assert res["released_shm_segments"]
    assert not [n for n in res["released_shm_segments"] if os.path.exists(os.path.join("/dev/shm", n))]


def test_zzz_sigterm_drains_in_flight_requests(server):
    """Last (it stops the module's server): with --shutdown-timeout, SIGTERM lets a running stream end normally,
    then the server exits 0."""
    chunks: list[dict] = []
    first = threading.Event()
    body = {"model": "cogvlm2", "prompt": [1, 2, 3], "max_tokens": 300, "temperature": 0, "ignore_eos": True,
            "stream": True}

    def stream():
        with httpx.stream("POST", server.base + "/v1/completions", json=body, timeout=120) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[len("data: "):]))
                    first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(60)
    server.proc.send_signal(signal.SIGTERM)
    reader.join(120)
    assert server.proc.wait(60) == 0, server.output()
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 300
    assert "draining: 1 request(s) in flight" in server.output()
