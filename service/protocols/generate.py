"""vLLM's POST /generate (``prompt``); the same path with ``inputs`` is TGI's (service/protocols/tgi.py)."""
from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response

from service.core import Prompt, Service
from service.errors import GENERATE_PARSE_ERROR, invalid
from service.media import first_text
from service.params import parse_vllm
from service.protocols import tgi
from service.protocols.common import (
    admit,
    best,
    check_prompt,
    collect_all,
    dumps,
    json_response,
    read_object,
    sse,
    stream_batches,
)

TOKEN_MSG = ("Messages token length must be in (0, 1048576], but got {got}. This could be caused by invalid input "
             "format or empty content.")
PROMPT_CHARS = ("Prompt must be necessary and data type must be string and length in (0, {limit}], but the length "
                "of inputs is {got}")


async def generate(service: Service, request: Request) -> Response:
    """POST /generate: vLLM with ``prompt``, TGI with ``inputs``, else the double-encoded parse error."""
    body = await read_object(service, request, GENERATE_PARSE_ERROR, check_running=False)
    if body.get("prompt") is not None:
        service.check_running()
        return await vllm_generate(service, request, body)
    if body.get("inputs") is not None:
        service.check_running()
        return await tgi.respond(service, request, body, stream=False, wrap_list=False)
    raise invalid(GENERATE_PARSE_ERROR)


async def vllm_generate(service: Service, request: Request, body: dict) -> Response:
    prompt = check_prompt(service, body["prompt"], chars=PROMPT_CHARS, empty="Prompt arr is empty",
                          abnormal="The type of prompt is abnormal")
    echo = prompt if isinstance(prompt, str) else first_text(prompt)
    default, max_n = service.config.max_iter_times, service.config.max_batch_size
    handle = await admit(service, Prompt(items=prompt), lambda: parse_vllm(body, default, max_n), TOKEN_MSG)
    count = handle.params.num_seqs
    if handle.params.stream:
        async def chunks():
            sent = False
            async for batch, error in stream_batches(handle):
                if error is not None:
                    yield (dumps(error) + "\0").encode()
                    return
                deltas = [""] * count
                for event in batch:
                    deltas[event.index] += event.output.text
                if any(deltas) or (handle.finished and not sent):
                    chunk = {"text": deltas}
                    if not sent and handle.video_timestamps is not None:
                        chunk["video_timestamps"] = handle.video_timestamps
                    sent = True
                    yield (dumps(chunk) + "\0").encode()
        return sse(chunks())
    results = await collect_all(handle, request)
    ranked = best(results, handle.params.num_return, ranked=count > 1)
    obj = {"text": [f"{echo} {r.text}" for r in ranked]}
    if handle.video_timestamps is not None:
        obj["video_timestamps"] = handle.video_timestamps
    return json_response(obj)
