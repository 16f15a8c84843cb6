"""What every protocol shares: JSON bodies and responses, the one prompt check, admission, and running a
request to its end (collect) or as a stream of step events."""
from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from service.core import GenerationTimeout, Handle, Prompt, Service
from service.errors import JSON_PARSE_ERROR, ApiError, TokenCountError, internal_error, invalid
from service.params import BodyError, GenParams, loads_json

TGI_REASONS = {"eos": "eos_token", "length": "length", "stop": "stop_sequence"}


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def json_response(obj, status: int = 200, headers: dict | None = None) -> Response:
    """Non-streaming responses carry ``Connection: close``, as MindIE's."""
    return Response(dumps(obj), status_code=status, media_type="application/json",
                    headers={"Connection": "close", **(headers or {})})


def error_response(error: ApiError) -> Response:
    return json_response(error.body(), error.status, error.headers)


def empty_response(status: int = 200) -> Response:
    return Response(b"", status_code=status, headers={"Connection": "close"})


def sse(chunks: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def ms(seconds: float) -> int:
    return round(seconds * 1000)


def padded(values: list, length: int) -> list:
    return list(values[:length]) + [None] * max(0, length - len(values))


async def read_object(service: Service, request: Request, message: str = JSON_PARSE_ERROR,
                      check_running: bool = True) -> dict:
    """Every route's body: UTF-8 JSON (no NaN), nesting at most 10 deep, no lone surrogate in any string
    (``loads_json``), and an object; else a 422 (``message`` for a plain parse error). Then 503 if the
    service is stopping."""
    try:
        body = loads_json(await request.body())
    except BodyError as error:
        raise invalid(str(error)) from None
    except (ValueError, UnicodeDecodeError):
        raise invalid(message) from None
    if not isinstance(body, dict):
        raise invalid(message)
    if check_running:
        service.check_running()
    return body


def check_prompt(service: Service, value, *, chars: str, empty: str, abnormal: str, missing: str | None = None):
    """The one check of a prompt field that is text or a list of content items: ``missing`` if null (when
    given), ``chars`` (``{limit}``, ``{got}``) for a length out of range, ``empty`` for an empty list,
    ``abnormal`` for any other type. Returns the value."""
    if value is None and missing is not None:
        raise invalid(missing)
    if isinstance(value, str):
        service.check_chars(value, chars)
    elif isinstance(value, list):
        service.check_items(value, empty, chars)
    else:
        raise invalid(abnormal)
    return value


async def admit(service: Service, prompt: Prompt, parse_params: Callable[[], GenParams], token_message: str,
                client_timeout: bool = False) -> Handle:
    """``prepare`` the prompt, parse the parameters (after the media, as MindIE), ``submit``; the
    token-count error is worded by ``token_message`` (``{got}``)."""
    prepared = await service.prepare(prompt)
    try:
        params = parse_params()
    except BaseException:
        prepared.release()
        raise
    try:
        return await service.submit(prepared, params, client_timeout=client_timeout)
    except TokenCountError as error:
        raise error.render(token_message) from None


class Result:
    """One sequence of a non-streaming request, run to its end."""

    def __init__(self):
        self.text = ""
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.batch_sizes: list[int] = []
        self.queue_wait: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []

    @property
    def cumulative_logprob(self) -> float:
        return sum(self.logprobs)


def best(results: list[Result], count: int, ranked: bool) -> list[Result]:
    """The ``count`` sequences to return: the best by cumulative logprob when ``ranked``, else in order."""
    if ranked:
        results = sorted(results, key=lambda r: r.cumulative_logprob, reverse=True)
    return results[:count]


async def collect_all(handle: Handle, request: Request) -> list[Result]:
    """Run a non-streaming request (all of its sequences) to its end; aborted if the client disconnects or
    the deadline passes."""
    results = [Result() for _ in handle.requests]
    last = [None] * len(results)
    try:
        async with contextlib.aclosing(handle.events(request)) as events:
            async for event in events:
                out, result = event.output, results[event.index]
                result.text += out.text
                result.token_ids.extend(out.token_ids)
                if out.logprobs:
                    result.logprobs.extend(out.logprobs)
                    result.top_logprobs.extend(out.top_logprobs or [[] for _ in out.logprobs])
                if out.token_ids:
                    result.batch_sizes.append(event.batch_size)
                    result.queue_wait.append(ms(event.time - handle.submit_time) if not result.queue_wait else 0)
                last[event.index] = out
    except GenerationTimeout as error:
        raise ApiError(500, str(error)) from None
    if any(out is None or not out.finished for out in last):
        raise ApiError(500, "Client disconnected; the request was aborted")
    for result, out in zip(results, last):
        result.finish_reason = out.finish_reason
        if out.finish_reason == "error":
            raise internal_error("Generation failed", out.error)
        if out.finish_reason == "abort":
            if handle.stopped:  # /stopInfer: what was generated so far, as a stop
                result.finish_reason = "stop"
                continue
            if handle.service.stopping:
                raise ApiError(503, "The service has been stopped")
            raise ApiError(500, "The request was aborted")
    return results


async def collect(handle: Handle, request: Request) -> Result:
    return (await collect_all(handle, request))[0]


async def stream_batches(handle: Handle) -> AsyncIterator[tuple]:
    """(events, None) per group of step outputs, or a final (None, error body) for a timeout, failure or
    shutdown. An abort by /stopInfer ends its sequence as a normal stop.

    When the client disconnects, Starlette cancels the response task: the ``aclosing`` block then aborts
    the request, which frees its KV blocks and shared memory.
    """
    try:
        async with contextlib.aclosing(handle.batches()) as batches:
            async for batch in batches:
                for event in batch:
                    out = event.output
                    if out.finished and out.finish_reason == "error":
                        yield None, internal_error("Generation failed", out.error).body()
                        return
                    if out.finished and out.finish_reason == "abort":
                        if handle.stopped:
                            out.finish_reason = "stop"
                            continue
                        status, text = (503, "The service has been stopped") if handle.service.stopping else (
                            500, "The request was aborted")
                        yield None, ApiError(status, text).body()
                        return
                yield batch, None
    except GenerationTimeout as error:
        yield None, ApiError(500, str(error)).body()


async def stream_events(handle: Handle) -> AsyncIterator[tuple]:
    """(event, None) per sequence step, or a final (None, error body); see ``stream_batches``."""
    async with contextlib.aclosing(stream_batches(handle)) as batches:
        async for batch, error in batches:
            if error is not None:
                yield None, error
                return
            for event in batch:
                yield event, None


def request_id(service: Service, request: Request) -> str:
    """The id /stopInfer knows a request by: the client's ``req-id`` header, else a generated one."""
    return service.next_request_id(request.headers.get("req-id"))
