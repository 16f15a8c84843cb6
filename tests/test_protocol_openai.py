"""OpenAI: /v1/chat/completions, /v1/completions, /v1/models (service/protocols/openai.py), in process."""
from __future__ import annotations

import json

from tests.inprocess import error, sse_events

CHAT = {"model": "cogvlm2", "messages": [{"role": "user", "content": "Tell me a word."}], "max_tokens": 6,
        "temperature": 0}


def test_chat_answer_and_stream_agree(inproc):
    obj = inproc.post("/v1/chat/completions", CHAT).json()
    assert obj["object"] == "chat.completion" and obj["model"] == "cogvlm2"
    usage = obj["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= 6
    (choice,) = obj["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    raw = inproc.post("/v1/chat/completions", {**CHAT, "stream": True}).content
    assert raw.endswith(b"data: [DONE]\n\n")
    chunks = sse_events(raw, b"data: ")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == choice["message"]["content"]
    assert chunks[-1]["usage"]["completion_tokens"] == usage["completion_tokens"]


def test_text_only_list_content_is_flattened(inproc):
    items = [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "a word."}]
    listed = inproc.post("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": items}]}).json()
    plain = inproc.post("/v1/chat/completions", CHAT).json()
    assert listed["choices"][0]["message"] == plain["choices"][0]["message"]
    assert listed["usage"] == plain["usage"]


def test_completions_text_and_ids_agree(inproc):
    body = {"model": "cogvlm2", "prompt": "Once upon", "max_tokens": 5, "temperature": 0}
    text = inproc.post("/v1/completions", body).json()
    ids = inproc.post("/v1/completions", {**body, "prompt": inproc.service.encode_plain("Once upon")}).json()
    assert text["object"] == "text_completion"
    assert text["choices"][0]["text"] == ids["choices"][0]["text"]
    assert text["usage"] == ids["usage"]


def test_models(inproc):
    resp = inproc.get("/v1/models")
    assert resp.text == json.dumps(json.loads(resp.text), indent=4, sort_keys=True)
    assert [m["id"] for m in resp.json()["data"]] == ["cogvlm2_llama3_video", "cogvlm2"]
    assert inproc.get("/v1/models/cogvlm2").json()["id"] == "cogvlm2"
    missing = inproc.get("/v1/models/gpt")
    assert (missing.status_code, missing.json()) == error("Model gpt not found.", 404)


def test_errors(inproc):
    cases = [
        ("/v1/chat/completions", {"messages": CHAT["messages"]}, error("Request contains not model or model null")),
        ("/v1/chat/completions", {**CHAT, "model": "gpt-4"}, error("Model not found")),
        ("/v1/chat/completions", {**CHAT, "messages": []},
         error("Request param contains not messages or messages not arr or arr is empty")),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": []}]},
         error("The type of inputs is abnormal")),
        ("/v1/completions", {"model": "cogvlm2"}, error("Contains not prompt or prompt null")),
        ("/v1/completions", {"model": "x", "prompt": "a"},
         error("Not found given model, please check modelName in config file.")),
        ("/v1/completions", {"model": "cogvlm2", "prompt": [1, "a"]},
         error("All elements of the prompt array must be integers.")),
        ("/v1/completions", {"model": "cogvlm2", "prompt": {}},
         error("The type of prompt is abnormal,prompt must be str or integer list.")),
    ]
    for path, body, expected in cases:
        resp = inproc.post(path, body)
        assert (resp.status_code, resp.json()) == expected, (path, body)
