"""Triton: POST /v2/models/{model}/generate[_stream] (text), /infer (token ids) and /stopInfer."""
from __future__ import annotations

import re

from fastapi import Request
from fastapi.responses import Response

from service.core import Prompt, Service
from service.errors import TOKEN_LIMIT, ApiError, invalid
from service.params import (
    GenParams,
    check_batch_size,
    check_max_tokens,
    check_priority,
    check_repetition_penalty,
    check_seed,
    check_temperature,
    check_timeout,
    check_top_k,
    check_top_p,
    check_typical_p,
    get,
    get_bool,
)
from service.protocols.common import (
    TGI_REASONS,
    admit,
    check_prompt,
    collect,
    dumps,
    json_response,
    ms,
    read_object,
    request_id,
    sse,
    stream_events,
)
from service.protocols.generate import TOKEN_MSG
from service.protocols.tgi import TGI_TOKEN_MSG

_MODEL_NAME = r"[\w\-.]+"


def check_model(service: Service, model: str) -> None:
    """404 unless ``model`` is a served model name."""
    if not re.fullmatch(_MODEL_NAME, model) or model not in service.config.served_model_names:
        raise ApiError(404, f"Model {model} not found.")


async def generate(service: Service, request: Request, model: str) -> Response:
    """POST /v2/models/{model}/generate."""
    return await _text(service, request, model, stream=False)


async def generate_stream(service: Service, request: Request, model: str) -> Response:
    """POST /v2/models/{model}/generate_stream."""
    return await _text(service, request, model, stream=True)


async def _text(service: Service, request: Request, model: str, stream: bool) -> Response:
    check_model(service, model)
    body = await read_object(service, request)
    text_input = check_prompt(service, body.get("text_input"), missing="The text_input not found",
                              chars="Parameter text_input length must be in (0, {limit}], but got {got}",
                              empty="Parameter text_input arr is empty",
                              abnormal="The type of text_input is abnormal, it must be string or list.")
    handle = await admit(service, Prompt(items=text_input), lambda: parse_triton(body, stream), TOKEN_MSG,
                         client_timeout=True)
    params = handle.params
    rid = params.request_id or request_id(service, request)
    service.track(rid, handle)
    base = {"id": rid, "model_name": model, "model_version": None}
    if stream:
        async def chunks():
            count, previous = 0, handle.submit_time
            async for event, error in stream_events(handle):
                if error is not None:
                    yield f"data:{dumps(error)}\n\n".encode()
                    return
                out = event.output
                count += len(out.token_ids)
                chunk = {**base, "text_output": out.text}
                if params.details:
                    details = {"generated_tokens": count, "first_token_cost": None, "decode_cost": None,
                               "batch_size": event.batch_size,
                               "queue_wait_time": ms(event.time - handle.submit_time) if count <= 1 else 0}
                    if out.finished:
                        details = {"finish_reason": TGI_REASONS.get(out.finish_reason, "stop_sequence"),
                                   **details}
                    chunk["details"] = details
                    elapsed = ms(event.time - previous)
                    chunk["prefill_time"] = elapsed if count <= 1 else None
                    chunk["decode_time"] = None if count <= 1 else elapsed
                previous = event.time
                yield f"data:{dumps(chunk)}\n\n".encode()
        return sse(chunks())
    result = await collect(handle, request)
    obj = {**base, "text_output": result.text}
    if params.details:
        obj["details"] = {"finish_reason": TGI_REASONS.get(result.finish_reason, "stop_sequence"),
                          "generated_tokens": len(result.token_ids), "first_token_cost": None,
                          "decode_cost": None, "batch_size": result.batch_sizes,
                          "queue_wait_time": result.queue_wait}
    return json_response(obj)


def _token_input(body: dict) -> dict:
    """``inputs[0]`` of the token route, checked in MindIE's order."""
    inputs = body.get("inputs")
    if not isinstance(inputs, list):
        raise invalid("Req should contain 'inputs' and the type should be array.")
    if len(inputs) != 1:
        raise invalid("Inputs count must be 1.")
    item = inputs[0]
    if not isinstance(item, dict):
        raise invalid("Check triton token req parameter error")
    name = item.get("name")
    if not isinstance(name, str):
        raise invalid("Cannot find name in inputs or its type is not string")
    if len(name) > 256:
        raise invalid("The length of name set in inputs exceeds 256.")
    shape = item.get("shape")
    if not isinstance(shape, list):
        raise invalid("Cannot find shape in inputs or its type is not array")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise invalid("Shape element must be integer type.")
    if not (len(shape) == 1 or (len(shape) == 2 and shape[0] == 1 and 0 < shape[1] <= TOKEN_LIMIT)):
        raise invalid(f"Shape must be at most two-dimensional, and the last element's value must be in "
                      f"(0,{TOKEN_LIMIT}].")
    datatype = item.get("datatype")
    if not isinstance(datatype, str):
        raise invalid("Cannot find datatype in inputs or its type is not string")
    if datatype != "UINT32":
        raise invalid(f"Unsupported datatype, got {datatype}.")
    data = item.get("data")
    if not isinstance(data, list):
        raise invalid("Cannot find data in inputs or its type is not array")
    if len(data) > TOKEN_LIMIT:
        raise invalid(f"Data element must be no more than max token id length, which is {TOKEN_LIMIT}.")
    if len(data) != shape[-1]:
        raise invalid(f"Data size should be {shape[-1]}, got {len(data)}.")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in data):
        raise invalid("Data element must be integer type.")
    return item


async def token_infer(service: Service, request: Request, model: str) -> Response:
    """POST /v2/models/{model}/infer: prompt token ids in, generated token ids out."""
    check_model(service, model)
    body = await read_object(service, request)
    item = _token_input(body)
    data = item["data"]
    user_id = get(body, "id", "string")
    if user_id is not None and not TRITON_ID.match(user_id):
        raise invalid(TRITON_ID_RULE)
    outputs = body.get("outputs")
    if not isinstance(outputs, list):
        raise invalid("Req should contain 'outputs' and the type should be array.")
    if len(outputs) != 1:
        raise invalid(f"Outputs size should be 1, got {len(outputs)}.")
    if not isinstance(outputs[0], dict) or not isinstance(outputs[0].get("name"), str):
        raise invalid("Outputs name must be non-empty string.")

    def parse():
        parameters = get(item, "parameters", "object", "parameters must be object type.") or {}
        return parse_triton_token(parameters)

    handle = await admit(service, Prompt(ids=list(data)), parse, TGI_TOKEN_MSG, client_timeout=True)
    rid = user_id or request_id(service, request)
    service.track(rid, handle)
    result = await collect(handle, request)
    return json_response({"id": rid, "outputs": [{"name": outputs[0]["name"] or "output0",
                                                  "shape": [1, len(result.token_ids)], "datatype": "UINT32",
                                                  "data": list(result.token_ids)}]})


async def stop_infer(service: Service, request: Request, model: str) -> Response:
    """POST /v2/models/{model}/stopInfer: ends a running request by id; what it generated is its answer."""
    check_model(service, model)
    body = await read_object(service, request, "Failed to parse context to json body.", check_running=False)
    if "id" not in body:
        raise invalid("Not found id.")
    if body["id"] is None:
        raise invalid("id must not be null.")
    stop_id = get(body, "id", "string")
    if not TRITON_ID.match(stop_id):
        raise invalid(TRITON_ID_RULE)
    if not service.stop_request(stop_id):
        raise ApiError(404, f"RequestId is {stop_id} not found.")
    return json_response(body)


# -- parameters of Triton (text and token routes), in MindIE's check order -------------------------

TRITON_ID = re.compile(r"^[a-zA-Z0-9_-]{1,256}$")


TRITON_ID_RULE = ("The id can contain only digits, letters, underscores(_), hyphens(-) and no more than 256 words in "
                  "length.")


def parse_triton(body: dict, stream: bool) -> GenParams:
    params = GenParams(default_max_tokens=20, stream=stream)
    request_id = body.get("id")
    if request_id is not None:
        if not isinstance(request_id, str) or not TRITON_ID.match(request_id):
            raise invalid(TRITON_ID_RULE)
        params.request_id = request_id
    p = get(body, "parameters", "object", "parameters must be object type.") or {}
    check_temperature(p, params, zero_ok=False)
    check_top_k(p, params, "non_negative")
    check_top_p(p, params)
    check_typical_p(p, params)
    params.do_sample = get_bool(p, "do_sample")
    get_bool(p, "watermark")
    check_seed(p, params)
    check_repetition_penalty(p, params)
    check_priority(p)
    check_max_tokens(p, params, "max_new_tokens")
    params.details = bool(get_bool(p, "details"))
    check_batch_size(p)
    check_timeout(p, params)
    return params


def parse_triton_token(p: dict) -> GenParams:
    """``inputs[0].parameters`` of the Triton token route, in MindIE's order."""
    params = GenParams(default_max_tokens=20)
    check_temperature(p, params, zero_ok=False)
    check_top_k(p, params, "non_negative")
    check_top_p(p, params)
    params.do_sample = get_bool(p, "do_sample")
    check_seed(p, params)
    check_repetition_penalty(p, params)
    get_bool(p, "watermark")
    check_priority(p)
    check_max_tokens(p, params, "max_new_tokens")
    check_timeout(p, params)
    params.details = bool(get_bool(p, "details"))
    check_batch_size(p)
    return params
