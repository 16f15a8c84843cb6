"""The outermost ASGI layer (API key, body size, body read timeout), before any route runs."""
from __future__ import annotations

import asyncio
import hmac
import re

from service.protocols.common import dumps

_HEALTH_PROBES = re.compile(r"^/(health|v2/health/(ready|live)|v2/models/[^/]+/ready)/?$")


async def send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                            (b"content-length", str(len(payload)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": payload})


class HttpGuard:
    """The outermost ASGI layer, before any route runs: the API key (401), the body size (413: from
    ``Content-Length`` before reading, else while reading a chunked body) and the body read timeout (408:
    the declared body must arrive within ``body_timeout`` seconds of the request head). A response sent
    before the body was read is delivered by the protocol's lingering close (service/http_protocol.py)."""

    def __init__(self, app, limit_mb: int, body_timeout: float = 30.0, api_key: str | None = None):
        self.app = app
        self.limit = limit_mb * 2**20
        self.limit_mb = limit_mb
        self.body_timeout = body_timeout
        self.api_key = f"Bearer {api_key}".encode() if api_key else None

    async def _too_large(self, send) -> None:
        await send_json(send, 413, {"message": f"Request body too large. Maximum allowed size is {self.limit_mb}MB."})

    def _authorized(self, scope) -> bool:
        if self.api_key is None or _HEALTH_PROBES.match(scope["path"]):
            return True
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(b"Bearer " + token.strip(), self.api_key)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._authorized(scope):
            await send_json(send, 401, {"error": "Unauthorized: this server requires an API key (send the header "
                                                 "Authorization: Bearer <key>)", "error_type": "Unauthorized"},
                            [(b"www-authenticate", b"Bearer")])
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    if int(value) > self.limit:
                        await self._too_large(send)
                        return
                except ValueError:
                    pass
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                await send_json(send, 408, {"error": f"The request body did not arrive within {self.body_timeout:g} "
                                                     f"s (received {size} bytes)", "error_type": "Request Timeout"})
                return
            if message["type"] != "http.request":
                return  # the client went away before sending the body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
