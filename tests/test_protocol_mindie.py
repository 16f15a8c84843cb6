"""MindIE POST /infer (service/protocols/mindie.py), in process."""
from __future__ import annotations

from tests.inprocess import error, sse_events


def test_text_and_stream_agree(inproc):
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 5, "details": True, "seed": 9}}
    obj = inproc.post("/infer", body).json()
    details = obj["details"]
    assert details["generated_tokens"] == len(details["generated_token_ids"]) <= 5 and details["seed"] == 9
    chunks = sse_events(inproc.post("/infer", {**body, "stream": True}).content, b"data: ")
    assert chunks[-1]["generated_text"] == obj["generated_text"]
    assert [t for c in chunks for t in c["token"]["id"]] == details["generated_token_ids"]
    assert chunks[0]["prefill_time"] is not None and chunks[0]["decode_time"] is None
    assert chunks[-1]["details"] == {k: v for k, v in details.items() if k != "generated_token_ids"}


def test_input_ids(inproc):
    ids = inproc.service.encode_plain("Hello")
    obj = inproc.post("/infer", {"input_id": ids, "parameters": {"max_new_tokens": 3, "details": True}}).json()
    assert 0 < obj["details"]["generated_tokens"] <= 3


def test_errors(inproc):
    cases = [
        ({"inputs": "a", "input_id": [1]}, error("Input conflict.")),
        ({"inputs": None}, error("Inputs must not be null")),
        ({"inputs": 1}, error("The type of inputs is abnormal")),
        ({"input_id": None}, error("Input_id should not be empty")),
        ({"input_id": [True]}, error("Parameter input_id must be integer")),
        ({"input_id": [-1]}, error("Data element in param input_id is invalid")),
        ({}, error("Not found inputs.")),
    ]
    for body, expected in cases:
        resp = inproc.post("/infer", body)
        assert (resp.status_code, resp.json()) == expected, body
