"""OpenAI: POST /v1/chat/completions, /v1/completions, GET /v1/models[/{model}]."""
from __future__ import annotations

import json
import time

from fastapi import Request
from fastapi.responses import Response

from service.core import Handle, Prompt, Service, utf16_len
from service.errors import TOKEN_LIMIT, ApiError, invalid
from service.media import MEDIA_KEYS, precheck_content
from service.params import (
    GenParams,
    check_max_tokens,
    check_n_best_of,
    check_penalty,
    check_repetition_penalty,
    check_seed,
    check_stop,
    check_stop_token_ids,
    check_temperature,
    check_top_k,
    check_top_p,
    fmt,
    get,
    get_bool,
    media_options,
    none_text,
    sampling_off,
)
from service.protocols.common import (
    admit,
    best,
    collect_all,
    dumps,
    json_response,
    read_object,
    request_id,
    sse,
    stream_events,
)
from service.protocols.generate import TOKEN_MSG

COMPLETION_TOKEN_MSG = ("Length of Prompt token should be greater than 0 and less than or equal to 1048576, but "
                        "got {got}")
OPENAI_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


async def chat_completions(service: Service, request: Request) -> Response:
    """POST /v1/chat/completions."""
    body = await read_object(service, request)
    model = check_openai_model(body, service.config.served_model_names)
    messages = check_messages(body)
    service.check_chars(dumps(messages), "Messages length must be in (0, {limit}], but got {got}")
    default, max_n = service.config.max_iter_times, service.config.max_batch_size
    handle = await admit(service, Prompt(messages=messages), lambda: parse_openai(body, default, max_n), TOKEN_MSG)
    return await respond(service, request, handle, model, chat=True)


async def completions(service: Service, request: Request) -> Response:
    """POST /v1/completions: a text prompt (no chat template) or prompt token ids."""
    body = await read_object(service, request)
    model = check_openai_model(body, service.config.served_model_names,
                               "Not found given model, please check modelName in config file.")
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
    handle = await admit(service, Prompt(ids=ids), lambda: parse_completions(body, default, max_n),
                         COMPLETION_TOKEN_MSG)
    return await respond(service, request, handle, model, chat=False)


async def list_models(service: Service, request: Request) -> Response:
    """GET /v1/models (indented and key-sorted, as MindIE's)."""
    data = {"data": [{"id": name, "object": "model", "owned_by": "MindIE Server", "parent": "null",
                      "root": service.config.model_path} for name in service.config.served_model_names],
            "object": "list"}
    return Response(json.dumps(data, indent=4, sort_keys=True, ensure_ascii=False),
                    media_type="application/json", headers={"Connection": "close"})


async def get_model(service: Service, request: Request, model: str) -> Response:
    """GET /v1/models/{model}."""
    if model not in service.config.served_model_names:
        raise ApiError(404, f"Model {model} not found.")
    return json_response({"id": model, "object": "model", "created": int(service.started),
                          "owned_by": "MindIE Server"})


def check_messages(body: dict) -> list:
    """The chat messages, checked in MindIE's order, with text-only list contents flattened."""
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


def flatten_messages(messages: list) -> list:
    """Text-only list contents become one string, up to the first message that carries media
    (docs/SERVICE_API.md section 7)."""
    out, media_seen = [], False
    for message in messages:
        content = message.get("content")
        if not media_seen and isinstance(content, list):
            has_media = any(isinstance(i, dict) and any(k in i for k in MEDIA_KEYS) for i in content)
            if has_media:
                media_seen = True
            elif all(isinstance(i, dict) for i in content):
                message = {**message, "content": "".join(i["text"] for i in content if isinstance(i.get("text"), str))}
        out.append(message)
    return out


async def respond(service: Service, request: Request, handle: Handle, model: str, chat: bool) -> Response:
    """The chat.completion / text_completion answer or stream of an admitted request."""
    params = handle.params
    rid = request_id(service, request)
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
        return OPENAI_REASONS.get(reason, "stop")

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
                timestamps = handle.video_timestamps
                for index in range(count):
                    yield chunk(index, "", None, extra=None if timestamps is None else {"video_timestamps":
                                                                                         timestamps})
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
    obj = {"id": rid, "object": obj_type, "created": created, "model": model, "choices": choices,
           "usage": usage(sum(len(r.token_ids) for r in results))}
    if handle.video_timestamps is not None:
        obj["video_timestamps"] = handle.video_timestamps
    return json_response(obj)


# -- parameters of OpenAI chat and completions, in MindIE's check order -----------------------------

def check_openai_model(body: dict, served: list[str], not_found: str = "Model not found") -> str:
    if body.get("model") is None:
        raise invalid("Request contains not model or model null")
    model = body["model"]
    if not isinstance(model, str):
        raise invalid("Request param model must be string")
    if not model:
        raise invalid("Request param model must be not empty")
    if model not in served:
        raise invalid(not_found)
    return model


def parse_openai(body: dict, default_max_tokens: int, max_n: int = 8192) -> GenParams:
    params = _openai_common(body, default_max_tokens, max_n)
    logprobs = get_bool(body, "logprobs")
    top_logprobs = get(body, "top_logprobs", "unsigned")
    if top_logprobs is not None and not 0 <= top_logprobs <= 20:
        raise invalid(f"Parameter top logprobs must be in [0, 20], got {fmt(top_logprobs)}.")
    if logprobs is False and top_logprobs is not None:
        raise invalid("Value error, when using top_logprobs, logprobs must be true or null in chat completions")
    if logprobs or top_logprobs is not None:
        params.logprobs, params.top_logprobs = True, top_logprobs or 0
        params.need_logprobs(params.top_logprobs)
    _chat_seq_count(params)
    params.video = media_options(body)
    return params


def parse_completions(body: dict, default_max_tokens: int, max_n: int = 8192) -> GenParams:
    params = _openai_common(body, default_max_tokens, max_n)
    logprobs = get(body, "logprobs", "unsigned")
    if logprobs is not None:
        if logprobs > 5:
            raise invalid(f"logprobs should be in range [0, 5], got {fmt(logprobs)}.")
        params.logprobs, params.top_logprobs = True, logprobs
        params.need_logprobs(logprobs)
    _completions_seq_count(params)
    return params


def _openai_common(body: dict, default_max_tokens: int, max_n: int) -> GenParams:
    params = GenParams(default_max_tokens=default_max_tokens)
    check_max_tokens(body, params, "max_tokens")
    check_penalty(body, params, "presence_penalty")
    check_penalty(body, params, "frequency_penalty")
    check_top_p(body, params)
    params.stream = bool(get(body, "stream", "boolean", "stream must be boolean type."))
    check_temperature(body, params, zero_ok=True)
    check_top_k(body, params, "off_or_positive")
    check_repetition_penalty(body, params, upper=2.0, upper_text="2.0")
    check_stop(body, params, tgi=False)
    check_seed(body, params)
    params.ignore_eos = bool(get_bool(body, "ignore_eos"))
    check_stop_token_ids(body, params)
    if params.stop or params.stop_token_ids:
        params.include_stop_str_in_output = bool(get_bool(body, "include_stop_str_in_output"))
    skip = get_bool(body, "skip_special_tokens")
    params.skip_special_tokens = True if skip is None else skip
    check_n_best_of(body, params, max_n)
    return params


def _chat_seq_count(params: GenParams) -> None:
    n, best_of = params.n, params.best_of
    if best_of is not None and n is None and params.stream:
        raise invalid(f"best_of must be equal to n in stream mode, but best_of is {best_of}, n is None.")
    if best_of is not None and n is not None:
        if not params.stream and best_of < n:
            raise invalid(f"best_of must be greater than or equal to n, but best_of is {best_of}, n is {n}.")
        if params.stream and best_of != n:
            raise invalid(f"best_of must be equal to n in stream mode, but best_of is {best_of}, n is {n}.")
    count = best_of if best_of is not None else (n or 1)
    if count > 1 and sampling_off(params):
        raise invalid("best_of/n can not greater than 1 without using beam search when temperature is 0 or not set, "
                      f"but best_of is {none_text(best_of)}, n is {none_text(n)}.")
    _openai_counts(params, count)


def _completions_seq_count(params: GenParams) -> None:
    n, best_of = params.n, params.best_of
    if params.stream:
        if best_of is not None and n is not None and best_of != n:
            raise invalid(f"best_of must be equal to n, but best_of is {best_of} and n is {n}.")
        if best_of is not None and n is None:
            raise invalid(f"best_of must be equal to n in stream mode, but best_of is {best_of}, n is None.")
    elif best_of is not None and n is not None and best_of < n:
        raise invalid(f"Best_of must be greater than or equal to n, but best_of is {best_of} and n is {n}.")
    count = max(best_of or 1, n or 1)
    if count > 1 and sampling_off(params):
        raise invalid("Best_of and n shouldn't be greater than 1 when sampling is disabled, but best_of is "
                      f"{'null' if best_of is None else best_of} and n is {'null' if n is None else n}.")
    _openai_counts(params, count)


def _openai_counts(params: GenParams, count: int) -> None:
    params.num_seqs, params.num_return = count, min(count, params.n or 1)
    if params.num_return < params.num_seqs:
        params.need_logprobs()  # best_of: the best n by cumulative logprob
