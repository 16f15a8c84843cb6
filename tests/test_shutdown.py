"""--shutdown-timeout: drain on SIGTERM (Service.drain), in process; the signal path with a real server is
tests/test_service_extra.py::test_zzz_sigterm_drains_in_flight_requests."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from service.core import ServiceConfig
from tests.inprocess import InProcess, error

STOPPED = error("The service has been stopped", 503)


@pytest.fixture
def slow_inproc(chat_model_dir, inproc_media):
    """An in-process service of its own (a drain ends it) whose engine steps take at least 5 ms."""
    app = InProcess(ServiceConfig(model_path=chat_model_dir, allowed_media_dirs=[inproc_media], max_seq_len=640))
    step = app.service.engine.step

    def slow_step():
        time.sleep(0.005)
        return step()

    app.service.engine.step = slow_step
    yield app
    app.close()


def _long(max_tokens: int) -> dict:
    return {"model": "cogvlm2", "prompt": [1, 2, 3], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


def test_drain_lets_in_flight_requests_finish_and_refuses_new_ones(slow_inproc):
    app, service = slow_inproc, slow_inproc.service

    async def scenario():
        running = asyncio.ensure_future(app.client.post("/v1/completions", json=_long(200)))
        while service.in_flight == 0:
            await asyncio.sleep(0.005)
        drained = asyncio.ensure_future(asyncio.to_thread(service.drain, 60))
        await asyncio.sleep(0.05)
        health = await app.client.get("/health")
        fresh = await app.client.post("/v1/completions", json=_long(2))
        assert not running.done()  # still generating while the probes answer 503
        return await running, health, fresh, await drained

    resp, health, fresh, finished = app.run(scenario())
    assert (health.status_code, health.json()) == error("The service has been stopped.", 503)
    assert (fresh.status_code, fresh.json()) == STOPPED
    assert resp.status_code == 200 and finished is True
    assert resp.json()["usage"]["completion_tokens"] == 200 and resp.json()["choices"][0]["finish_reason"] == "length"


def test_drain_aborts_what_outlasts_the_timeout(slow_inproc):
    app, service = slow_inproc, slow_inproc.service

    async def scenario():
        running = asyncio.ensure_future(app.client.post("/v1/completions", json=_long(600)))
        stream = asyncio.ensure_future(app.client.post("/v1/completions", json={**_long(600), "stream": True}))
        while service.in_flight < 2:
            await asyncio.sleep(0.005)
        finished = await asyncio.to_thread(service.drain, 0.2)
        return await running, await stream, finished

    resp, stream, finished = app.run(scenario())
    assert finished is False
    assert (resp.status_code, resp.json()) == STOPPED
    last = stream.content.rstrip(b"\n").split(b"\n\n")[-1]
    assert json.loads(last[len(b"data: "):]) == STOPPED[1]
    app.wait_idle()
