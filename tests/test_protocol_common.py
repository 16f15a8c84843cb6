"""What the protocols share (service/protocols/common.py) and the core's prepare / submit contract, in process."""
from __future__ import annotations

import base64
import os

import pytest

from service.core import Prompt
from service.errors import ApiError, ServiceStopped, TokenCountError
from service.params import GenParams
from tests.inprocess import error


def _inline(path: str) -> str:
    with open(path, "rb") as file:
        return "data:video/mp4;base64," + base64.b64encode(file.read()).decode()


def test_one_prompt_check_for_every_text_or_list_field(inproc):
    limit = 40 * 2**20
    cases = [  # (route, body): the same check, each protocol's words
        ("/generate", {"prompt": {}}, error("The type of prompt is abnormal")),
        ("/generate", {"inputs": {}}, error("The type of inputs is abnormal")),
        ("/v2/models/cogvlm2/generate", {"text_input": {}},
         error("The type of text_input is abnormal, it must be string or list.")),
        ("/infer", {"inputs": {}}, error("The type of inputs is abnormal")),
        ("/infer", {"inputs": ""}, error(f"Inputs must be necessary and data type must be string and length in "
                                         f"(0, {limit}], but the length of inputs is 0")),
        ("/v2/models/cogvlm2/generate", {"text_input": ""},
         error(f"Parameter text_input length must be in (0, {limit}], but got 0")),
        ("/infer", {"inputs": [{"type": "text", "text": 1}]}, error("Request param text must be string")),
    ]
    for path, body, expected in cases:
        resp = inproc.post(path, body)
        assert (resp.status_code, resp.json()) == expected, (path, body)


def test_a_bad_parameter_after_the_media_releases_what_the_media_took(inproc, inproc_media):
    inline = _inline(os.path.join(inproc_media, "clip.mp4"))
    items = [{"type": "video_url", "video_url": inline}, {"type": "text", "text": "Q"}]
    for path, body in [("/generate", {"prompt": items, "temperature": -1}),
                       ("/generate", {"inputs": items, "parameters": {"top_k": 0}}),
                       ("/infer", {"inputs": items, "parameters": {"seed": -1}})]:
        resp = inproc.post(path, body)
        assert resp.status_code == 422, resp.text
        res = inproc.wait_idle(5)  # the inline video's temp directory is gone, nothing is being admitted
        assert res["request_resources_active"] == 0
        assert inproc.service._admitting == 0


def test_prepare_then_submit_and_typed_errors(inproc):
    service = inproc.service

    async def flow():
        prepared = await service.prepare(Prompt(items="Hello"))
        assert service._admitting == 1 and prepared.resolved == [{"text": "Hello"}]
        handle = await service.submit(prepared, GenParams(max_tokens=2))
        assert service._admitting == 0
        outputs = [event.output async for event in handle.events()]
        empty = await service.prepare(Prompt(ids=[]))
        with pytest.raises(TokenCountError) as counted:
            await service.submit(empty, GenParams())
        return outputs, counted.value

    outputs, counted = inproc.run(flow())
    assert outputs[-1].finished and sum(len(o.token_ids) for o in outputs) <= 2
    assert counted.got == 0 and counted.status == 422
    worded = counted.render("Inputs token length must be in (0, 1048576], but got {got}")
    assert (worded.status, worded.message) == (422, "Inputs token length must be in (0, 1048576], but got 0")
    assert isinstance(ServiceStopped(), ApiError) and ServiceStopped().status == 503
    inproc.wait_idle()


def test_bodies_are_read_once_for_every_route(inproc):
    deep = "[" * 12 + "]" * 12
    for path in ("/generate", "/v1/chat/completions", "/infer", "/v2/models/cogvlm2/generate"):
        resp = inproc.post_raw(path, '{"prompt": ' + deep + "}")
        assert resp.status_code == 422 and "nesting deeper than 10" in resp.json()["error"], path
        resp = inproc.post_raw(path, '{"x": "\\ud800"}')
        assert resp.status_code == 422 and "unpaired UTF-16 surrogate" in resp.json()["error"], path
