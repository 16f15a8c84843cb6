"""HTTP routes: vLLM, TGI, Triton and OpenAI wire formats over one ``Service`` (docs/SERVICE_API.md)."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.core import GenerationTimeout, Handle, Service, utf16_len
from service.errors import (
    GENERATE_PARSE_ERROR,
    JSON_PARSE_ERROR,
    TOKEN_LIMIT,
    ApiError,
    internal_error,
    invalid,
    new_error_id,
)
from service.media import first_text
from service.params import (
    TRITON_ID,
    BodyError,
    check_openai_model,
    get,
    loads_json,
    parse_completions,
    parse_infer,
    parse_openai,
    parse_tgi,
    parse_triton,
    parse_triton_token,
    parse_vllm,
)

logger = logging.getLogger("service")

_MODEL_NAME = r"[\w\-.]+"
TOKEN_MSG = ("Messages token length must be in (0, 1048576], but got {got}. This could be caused by invalid input "
             "format or empty content.")
TGI_TOKEN_MSG = "Inputs token length must be in (0, 1048576], but got {got}"
COMPLETION_TOKEN_MSG = ("Length of Prompt token should be greater than 0 and less than or equal to 1048576, but "
                        "got {got}")
_TGI_REASONS = {"eos": "eos_token", "length": "length", "stop": "stop_sequence"}
_OPENAI_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


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
    names = service.config.served_model_names

    @app.exception_handler(ApiError)
    async def _api_error(_request, error: ApiError):
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, error: StarletteHTTPException):
        return Response(b"", status_code=error.status_code)  # unknown route: empty 404

    @app.exception_handler(Exception)
    async def _internal(request: Request, error: Exception):
        # The details (traceback, library text) go to the log only; the client gets an id to quote.
        rid = new_error_id()
        logger.error(f"internal error {rid} on {request.method} {request.url.path}", exc_info=error)
        return Response(f"Server internal error (request id {rid})", status_code=500, media_type="text/plain",
                        headers={"Connection": "close", "X-Request-Id": rid})

    async def read_request_object(request: Request, message: str = JSON_PARSE_ERROR,
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

    # -- vLLM / TGI /generate ------------------------------------------------------------------
    @app.post("/generate")
    async def generate(request: Request):
        body = await read_request_object(request, GENERATE_PARSE_ERROR, check_running=False)
        if body.get("prompt") is not None:
            service.check_running()
            return await vllm_generate(request, body)
        if body.get("inputs") is not None:
            service.check_running()
            return await tgi_generate(request, body, stream=False, wrap_list=False)
        raise invalid(GENERATE_PARSE_ERROR)

    async def vllm_generate(request: Request, body: dict):
        prompt = body["prompt"]
        if isinstance(prompt, str):
            service.check_chars(prompt, "Prompt must be necessary and data type must be string and length in "
                                        "(0, {limit}], but the length of inputs is {got}")
            echo = prompt
        elif isinstance(prompt, list):
            service.check_items(prompt, "Prompt arr is empty", "Prompt must be necessary and data type must be "
                                "string and length in (0, {limit}], but the length of inputs is {got}")
            echo = first_text(prompt)
        else:
            raise invalid("The type of prompt is abnormal")
        default, max_n = service.config.max_iter_times, service.config.max_batch_size
        handle = await service.admit(items=prompt, parse_params=lambda: parse_vllm(body, default, max_n),
                                     token_message=TOKEN_MSG)
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
                        sent = True
                        yield (dumps({"text": deltas}) + "\0").encode()
            return sse(chunks())
        results = await collect_all(handle, request)
        ranked = best(results, handle.params.num_return, ranked=count > 1)
        return json_response({"text": [f"{echo} {r.text}" for r in ranked]})

    # -- TGI --------------------------------------------------------------------------------
    def tgi_input(body: dict):
        inputs = body.get("inputs")
        if inputs is None:
            raise invalid("Request should contain 'inputs' and the type should be string.")
        if isinstance(inputs, str):
            service.check_chars(inputs, "Inputs length must be in (0, {limit}], but got {got}")
        elif isinstance(inputs, list):
            service.check_items(inputs, "Inputs arr is empty", "Inputs length must be in (0, {limit}], but got {got}")
        else:
            raise invalid("The type of inputs is abnormal")
        return inputs

    async def tgi_generate(request: Request, body: dict, stream: bool, wrap_list: bool):
        inputs = tgi_input(body)
        handle = await service.admit(items=inputs, parse_params=lambda: parse_tgi(body, stream),
                                     token_message=TGI_TOKEN_MSG)
        params = handle.params
        prefix = ""
        if params.return_full_text:
            prefix = (inputs if isinstance(inputs, str) else dumps(inputs)) + " "
        if stream:
            async def chunks():
                text, count = "", 0
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
                    if out.finished:
                        chunk["generated_text"] = prefix + text
                        if params.details:
                            chunk["details"] = {"prompt_tokens": len(handle.prompt_ids),
                                                "finish_reason": _TGI_REASONS.get(out.finish_reason,
                                                                                  "stop_sequence"),
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
                               "finish_reason": _TGI_REASONS.get(result.finish_reason, "stop_sequence"),
                               "generated_tokens": len(result.token_ids), "prefill": prefill, "seed": params.seed,
                               "tokens": [{"id": t, "logprob": lp, "special": service.is_special(t),
                                           "text": service.token_text(t)}
                                          for t, lp in zip(result.token_ids, _padded(result.logprobs,
                                                                                     len(result.token_ids)))]},
                   "generated_text": prefix + result.text}
        return json_response([obj] if wrap_list else obj)

    @app.post("/generate_stream")
    async def generate_stream(request: Request):
        body = await read_request_object(request)
        return await tgi_generate(request, body, stream=True, wrap_list=False)

    @app.post("/")
    async def tgi_root(request: Request):
        body = await read_request_object(request)
        stream = get(body, "stream", "boolean", "stream must be boolean type.")
        return await tgi_generate(request, body, stream=bool(stream), wrap_list=True)

    # -- Triton -----------------------------------------------------------------------------
    def check_model(model: str) -> None:
        import re

        if not re.fullmatch(_MODEL_NAME, model) or model not in names:
            raise ApiError(404, f"Model {model} not found.")

    async def triton(request: Request, model: str, stream: bool):
        check_model(model)
        body = await read_request_object(request)
        # The id is checked with the parameters, but it shapes every response: read it first.
        text_input = body.get("text_input")
        if text_input is None:
            raise invalid("The text_input not found")
        if isinstance(text_input, str):
            service.check_chars(text_input, "Parameter text_input length must be in (0, {limit}], but got {got}")
        elif isinstance(text_input, list):
            service.check_items(text_input, "Parameter text_input arr is empty",
                                "Parameter text_input length must be in (0, {limit}], but got {got}")
        else:
            raise invalid("The type of text_input is abnormal, it must be string or list.")
        handle = await service.admit(items=text_input, parse_params=lambda: parse_triton(body, stream),
                                     token_message=TOKEN_MSG, client_timeout=True)
        params = handle.params
        rid = params.request_id or service.next_request_id(request.headers.get("req-id"))
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
                                   "queue_wait_time": _ms(event.time - handle.submit_time) if count <= 1 else 0}
                        if out.finished:
                            details = {"finish_reason": _TGI_REASONS.get(out.finish_reason, "stop_sequence"),
                                       **details}
                        chunk["details"] = details
                        elapsed = _ms(event.time - previous)
                        chunk["prefill_time"] = elapsed if count <= 1 else None
                        chunk["decode_time"] = None if count <= 1 else elapsed
                    previous = event.time
                    yield f"data:{dumps(chunk)}\n\n".encode()
            return sse(chunks())
        result = await collect(handle, request)
        obj = {**base, "text_output": result.text}
        if params.details:
            obj["details"] = {"finish_reason": _TGI_REASONS.get(result.finish_reason, "stop_sequence"),
                              "generated_tokens": len(result.token_ids), "first_token_cost": None,
                              "decode_cost": None, "batch_size": result.batch_sizes,
                              "queue_wait_time": result.queue_wait}
        return json_response(obj)

    @app.post("/v2/models/{model}/generate")
    async def triton_generate(request: Request, model: str):
        return await triton(request, model, stream=False)

    @app.post("/v2/models/{model}/generate_stream")
    async def triton_generate_stream(request: Request, model: str):
        return await triton(request, model, stream=True)

    # -- OpenAI -----------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_request_object(request)
        model = check_openai_model(body, names)
        messages = check_messages(body)
        service.check_chars(dumps(messages), "Messages length must be in (0, {limit}], but got {got}")
        default, max_n = service.config.max_iter_times, service.config.max_batch_size
        handle = await service.admit(messages=messages, parse_params=lambda: parse_openai(body, default, max_n),
                                     token_message=TOKEN_MSG)
        return await openai_response(request, handle, model, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_request_object(request)
        model = check_openai_model(body, names, "Not found given model, please check modelName in config file.")
        prompt = body.get("prompt")
        if prompt is None:
            raise invalid("Contains not prompt or prompt null")
        if isinstance(prompt, str):
            n = utf16_len(prompt)
            if not 0 < n <= service.max_request_chars:
                raise invalid("Length of Prompt text should be greater than 0 and less than or equal to "
                              f"{service.max_request_chars}, but got {n}")
            service.check_text(prompt)  # before tokenizing: the size limit and a full queue cost nothing
            service.check_queue()
            try:
                ids = await service.tokenizers.run(service.encode_plain, prompt)
            except ValueError as error:
                raise invalid(COMPLETION_TOKEN_MSG.format(got=0) + f" Cause: {error}") from None
        elif isinstance(prompt, list):
            if not prompt:
                raise invalid("Prompt array cannot be empty.")
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise invalid("All elements of the prompt array must be integers.")
            ids = list(prompt)
        else:
            raise invalid("The type of prompt is abnormal,prompt must be str or integer list.")
        if len(ids) > TOKEN_LIMIT:
            raise invalid(COMPLETION_TOKEN_MSG.format(got=len(ids)))
        default, max_n = service.config.max_iter_times, service.config.max_batch_size
        handle = await service.admit(ids=ids, parse_params=lambda: parse_completions(body, default, max_n),
                                     token_message=COMPLETION_TOKEN_MSG)
        return await openai_response(request, handle, model, chat=False)

    async def openai_response(request: Request, handle: Handle, model: str, chat: bool):
        params = handle.params
        rid = service.next_request_id(request.headers.get("req-id"))
        service.track(rid, handle)
        created = int(time.time())
        prompt_tokens = len(handle.prompt_ids)
        obj_type = "chat.completion" if chat else "text_completion"

        def usage(completion: int) -> dict:
            if not chat:
                return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                        "total_tokens": prompt_tokens + completion}
            return {"prompt_tokens": prompt_tokens, "prompt_tokens_details": {"cached_tokens": 0},
                    "completion_tokens": completion, "total_tokens": prompt_tokens + completion}

        def logprobs_of(token_ids, logprobs, tops, offset: int = 0):
            if not params.logprobs:
                return None
            if chat:
                return {"content": chat_logprobs(token_ids, logprobs, tops)}
            return completion_logprobs(token_ids, logprobs, tops, offset)

        def chat_logprobs(token_ids, logprobs, tops) -> list:
            skip = params.skip_special_tokens
            content = []
            for token, logprob, top in zip(token_ids, logprobs, tops):
                text = service.token_text(token, skip)
                content.append({"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8")),
                                "top_logprobs": [{"token": (t := service.token_text(i)), "logprob": v,
                                                  "bytes": list(t.encode("utf-8"))}
                                                 for i, v in top[:params.top_logprobs]]})
            return content

        def completion_logprobs(token_ids, logprobs, tops, offset: int) -> dict:
            out = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
            for token, logprob, top in zip(token_ids, logprobs, tops):
                text = service.token_text(token, params.skip_special_tokens)
                out["text_offset"].append(offset)
                offset += len(text)
                out["token_logprobs"].append(logprob)
                out["tokens"].append(text)
                alternatives = {text: logprob}
                for i, v in top[:params.top_logprobs]:
                    alternatives.setdefault(service.token_text(i), v)
                out["top_logprobs"].append(alternatives)
            return out

        def finish(reason: str | None) -> str:
            return _OPENAI_REASONS.get(reason, "stop")

        if params.stream:
            def chunk(index: int, content: str, finish_reason: str | None, logprobs=None,
                      extra: dict | None = None) -> bytes:
                if chat:
                    choice = {"index": index, "delta": {"role": "assistant", "content": content},
                              "logprobs": logprobs, "finish_reason": finish_reason}
                else:
                    choice = {"index": index, "text": content, "logprobs": logprobs, "stop_reason": None,
                              "finish_reason": finish_reason}
                obj = {"id": rid, "object": obj_type + ".chunk" if chat else obj_type, "created": created,
                       "model": model, "choices": [choice], **(extra or {})}
                return f"data: {dumps(obj)}\n\n".encode()

            async def chunks():
                count = params.num_seqs
                if chat:
                    for index in range(count):
                        yield chunk(index, "", None)
                total = 0
                pending = [([], [], []) for _ in range(count)]  # logprobs of tokens whose text is not out yet
                offsets = [0] * count
                async for event, error in stream_events(handle):
                    if error is not None:
                        yield f"data: {dumps(error)}\n\n".encode()
                        return
                    out, index = event.output, event.index
                    total += len(out.token_ids)
                    ids, lps, tops = pending[index]
                    if out.logprobs:
                        ids.extend(out.token_ids)
                        lps.extend(out.logprobs)
                        tops.extend(out.top_logprobs or [[] for _ in out.logprobs])
                    if not (out.text or out.finished):
                        continue
                    logprobs = logprobs_of(ids, lps, tops, offsets[index])
                    if logprobs is not None and not chat:
                        offsets[index] += sum(len(t) for t in logprobs["tokens"])
                    pending[index] = ([], [], [])
                    if out.finished:
                        yield chunk(index, out.text, finish(out.finish_reason), logprobs, {"usage": usage(total)})
                    else:
                        yield chunk(index, out.text, None, logprobs)
                yield b"data: [DONE]\n\n"
            return sse(chunks())
        results = await collect_all(handle, request)
        chosen = best(results, params.num_return, ranked=params.num_return < params.num_seqs)
        choices = []
        for index, result in enumerate(chosen):
            logprobs = logprobs_of(result.token_ids, result.logprobs, result.top_logprobs)
            if chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": result.text,
                                                            "tool_calls": []},
                                "logprobs": logprobs, "finish_reason": finish(result.finish_reason)})
            else:
                choices.append({"index": index, "text": result.text, "logprobs": logprobs, "stop_reason": None,
                                "finish_reason": "length" if result.finish_reason == "length" else "stop"})
        return json_response({"id": rid, "object": obj_type, "created": created, "model": model,
                              "choices": choices, "usage": usage(sum(len(r.token_ids) for r in results))})

    # -- MindIE native /infer -------------------------------------------------------------------
    @app.post("/infer")
    async def native_infer(request: Request):
        body = await read_request_object(request)
        if "inputs" in body and "input_id" in body:
            raise invalid("Input conflict.")
        ids = items = None
        if "inputs" in body:
            items = body["inputs"]
            chars = "Inputs must be necessary and data type must be string and length in (0, {limit}], but the " \
                    "length of inputs is {got}"
            if items is None:
                raise invalid("Inputs must not be null")
            if isinstance(items, str):
                service.check_chars(items, chars)
            elif isinstance(items, list):
                service.check_items(items, "Inputs arr is empty", chars)
            else:
                raise invalid("The type of inputs is abnormal")
        elif "input_id" in body:
            ids = body["input_id"]
            if ids is None:
                raise invalid("Input_id should not be empty")
            if not isinstance(ids, list):
                raise invalid("Parameter input_id must be an array")
            for token in ids:
                if not isinstance(token, int) or isinstance(token, bool):
                    raise invalid("Parameter input_id must be integer")
                if not 0 <= token <= TOKEN_LIMIT:
                    raise invalid("Data element in param input_id is invalid")
        else:
            raise invalid("Not found inputs.")
        handle = await service.admit(items=items, ids=ids, parse_params=lambda: parse_infer(body),
                                     token_message=TGI_TOKEN_MSG, client_timeout=True)
        params = handle.params
        service.track(service.next_request_id(request.headers.get("req-id")), handle)

        def details(token_ids: list[int], reason: str | None, with_ids: bool) -> dict:
            obj = {"finish_reason": _TGI_REASONS.get(reason, "stop_sequence"), "generated_tokens": len(token_ids)}
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
                    elapsed = _ms(event.time - previous)
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

    # -- Triton token route and stopInfer ---------------------------------------------------------
    @app.post("/v2/models/{model}/infer")
    async def triton_infer(request: Request, model: str):
        check_model(model)
        body = await read_request_object(request)
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
        user_id = get(body, "id", "string")
        if user_id is not None and not TRITON_ID.match(user_id):
            raise invalid("The id can contain only digits, letters, underscores(_), hyphens(-) and no more than "
                          "256 words in length.")
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

        handle = await service.admit(ids=list(data), parse_params=parse, token_message=TGI_TOKEN_MSG,
                                     client_timeout=True)
        rid = user_id or service.next_request_id(request.headers.get("req-id"))
        service.track(rid, handle)
        result = await collect(handle, request)
        return json_response({"id": rid, "outputs": [{"name": outputs[0]["name"] or "output0",
                                                      "shape": [1, len(result.token_ids)], "datatype": "UINT32",
                                                      "data": list(result.token_ids)}]})

    @app.post("/v2/models/{model}/stopInfer")
    async def stop_infer(request: Request, model: str):
        check_model(model)
        body = await read_request_object(request, "Failed to parse context to json body.", check_running=False)
        if "id" not in body:
            raise invalid("Not found id.")
        if body["id"] is None:
            raise invalid("id must not be null.")
        stop_id = get(body, "id", "string")
        if not TRITON_ID.match(stop_id):
            raise invalid("The id can contain only digits, letters, underscores(_), hyphens(-) and no more than "
                          "256 words in length.")
        if not service.stop_request(stop_id):
            raise ApiError(404, f"RequestId is {stop_id} not found.")
        return json_response(body)

    @app.get("/v1/models")
    async def list_models():
        data = {"data": [{"id": name, "object": "model", "owned_by": "MindIE Server", "parent": "null",
                          "root": service.config.model_path} for name in names], "object": "list"}
        return Response(json.dumps(data, indent=4, sort_keys=True, ensure_ascii=False),
                        media_type="application/json", headers={"Connection": "close"})

    @app.get("/v1/models/{model}")
    async def get_model(model: str):
        if model not in names:
            raise ApiError(404, f"Model {model} not found.")
        return json_response({"id": model, "object": "model", "created": int(service.started),
                              "owned_by": "MindIE Server"})

    # -- health and info ----------------------------------------------------------------------
    def stopped_response():
        return error_response(ApiError(503, "The service has been stopped."))

    @app.get("/health")
    async def health():
        return stopped_response() if service.stopping else empty_response()

    @app.get("/v2/health/ready")
    async def ready():
        if service.stopping:
            return stopped_response()
        if service.busy:
            return json_response({"message": "Service is alive but busy. Consider reducing request frequency"},
                                 503)
        return empty_response()

    @app.get("/v2/health/live")
    async def live():
        if service.stopping:
            return stopped_response()
        if service.busy:
            return json_response({"message": "Service is alive but busy"})
        return empty_response()

    @app.get("/v2/models/{model}/ready")
    async def model_ready(model: str):
        check_model(model)
        return stopped_response() if service.stopping else empty_response()

    @app.get("/info")
    async def info():
        cfg = service.config
        return json_response({
            "docker_label": None, "max_batch_total_tokens": cfg.max_prefill_tokens, "max_best_of": 1,
            "max_concurrent_requests": cfg.max_batch_size, "max_input_length": service.max_input_length,
            "max_stop_sequences": None, "max_waiting_tokens": None, "sha": None, "validation_workers": None,
            "version": None, "waiting_served_ratio": None,
            "models": [{"model_device_type": service.model.device.type, "model_dtype": str(service.model.dtype)
                        .replace("torch.", ""), "model_id": name, "model_pipeline_tag": "text-generation",
                        "model_sha": None, "max_total_tokens": service.max_seq_len} for name in names]})

    if debug_routes:
        @app.get("/debug/resources")
        async def debug_resources():
            """Not in MindIE (--enable-debug-routes): KV blocks and shared memory held by the server."""
            return json_response(service.resources())

    # -- helpers over a Handle ------------------------------------------------------------------
    def check_messages(body: dict) -> list:
        from service.media import precheck_content

        messages = body.get("messages")
        if messages is None:
            raise invalid("Request param contains not messages or messages null")
        if not isinstance(messages, list) or not messages:
            raise invalid("Request param contains not messages or messages not arr or arr is empty")
        for message in messages:
            if not isinstance(message, dict) or message.get("role") is None:
                raise invalid("Request param contains not role or role null")
            role, content = message["role"], message.get("content")
            if role == "tool" and (not isinstance(message.get("tool_call_id"), str) or not message["tool_call_id"]):
                raise invalid("Request param tool_call_id must be a non-empty string")
            if role == "assistant" and not message.get("tool_calls"):
                if not isinstance(content, str) or not content:
                    raise invalid('Request param "content" arguments expected to be a string')
            elif role != "assistant":
                if content is None:
                    raise invalid("Request param contains not content or content null")
                if isinstance(content, list):
                    if not content:
                        raise invalid("The type of inputs is abnormal")
                    precheck_content(content)
                elif not isinstance(content, str):
                    raise invalid("The type of inputs is abnormal")
        return flatten_messages(messages)

    return app


def flatten_messages(messages: list) -> list:
    """Text-only list contents become one string, up to the first message that carries media
    (docs/SERVICE_API.md section 7)."""
    out, media_seen = [], False
    for message in messages:
        content = message.get("content")
        if not media_seen and isinstance(content, list):
            has_media = any(isinstance(i, dict) and any(k in i for k in ("image_url", "video_url", "audio_url"))
                            for i in content)
            if has_media:
                media_seen = True
            elif all(isinstance(i, dict) for i in content):
                message = {**message, "content": "".join(i["text"] for i in content if isinstance(i.get("text"), str))}
        out.append(message)
    return out


def _padded(values: list, length: int) -> list:
    return list(values[:length]) + [None] * max(0, length - len(values))


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def sse(chunks: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class Result:
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
                    result.queue_wait.append(_ms(event.time - handle.submit_time) if not result.queue_wait else 0)
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


__all__: list[Callable] = ["create_app"]
