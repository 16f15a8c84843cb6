"""The service in this process: the real ``Service`` and app behind ``httpx.ASGITransport`` (no subprocess,
no socket). Requests run on one private event loop; the engine and tokenizer threads are the real ones."""
from __future__ import annotations

import asyncio
import json
import time

import httpx

from service.app import build_asgi
from service.core import Service, ServiceConfig


class InProcess:
    def __init__(self, config: ServiceConfig, debug_routes: bool = True, **create_kwargs):
        self.service = Service(config)
        self.asgi = build_asgi(self.service, debug_routes=debug_routes, **create_kwargs)
        self.loop = asyncio.new_event_loop()
        self.service.start()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.asgi), base_url="http://inproc",
                                        timeout=120)

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        return self.run(self.client.request(method, path, **kwargs))

    def post(self, path: str, body=None, **kwargs) -> httpx.Response:
        if body is not None:
            kwargs["json"] = body
        return self.request("POST", path, **kwargs)

    def post_raw(self, path: str, data: bytes | str) -> httpx.Response:
        return self.request("POST", path, content=data, headers={"Content-Type": "application/json"})

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def concurrently(self, *calls: tuple[str, dict]) -> list[httpx.Response]:
        """POST each (path, body) at once; the responses in order."""
        async def all_of():
            return await asyncio.gather(*(self.client.post(path, json=body) for path, body in calls))
        return self.run(all_of())

    def wait_idle(self, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            res = self.service.resources()
            if (res["kv_blocks_all_free"] and res["requests_active"] == 0 and not res["active_shm_segments"]
                    and res["request_resources_active"] == 0):
                return res
            if time.monotonic() > deadline:
                raise AssertionError(f"service did not go idle: {res}")
            time.sleep(0.02)

    def close(self) -> None:
        self.run(self.client.aclose())
        self.service.shutdown()
        self.loop.close()


def sse_events(body: bytes, prefix: bytes) -> list[dict]:
    """The JSON objects of an SSE body whose events all start with ``prefix`` (``[DONE]`` left out)."""
    assert body.endswith(b"\n\n"), body[-200:]
    out = []
    for event in body[:-2].split(b"\n\n"):
        assert event.startswith(prefix), event
        payload = event[len(prefix):]
        if payload != b"[DONE]":
            out.append(json.loads(payload))
    return out


def error(message: str, status: int = 422) -> tuple[int, dict]:
    """The expected (status, body) of an error in MindIE's envelope."""
    labels = {404: "NotFoundError", 422: "Input Validation Error", 424: "Generation Error",
              500: "Incomplete Generation", 503: "Service Unavailable"}
    return status, {"error": message, "error_type": labels[status]}
