"""TGI: POST /generate with inputs, /generate_stream and / (service/protocols/tgi.py), in process."""
from __future__ import annotations

from tests.inprocess import error, sse_events


def test_generate_details_and_root_list(inproc):
    params = {"max_new_tokens": 5, "details": True, "do_sample": False, "seed": 3}
    resp = inproc.post("/generate", {"inputs": "Say hi", "parameters": params})
    obj = resp.json()
    assert list(obj) == ["details", "generated_text"]
    details = obj["details"]
    assert details["seed"] == 3 and details["finish_reason"] in ("length", "eos_token")
    assert details["generated_tokens"] == len(details["tokens"]) <= 5
    assert "".join(t["text"] for t in details["tokens"]) == obj["generated_text"]
    assert all(t["logprob"] <= 0 for t in details["tokens"])
    root = inproc.post("/", {"inputs": "Say hi", "parameters": params}).json()
    assert root == [obj]  # greedy: the same answer, as a list of one


def test_stream_chunks_add_up_and_full_text_is_prefixed(inproc):
    params = {"max_new_tokens": 5, "do_sample": False, "return_full_text": True}
    plain = inproc.post("/generate", {"inputs": "Go", "parameters": params}).json()["generated_text"]
    assert plain.startswith("Go ")
    raw = inproc.post("/generate_stream", {"inputs": "Go", "parameters": params})
    chunks = sse_events(raw.content, b"data: ")
    assert all(c["generated_text"] is None for c in chunks[:-1])
    assert chunks[-1]["generated_text"] == plain
    assert "Go " + "".join(c["token"]["text"] for c in chunks) == plain
    streamed = sse_events(inproc.post("/", {"inputs": "Go", "stream": True, "parameters": params}).content, b"data: ")
    assert streamed == chunks


def test_errors(inproc):
    cases = [
        ("/generate", {"inputs": 5}, error("The type of inputs is abnormal")),
        ("/generate", {"inputs": []}, error("Inputs arr is empty")),
        ("/generate_stream", {"parameters": {}}, error("Request should contain 'inputs' and the type should be "
                                                       "string.")),
        ("/generate_stream", {"inputs": "x", "parameters": {"decoder_input_details": True}},
         error("The decoder_input_details must not be true when stream is true.")),
        ("/", {"inputs": "x", "stream": "yes"}, error("stream must be boolean type.")),
        ("/generate", {"inputs": "x", "parameters": {"top_p": 1.0}},
         error("Parameter top_p must be in (0.0,1.0], got 1.0.")),
    ]
    for path, body, expected in cases:
        resp = inproc.post(path, body)
        assert (resp.status_code, resp.json()) == expected, (path, body)
