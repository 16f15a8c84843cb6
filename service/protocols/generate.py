"""vLLM's POST /generate (``prompt``); the same path with ``inputs`` is TGI's (service/protocols/tgi.py)."""
from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response

from service.core import Prompt, Service
from service.errors import GENERATE_PARSE_ERROR, invalid
from service.media import first_text
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
    get,
    get_bool,
    media_options,
    none_text,
    sampling_off,
)
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


# -- parameters of vLLM /generate, in MindIE's check order ----------------------------------------

def parse_vllm(body: dict, default_max_tokens: int, max_n: int = 8192) -> GenParams:
    params = GenParams(default_max_tokens=default_max_tokens)
    ignore_eos = get_bool(body, "ignore_eos")
    params.ignore_eos = bool(ignore_eos)
    check_stop(body, params, tgi=False)
    check_stop_token_ids(body, params)
    if params.stop or body.get("stop_token_ids") is not None:
        params.include_stop_str_in_output = bool(get_bool(body, "include_stop_str_in_output"))
    check_temperature(body, params, zero_ok=True)
    check_top_k(body, params, "off_or_positive")
    check_top_p(body, params)
    check_seed(body, params)
    check_repetition_penalty(body, params)
    check_penalty(body, params, "frequency_penalty")
    check_penalty(body, params, "presence_penalty")
    skip = get_bool(body, "skip_special_tokens")
    params.skip_special_tokens = True if skip is None else skip
    check_n_best_of(body, params, max_n)
    model = get(body, "model", "string", "Model must be string type.")
    if model is not None and not 1 <= len(model) <= 256:
        raise invalid(f"Input validation error: length of `model` must be in [1, 256], but got {len(model)}")
    params.model = model  # a LoRA id in MindIE; unknown ids fall back to the base model
    check_max_tokens(body, params, "max_tokens")
    params.stream = bool(get(body, "stream", "boolean", "stream must be boolean type."))
    _vllm_seq_count(params)
    params.video = media_options(body)
    return params


def _vllm_seq_count(params: GenParams) -> None:
    n, best_of = params.n, params.best_of
    if n is not None and best_of is not None and best_of < n:
        raise invalid(f"best_of should greater than or equal to n, but best_of is {best_of}, n is {n}.")
    count = best_of if best_of is not None else (n or 1)
    if count > 1 and sampling_off(params):
        raise invalid(f"Best_of/N can not greater than 1 when temperature is 0 or not set, but best_of is "
                      f"{none_text(best_of)}, n is {none_text(n)}.")
    params.num_seqs = params.num_return = count
    if count > 1:
        params.need_logprobs()  # the texts are sorted by cumulative logprob
