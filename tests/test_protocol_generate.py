"""vLLM POST /generate (service/protocols/generate.py), in process."""
from __future__ import annotations

import json
import os

from tests.inprocess import error

GENERATE_PARSE = ('{"Error": "`inputs` or `prompt` must be necessary and data type must be string. Additionally, '
                  'the request body must be valid json", "error_type": "validation"}')


def test_text_prompt_is_echoed_before_the_answer_and_stream_deltas_add_up(inproc):
    body = {"prompt": "Name a colour.", "max_tokens": 6, "temperature": 0}
    resp = inproc.post("/generate", body)
    assert resp.status_code == 200 and resp.headers["connection"] == "close"
    (text,) = resp.json()["text"]
    assert text.startswith("Name a colour. ")
    answer = text[len("Name a colour. "):]
    raw = inproc.post("/generate", {**body, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.content.endswith(b"\0") and b"data:" not in raw.content
    deltas = [json.loads(chunk) for chunk in raw.content[:-1].split(b"\0")]
    assert all(list(d) == ["text"] and len(d["text"]) == 1 for d in deltas)
    assert "".join(d["text"][0] for d in deltas) == answer


def test_content_items_echo_the_first_text_item(inproc, inproc_media):
    clip = os.path.join(inproc_media, "clip.mp4")
    items = [{"type": "video_url", "video_url": {"url": clip}}, {"type": "text", "text": "What moves?"},
             {"type": "text", "text": "second"}]
    resp = inproc.post("/generate", {"prompt": items, "max_tokens": 3, "temperature": 0})
    assert resp.status_code == 200, resp.text
    assert resp.json()["text"][0].startswith("What moves? ")


def test_n_sequences_are_returned_in_one_list(inproc):
    resp = inproc.post("/generate", {"prompt": "Count:", "max_tokens": 4, "n": 3, "temperature": 1.0, "seed": 11})
    texts = resp.json()["text"]
    assert len(texts) == 3 and all(t.startswith("Count: ") for t in texts)


def test_errors(inproc):
    limit = 40 * 2**20
    cases = [
        ({"prompt": 5}, error("The type of prompt is abnormal")),
        ({"prompt": []}, error("Prompt arr is empty")),
        ({"prompt": ""}, error(f"Prompt must be necessary and data type must be string and length in (0, {limit}], "
                               "but the length of inputs is 0")),
        ({"prompt": None}, error(GENERATE_PARSE)),
        ({}, error(GENERATE_PARSE)),
        ({"prompt": "hi", "n": 2}, error("Best_of/N can not greater than 1 when temperature is 0 or not set, but "
                                         "best_of is None, n is 2.")),
    ]
    for body, expected in cases:
        resp = inproc.post("/generate", body)
        assert (resp.status_code, resp.json()) == expected, body
    for raw in ("[1]", "{", '"text"'):
        resp = inproc.post_raw("/generate", raw)
        assert (resp.status_code, resp.json()) == error(GENERATE_PARSE)
    inproc.wait_idle()
