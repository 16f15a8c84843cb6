"""The route table: each path to its protocol's handler (service/protocols/, docs/SERVICE_API.md)."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.core import Service
from service.errors import ApiError, new_error_id
from service.guard import HttpGuard
from service.observe import Observe, request_id_of
from service.protocols import generate, health, mindie, openai, tgi, triton
from service.protocols.common import collect_all, error_response

logger = logging.getLogger("service")

Handler = Callable[..., Awaitable[Response]]

ROUTES: list[tuple[str, str, Handler]] = [
    ("POST", "/generate", generate.generate),  # vLLM ("prompt") or TGI ("inputs")
    ("POST", "/generate_stream", tgi.generate_stream),
    ("POST", "/", tgi.root),
    ("POST", "/v2/models/{model}/generate", triton.generate),
    ("POST", "/v2/models/{model}/generate_stream", triton.generate_stream),
    ("POST", "/v1/chat/completions", openai.chat_completions),
    ("POST", "/v1/completions", openai.completions),
    ("POST", "/infer", mindie.infer),
    ("POST", "/v2/models/{model}/infer", triton.token_infer),
    ("POST", "/v2/models/{model}/stopInfer", triton.stop_infer),
    ("GET", "/v1/models", openai.list_models),
    ("GET", "/v1/models/{model}", openai.get_model),
    ("GET", "/health", health.health),
    ("GET", "/v2/health/ready", health.ready),
    ("GET", "/v2/health/live", health.live),
    ("GET", "/v2/models/{model}/ready", health.model_ready),
    ("GET", "/info", health.info),
    ("GET", "/metrics", health.metrics),  # Prometheus text format (service/metrics.py)
]
DEBUG_ROUTES: list[tuple[str, str, Handler]] = [
    ("GET", "/debug/resources", health.debug_resources),  # not in MindIE
]


def create_app(service: Service, debug_routes: bool = False) -> FastAPI:
    """The routes over ``service``; ``debug_routes`` adds GET /debug/resources (not in MindIE)."""
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        service.start()
        try:
            yield
        finally:
            service.shutdown()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_request, error: ApiError):
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, error: StarletteHTTPException):
        return Response(b"", status_code=error.status_code)  # unknown route: empty 404

    @app.exception_handler(Exception)
    async def _internal(request: Request, error: Exception):
        # The details (traceback, library text) go to the log only; the client gets an id to quote.
        rid = request_id_of(request.scope) or new_error_id()
        logger.error(f"internal error {rid} on {request.method} {request.url.path}", exc_info=error)
        return Response(f"Server internal error (request id {rid})", status_code=500, media_type="text/plain",
                        headers={"Connection": "close", "X-Request-Id": rid})

    def endpoint(handler: Handler):
        async def call(request: Request) -> Response:
            return await handler(service, request, **request.path_params)
        call.__name__ = handler.__name__
        return call

    for method, path, handler in ROUTES + (DEBUG_ROUTES if debug_routes else []):
        app.add_api_route(path, endpoint(handler), methods=[method])
    return app


def build_asgi(service: Service, *, debug_routes: bool = False, body_timeout: float = 30.0,
               api_key: str | None = None) -> Observe:
    """What the server runs: the routes behind the guard (API key, body limits), behind the request id, access
    log and error counters."""
    app = create_app(service, debug_routes=debug_routes)
    guarded = HttpGuard(app, service.config.max_body_mb, body_timeout=body_timeout, api_key=api_key)
    routes = [path for _, path, _ in ROUTES + (DEBUG_ROUTES if debug_routes else [])]
    return Observe(guarded, getattr(service, "metrics", None), routes)


__all__ = ["ROUTES", "HttpGuard", "build_asgi", "collect_all", "create_app"]
