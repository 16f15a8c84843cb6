"""Health probes and server info: GET /health, /v2/health/ready, /v2/health/live, /v2/models/{model}/ready,
/info, and /debug/resources (``--enable-debug-routes``)."""
from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response

from service.core import Service
from service.errors import ApiError
from service.metrics import CONTENT_TYPE
from service.protocols.common import empty_response, error_response, json_response
from service.protocols.triton import check_model


def stopped_response() -> Response:
    return error_response(ApiError(503, "The service has been stopped."))


async def health(service: Service, request: Request) -> Response:
    """GET /health: 200 while serving, 503 once stopping."""
    return stopped_response() if service.stopping else empty_response()


async def ready(service: Service, request: Request) -> Response:
    """GET /v2/health/ready: 503 when stopping or when the waiting queue is full."""
    if service.stopping:
        return stopped_response()
    if service.busy:
        return json_response({"message": "Service is alive but busy. Consider reducing request frequency"}, 503)
    return empty_response()


async def live(service: Service, request: Request) -> Response:
    """GET /v2/health/live: 503 when stopping; 200 with a note when busy."""
    if service.stopping:
        return stopped_response()
    if service.busy:
        return json_response({"message": "Service is alive but busy"})
    return empty_response()


async def model_ready(service: Service, request: Request, model: str) -> Response:
    """GET /v2/models/{model}/ready."""
    check_model(service, model)
    return stopped_response() if service.stopping else empty_response()


async def info(service: Service, request: Request) -> Response:
    """GET /info (TGI's shape)."""
    cfg = service.config
    names = cfg.served_model_names
    return json_response({
        "docker_label": None, "max_batch_total_tokens": cfg.max_prefill_tokens, "max_best_of": 1,
        "max_concurrent_requests": cfg.max_batch_size, "max_input_length": service.max_input_length,
        "max_stop_sequences": None, "max_waiting_tokens": None, "sha": None, "validation_workers": None,
        "version": None, "waiting_served_ratio": None,
        "models": [{"model_device_type": service.model.device.type, "model_dtype": str(service.model.dtype)
                    .replace("torch.", ""), "model_id": name, "model_pipeline_tag": "text-generation",
                    "model_sha": None, "max_total_tokens": service.max_seq_len} for name in names]})


async def debug_resources(service: Service, request: Request) -> Response:
    """GET /debug/resources: not in MindIE (--enable-debug-routes): KV blocks and shared memory held."""
    return json_response(service.resources())


async def metrics(service: Service, request: Request) -> Response:
    """GET /metrics: Prometheus text format."""
    return Response(service.metrics.exposition(), media_type=CONTENT_TYPE)
