"""TGI: POST /generate with ``inputs``, /generate_stream and / (docs/SERVICE_API.md)."""
from __future__ import annotations

import re

from fastapi import Request
from fastapi.responses import Response

from service.core import Prompt, Service
from service.errors import invalid
from service.params import (
    INT32_MAX,
    GenParams,
    check_max_tokens,
    check_stop,
    check_tgi_sampling,
    fmt,
    get,
    get_bool,
    is_int,
    parse_controls,
)
from service.protocols.common import (
    TGI_REASONS,
    admit,
    check_prompt,
    collect,
    dumps,
    json_response,
    padded,
    read_object,
    sse,
    stream_events,
)

TGI_TOKEN_MSG = "Inputs token length must be in (0, 1048576], but got {got}"


def check_inputs(service: Service, body: dict):
    return check_prompt(service, body.get("inputs"), missing="Request should contain 'inputs' and the type should "
                                                             "be string.",
                        chars="Inputs length must be in (0, {limit}], but got {got}", empty="Inputs arr is empty",
                        abnormal="The type of inputs is abnormal")


async def respond(service: Service, request: Request, body: dict, stream: bool, wrap_list: bool) -> Response:
    """A TGI request whose body was read: the answer, a list of one for POST / without stream."""
    inputs = check_inputs(service, body)
    handle = await admit(service, Prompt(items=inputs), lambda: parse_tgi(body, stream), TGI_TOKEN_MSG)
    params = handle.params
    prefix = ""
    if params.return_full_text:
        prefix = (inputs if isinstance(inputs, str) else dumps(inputs)) + " "
    if stream:
        async def chunks():
            text, count, first = "", 0, True
            async for event, error in stream_events(handle):
                if error is not None:
                    yield f"data: {dumps(error)}\n\n".encode()
                    return
                out = event.output
                text += out.text
                count += len(out.token_ids)
                logprob = out.logprobs[0] if params.details and out.logprobs else None
                chunk = {"token": {"id": list(out.token_ids), "text": out.text, "logprob": logprob,
                                   "special": None},
                         "generated_text": None, "details": None}
                if first and handle.video_timestamps is not None:
                    chunk["video_timestamps"] = handle.video_timestamps
                first = False
                if out.finished:
                    chunk["generated_text"] = prefix + text
                    if params.details:
                        chunk["details"] = {"prompt_tokens": len(handle.prompt_ids),
                                            "finish_reason": TGI_REASONS.get(out.finish_reason, "stop_sequence"),
                                            "generated_tokens": count, "seed": params.seed}
                yield f"data: {dumps(chunk)}\n\n".encode()
        return sse(chunks())
    result = await collect(handle, request)
    obj = {"generated_text": prefix + result.text}
    if params.details or params.decoder_input_details:
        prefill = []
        if params.decoder_input_details:
            prefill = [{"id": service.pad_token_id if t < 0 else t, "logprob": None, "special": None,
                        "text": None} for t in handle.prompt_ids]
        obj = {"details": {"prompt_tokens": len(handle.prompt_ids),
                           "finish_reason": TGI_REASONS.get(result.finish_reason, "stop_sequence"),
                           "generated_tokens": len(result.token_ids), "prefill": prefill, "seed": params.seed,
                           "tokens": [{"id": t, "logprob": lp, "special": service.is_special(t),
                                       "text": service.token_text(t)}
                                      for t, lp in zip(result.token_ids, padded(result.logprobs,
                                                                                len(result.token_ids)))]},
               "generated_text": prefix + result.text}
    if handle.video_timestamps is not None:
        obj["video_timestamps"] = handle.video_timestamps
    return json_response([obj] if wrap_list else obj)


async def generate_stream(service: Service, request: Request) -> Response:
    """POST /generate_stream."""
    body = await read_object(service, request)
    return await respond(service, request, body, stream=True, wrap_list=False)


async def root(service: Service, request: Request) -> Response:
    """POST /: a list of one answer, or a stream with ``"stream": true``."""
    body = await read_object(service, request)
    stream = get(body, "stream", "boolean", "stream must be boolean type.")
    return await respond(service, request, body, stream=bool(stream), wrap_list=True)


# -- parameters of TGI, in MindIE's check order ----------------------------------------------------

_ADAPTER_ID = re.compile(r"^[a-zA-Z0-9_./-]{1,256}$")


def parse_tgi(body: dict, stream: bool) -> GenParams:
    params = GenParams(default_max_tokens=20, stream=stream)
    p = get(body, "parameters", "object", "parameters must be object type.") or {}
    check_stop(p, params, tgi=True)
    check_tgi_sampling(p, params)
    adapter_id = p.get("adapter_id")
    if adapter_id is not None and (not isinstance(adapter_id, str) or not _ADAPTER_ID.match(adapter_id)):
        raise invalid("The format of adapter_id is invalid.")
    check_max_tokens(p, params, "max_new_tokens")
    params.details = bool(get_bool(p, "details"))
    params.decoder_input_details = bool(get_bool(p, "decoder_input_details"))
    if params.decoder_input_details and stream:
        raise invalid("The decoder_input_details must not be true when stream is true.")
    if params.details or params.decoder_input_details:
        params.need_logprobs()  # details.tokens[].logprob
    params.return_full_text = bool(get_bool(p, "return_full_text"))
    truncate = p.get("truncate")
    if truncate is not None:
        if not is_int(truncate) or not 0 < truncate <= INT32_MAX:
            raise invalid(f"Parameter truncate must be in (0,{INT32_MAX}], got {fmt(truncate)}")
        params.truncate = truncate
    params.video = parse_controls([("parameters", {k: p[k] for k in ("num_frames", "fps") if k in p})],
                                  p.get("return_timestamps"))
    return params
