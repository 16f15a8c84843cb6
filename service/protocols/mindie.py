"""MindIE's native POST /infer: ``inputs`` (text or content items) or ``input_id`` (token ids)."""
from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response

from service.core import Prompt, Service
from service.errors import TOKEN_LIMIT, invalid
from service.params import (
    GenParams,
    check_max_tokens,
    check_priority,
    check_tgi_sampling,
    check_timeout,
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
from service.protocols.tgi import TGI_TOKEN_MSG

INPUTS_CHARS = ("Inputs must be necessary and data type must be string and length in (0, {limit}], but the length "
                "of inputs is {got}")


def _check_ids(ids) -> list[int]:
    if ids is None:
        raise invalid("Input_id should not be empty")
    if not isinstance(ids, list):
        raise invalid("Parameter input_id must be an array")
    for token in ids:
        if not isinstance(token, int) or isinstance(token, bool):
            raise invalid("Parameter input_id must be integer")
        if not 0 <= token <= TOKEN_LIMIT:
            raise invalid("Data element in param input_id is invalid")
    return ids


async def infer(service: Service, request: Request) -> Response:
    """POST /infer."""
    body = await read_object(service, request)
    if "inputs" in body and "input_id" in body:
        raise invalid("Input conflict.")
    if "inputs" in body:
        prompt = Prompt(items=check_prompt(service, body["inputs"], missing="Inputs must not be null",
                                           chars=INPUTS_CHARS, empty="Inputs arr is empty",
                                           abnormal="The type of inputs is abnormal"))
    elif "input_id" in body:
        prompt = Prompt(ids=_check_ids(body["input_id"]))
    else:
        raise invalid("Not found inputs.")
    handle = await admit(service, prompt, lambda: parse_infer(body), TGI_TOKEN_MSG, client_timeout=True)
    params = handle.params
    service.track(request_id(service, request), handle)

    def details(token_ids: list[int], reason: str | None, with_ids: bool) -> dict:
        obj = {"finish_reason": TGI_REASONS.get(reason, "stop_sequence"), "generated_tokens": len(token_ids)}
        if with_ids:
            obj["generated_token_ids"] = list(token_ids)
        obj["seed"] = params.seed
        return obj

    if params.stream:
        async def chunks():
            text, token_ids, previous, first = "", [], handle.submit_time, True
            async for event, error in stream_events(handle):
                if error is not None:
                    yield f"data: {dumps(error)}\n\n".encode()
                    return
                out = event.output
                text += out.text
                token_ids.extend(out.token_ids)
                elapsed = ms(event.time - previous)
                previous = event.time
                chunk = {"prefill_time": elapsed if first else None, "decode_time": None if first else elapsed}
                first = False
                if out.finished:
                    chunk["generated_text"] = text
                    chunk["details"] = details(token_ids, out.finish_reason, False) if params.details else None
                    chunk["token"] = {"id": list(out.token_ids), "text": None}
                else:
                    chunk["token"] = {"id": list(out.token_ids), "text": out.text}
                yield f"data: {dumps(chunk)}\n\n".encode()
        return sse(chunks())
    result = await collect(handle, request)
    obj = {"generated_text": result.text}
    if params.details:
        obj["details"] = details(result.token_ids, result.finish_reason, True)
    return json_response(obj)


# -- parameters of /infer, in MindIE's check order -------------------------------------------------

def parse_infer(body: dict) -> GenParams:
    """``parameters`` of /infer: the Triton names without batch_size, TGI ranges for top_k and top_p."""
    params = GenParams(default_max_tokens=20)
    p = get(body, "parameters", "object", "parameters must be object type.") or {}
    check_tgi_sampling(p, params)
    check_priority(p)
    check_max_tokens(p, params, "max_new_tokens")
    check_timeout(p, params)
    params.details = bool(get_bool(p, "details"))
    params.stream = bool(get(body, "stream", "boolean", "stream must be boolean type."))
    return params
