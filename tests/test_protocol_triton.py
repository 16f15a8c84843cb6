"""Triton: /v2/models/{m}/generate[_stream], /infer, /stopInfer (service/protocols/triton.py), in process."""
from __future__ import annotations

from tests.inprocess import error, sse_events

ID_RULE = "The id can contain only digits, letters, underscores(_), hyphens(-) and no more than 256 words in length."


def test_generate_and_stream_agree(inproc):
    body = {"id": "t-1", "text_input": "Hello", "parameters": {"max_new_tokens": 5, "details": True}}
    obj = inproc.post("/v2/models/cogvlm2/generate", body).json()
    assert list(obj) == ["id", "model_name", "model_version", "text_output", "details"]
    assert (obj["id"], obj["model_name"], obj["model_version"]) == ("t-1", "cogvlm2", None)
    assert obj["details"]["generated_tokens"] == len(obj["details"]["batch_size"])
    raw = inproc.post("/v2/models/cogvlm2_llama3_video/generate_stream", body)
    assert not raw.content.startswith(b"data: ")
    chunks = sse_events(raw.content, b"data:")
    assert all(c["id"] == "t-1" and c["model_name"] == "cogvlm2_llama3_video" for c in chunks)
    assert "".join(c["text_output"] for c in chunks) == obj["text_output"]
    assert [c["details"]["generated_tokens"] for c in chunks] == list(range(1, len(chunks) + 1))
    assert chunks[-1]["details"]["finish_reason"] == obj["details"]["finish_reason"]


def test_token_route_returns_token_ids(inproc):
    ids = inproc.service.encode_plain("one two")
    body = {"id": "tok", "inputs": [{"name": "input0", "shape": [1, len(ids)], "datatype": "UINT32", "data": ids,
                                     "parameters": {"max_new_tokens": 4}}], "outputs": [{"name": "output0"}]}
    obj = inproc.post("/v2/models/cogvlm2/infer", body).json()
    (out,) = obj["outputs"]
    assert obj["id"] == "tok" and out["name"] == "output0" and out["datatype"] == "UINT32"
    assert out["shape"] == [1, len(out["data"])] and 0 < len(out["data"]) <= 4


def test_errors(inproc):
    cases = [
        ("/v2/models/nope/generate", {"text_input": "x"}, error("Model nope not found.", 404)),
        ("/v2/models/cogvlm2/generate", {"id": "x"}, error("The text_input not found")),
        ("/v2/models/cogvlm2/generate", {"text_input": 3}, error("The type of text_input is abnormal, it must be "
                                                                 "string or list.")),
        ("/v2/models/cogvlm2/generate", {"text_input": "x", "id": "a b"}, error(ID_RULE)),
        ("/v2/models/cogvlm2/infer", {"inputs": {}}, error("Req should contain 'inputs' and the type should be "
                                                           "array.")),
        ("/v2/models/cogvlm2/stopInfer", {"id": "a b"}, error(ID_RULE)),
        ("/v2/models/cogvlm2/stopInfer", {"id": "nobody"}, error("RequestId is nobody not found.", 404)),
        ("/v2/models/cogvlm2/stopInfer", {}, error("Not found id.")),
    ]
    for path, body, expected in cases:
        resp = inproc.post(path, body)
        assert (resp.status_code, resp.json()) == expected, (path, body)
