"""The outermost ASGI layer: a request id per request (the client's ``X-Request-Id`` when it is a sane token,
else a new one) echoed in the response's ``X-Request-Id``, one JSON access-log line per request
(logger ``service.access``) and the HTTP error counters of service/metrics.py by route template."""
from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterable

from service.metrics import Metrics

access_log = logging.getLogger("service.access")

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


def request_id_of(scope) -> str | None:
    """The id the observing layer gave this request (None outside it)."""
    return scope.get("request_id")


class Observe:
    def __init__(self, app, metrics: Metrics | None, routes: Iterable[str]):
        self.app = app
        self.metrics = metrics
        self.routes = [(re.compile("^" + re.sub(r"\{[^}/]+\}", "[^/]+", path) + "$"), path) for path in routes]

    def route_of(self, path: str) -> str:
        for pattern, template in self.routes:
            if pattern.match(path):
                return template
        return "unmatched"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                text = value.decode("latin-1").strip()
                rid = text if _CLIENT_ID.match(text) else None
                break
        rid = rid or uuid.uuid4().hex
        scope["request_id"] = rid
        start = time.perf_counter()
        status = None
        sent = 0

        async def observed_send(message):
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except BaseException:
            status = status or 500
            raise
        finally:
            route = self.route_of(scope.get("path", ""))
            if self.metrics is not None and status is not None:
                self.metrics.http_error(route, status)
            client = scope.get("client")
            access_log.info(json.dumps({
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z", "request_id": rid,
                "method": scope.get("method"), "path": scope.get("path"), "route": route,
                "status": status, "duration_ms": round((time.perf_counter() - start) * 1000, 3),
                "response_bytes": sent, "client": f"{client[0]}:{client[1]}" if client else None,
            }, ensure_ascii=False))
