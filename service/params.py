"""Request parameters of each protocol: type rules, ranges, check order and error texts of the spec.

Each ``parse_*`` function checks one protocol's fields in the spec's order and raises ``ApiError(422)``
with the spec's text at the first failure. The result, ``GenParams``, is protocol-neutral; the
service turns it into the engine's ``SamplingParams`` once the prompt length is known.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field

from atb_llm.runner.sampler import SamplingParams
from service.errors import invalid
from service.video import VideoOptions, parse_controls

FLT_MAX = 3.4028234663852886e38
INT32_MAX = 2**31 - 1
INT63_MAX = 2**63 - 1
FLT_MAX_TEXT = "3.40282e+38"

_ADAPTER_ID = re.compile(r"^[a-zA-Z0-9_./-]{1,256}$")


MAX_JSON_DEPTH = 10  # MindIE's JSON_STR_DEP_MAX: containers inside at most 10 enclosing ones
_SURROGATE = re.compile("[\ud800-\udfff]")
_NESTED = frozenset((dict, list))


class BodyError(ValueError):
    """A body that parses as JSON but is refused (its text is the client's 422 message)."""


DEPTH_ERROR = (f"Failed to parse request context to json: JSON nesting deeper than {MAX_JSON_DEPTH} levels is not "
               "accepted")
SURROGATE_ERROR = ("Failed to parse request context to json: a string contains an unpaired UTF-16 surrogate "
                   "(an escape in \\ud800-\\udfff without its pair), which is not valid Unicode text")


def loads_json(raw: bytes):
    """Strict UTF-8 JSON (no NaN / Infinity, as a C++ JSON parser); raises ValueError.

    Every body goes through here, so what no route can handle is refused once, at the root: nesting deeper
    than ``MAX_JSON_DEPTH`` (MindIE's limit; ``BodyError``, also for bodies too deep for Python's parser) and
    strings (keys too) holding a lone surrogate (``"\\ud800"`` parses, but cannot be encoded as UTF-8).
    """
    def reject(name):
        raise ValueError(f"invalid JSON constant {name}")

    text = raw.decode("utf-8")
    try:
        value = json.loads(text, parse_constant=reject)
    except RecursionError:
        raise BodyError(DEPTH_ERROR) from None
    # A surrogate can only come from a \\uDxxx escape (raw ones are not valid UTF-8): look for strings only then.
    check_json_value(value, strings=b"\\ud" in raw or b"\\uD" in raw)
    return value


def check_json_value(value, strings: bool = True) -> None:
    """Raises ``BodyError`` for a container nested deeper than ``MAX_JSON_DEPTH`` or, with ``strings``, a
    string or key holding a lone surrogate."""
    if strings:
        _check_strings(value)
    stack = [(value, 0)] if value.__class__ in _NESTED else []
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise BodyError(DEPTH_ERROR)
        children = item.values() if isinstance(item, dict) else item
        if any(map(_NESTED.__contains__, map(type, children))):
            stack.extend((child, depth + 1) for child in children if child.__class__ in _NESTED)


def _check_strings(value) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                raise BodyError(SURROGATE_ERROR)
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def fmt(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value, ensure_ascii=False)


# -- JSON type rules (absent or null = not provided) -----------------------------------------------

def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_TYPE_CHECKS = {
    "float": _is_number,
    "integer": _is_int,
    "unsigned": lambda v: _is_int(v) and v >= 0,
    "boolean": lambda v: isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


def get(body: dict, key: str, kind: str, message: str | None = None):
    """The value of ``key`` if provided, checked against the JSON type ``kind``; None if absent/null."""
    value = body.get(key)
    if value is None:
        return None
    if not _TYPE_CHECKS[kind](value):
        raise invalid(message or f"{key} must be {kind} type.")
    return value


@dataclass
class GenParams:
    """Protocol-neutral generation parameters (None = not provided)."""

    max_tokens: int | None = None
    default_max_tokens: int = 20
    temperature: float | None = None
    top_k: int | None = None  # 0 = off
    top_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    do_sample: bool | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool = False
    truncate: int | None = None
    timeout: float | None = None  # client deadline in seconds (Triton)
    request_id: str | None = None  # Triton body id
    model: str | None = None
    n: int | None = None
    best_of: int | None = None
    num_seqs: int = 1  # engine sequences generated (max of n and best_of)
    num_return: int = 1  # sequences returned (the best ones by cumulative logprob when fewer than num_seqs)
    logprobs: bool = False  # return per-token logprobs (OpenAI)
    top_logprobs: int = 0  # and this many alternatives per token
    engine_logprobs: int | None = None  # SamplingParams.logprobs: None = not computed
    video: VideoOptions | None = None  # per-request frame controls (service/video.py)

    def need_logprobs(self, top: int = 0) -> None:
        self.engine_logprobs = max(top, self.engine_logprobs or 0)

    def resolved_seed(self) -> int:
        """The seed used (a random one when none was given), so it can be echoed (TGI details.seed)."""
        if self.seed is None:
            self.seed = secrets.randbelow(INT63_MAX)
        return self.seed

    def sampling(self, max_new_tokens: int, vocab_size: int) -> SamplingParams:
        sampled_fields = (self.temperature, self.top_k, self.top_p)
        do_sample = self.do_sample if self.do_sample is not None else any(v is not None for v in sampled_fields)
        temperature = 1.0 if self.temperature is None else float(self.temperature)
        top_k = self.top_k or 0
        if vocab_size and top_k > vocab_size:
            top_k = vocab_size  # clamped silently, as the engine does
        stop_ids = [t for t in self.stop_token_ids if t >= 0 and (not vocab_size or t < vocab_size)]
        has_stop = bool(self.stop or self.stop_token_ids)
        params = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
            top_p=1.0 if self.top_p is None else float(self.top_p),
            typical_p=1.0 if self.typical_p is None else float(self.typical_p),
            repetition_penalty=1.0 if self.repetition_penalty is None else float(self.repetition_penalty),
            presence_penalty=0.0 if self.presence_penalty is None else float(self.presence_penalty),
            frequency_penalty=0.0 if self.frequency_penalty is None else float(self.frequency_penalty),
            do_sample=bool(do_sample) and temperature > 0, seed=self.resolved_seed(), stop=list(self.stop),
            stop_token_ids=stop_ids, ignore_eos=self.ignore_eos, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output and has_stop, logprobs=self.engine_logprobs)
        params.validate()
        return params


# -- shared field checks ----------------------------------------------------------------------------

def _check_stop(body: dict, params: GenParams, tgi: bool) -> None:
    value = body.get("stop")
    if value is None:
        return
    single_max, item_max, total_max, count_max = (1024, 1024, 32768, 1024) if tgi else (32768, 1024, 32768, None)
    if isinstance(value, str):
        if not 1 <= len(value) <= single_max:
            raise invalid(f"Input validation error: the length of param stop must be in [1, {single_max}], "
                          f"but got {len(value)}")
        params.stop = [value]
        return
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise invalid("Input validation error: param stop must be string or list[string]")
    if count_max is not None and len(value) > count_max:
        raise invalid(f"Input validation error: the number of stop strings must be no more than {count_max}, "
                      f"but got {len(value)}")
    for s in value:
        if not 1 <= len(s) <= item_max:
            raise invalid(f"Input validation error: the length of each string in param stop must be in "
                          f"[1, {item_max}], but got {len(s)}")
    total = sum(len(s) for s in value)
    if total > total_max:
        raise invalid(f"Input validation error: the total length of param stop must be no more than {total_max}, "
                      f"but got {total}")
    params.stop = list(value)


def _check_stop_token_ids(body: dict, params: GenParams) -> None:
    value = body.get("stop_token_ids")
    if value is None:
        return
    if not isinstance(value, list) or not all(_is_int(t) for t in value):
        raise invalid("Parameter stop_token_ids not list[int]")
    params.stop_token_ids = list(value)


def _bool(body: dict, key: str) -> bool | None:
    return get(body, key, "boolean")


def _temperature(body: dict, params: GenParams, zero_ok: bool, upper: float = FLT_MAX,
                 upper_text: str = FLT_MAX_TEXT) -> None:
    value = get(body, "temperature", "float")
    if value is None:
        return
    low_ok = value >= 0 if zero_ok else value > 0
    if not (low_ok and value <= upper):
        raise invalid(f"Parameter temperature must be in (0.0,{upper_text}], got {fmt(value)}.")
    params.temperature = value


def _top_p(body: dict, params: GenParams, exclusive_one: bool = False) -> None:
    value = get(body, "top_p", "float")
    if value is None:
        return
    if not (0 < value < 1 if exclusive_one else 0 < value <= 1):
        raise invalid(f"Parameter top_p must be in (0.0,1.0], got {fmt(value)}.")
    params.top_p = value


def _typical_p(body: dict, params: GenParams) -> None:
    value = get(body, "typical_p", "float")
    if value is None:
        return
    if not 0 < value <= 1:
        raise invalid(f"Parameter typical_p must be in (0.0,1.0], got {fmt(value)}.")
    params.typical_p = value


def _seed(body: dict, params: GenParams) -> None:
    value = body.get("seed")
    if value is None:
        return
    if not _is_int(value) or not 0 <= value <= INT63_MAX:
        raise invalid(f"Parameter seed must be in [0, {INT63_MAX}], got {fmt(value)}.")
    params.seed = value


def _repetition_penalty(body: dict, params: GenParams, upper: float = FLT_MAX, upper_text: str = FLT_MAX_TEXT):
    value = get(body, "repetition_penalty", "float")
    if value is None:
        return
    if not 0 < value <= upper:
        raise invalid(f"Parameter 'repetition_penalty' must be in (0.0, {upper_text}], got {fmt(value)}.")
    params.repetition_penalty = value


def _penalty(body: dict, params: GenParams, key: str) -> None:
    value = get(body, key, "float")
    if value is None:
        return
    if not -2.0 <= value <= 2.0:
        if key == "presence_penalty":
            raise invalid(f"Parameter presence_penalty not in [-2.0, 2.0], but got {fmt(value)}.")
        raise invalid(f"Parameter frequency_penalty should be in [-2.0, 2.0], got {fmt(value)}.")
    setattr(params, key, value)


def _max_tokens(body: dict, params: GenParams, key: str) -> None:
    value = body.get(key)
    if value is None:
        return
    if not _is_int(value):
        raise invalid(f"Parameter {key} not number_integer")
    if not 0 < value <= INT32_MAX:
        raise invalid(f"Parameter {key} must be (0,{INT32_MAX}], got {fmt(value)}")
    params.max_tokens = value


def _n_best_of(body: dict, params: GenParams, max_n: int) -> None:
    """The ranges of best_of and n; how they combine is checked per protocol after all fields."""
    best_of = get(body, "best_of", "unsigned")
    if best_of is not None and not 1 <= best_of <= 128:
        raise invalid(f"Parameter [best_of] should be in [1, 128], got {fmt(best_of)}.")
    n = get(body, "n", "unsigned")
    if n is not None:
        if not 1 <= n <= 8192:
            raise invalid(f"Parameter [n] should be in [1, 8192], got {fmt(n)}.")
        if n > max_n:
            raise invalid(f"The n parameter ({n}) exceeds 'max_batch_size' ({max_n}). Please reduce n or increase "
                          "'max_batch_size' in config.json of mindie-service.")
    params.best_of, params.n = best_of, n


def _none(value) -> str:
    return "None" if value is None else str(value)


def _sampling_off(params: GenParams) -> bool:
    return not params.temperature  # absent or 0


def _vllm_seq_count(params: GenParams) -> None:
    n, best_of = params.n, params.best_of
    if n is not None and best_of is not None and best_of < n:
        raise invalid(f"best_of should greater than or equal to n, but best_of is {best_of}, n is {n}.")
    count = best_of if best_of is not None else (n or 1)
    if count > 1 and _sampling_off(params):
        raise invalid(f"Best_of/N can not greater than 1 when temperature is 0 or not set, but best_of is "
                      f"{_none(best_of)}, n is {_none(n)}.")
    params.num_seqs = params.num_return = count
    if count > 1:
        params.need_logprobs()  # the texts are sorted by cumulative logprob


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
    if count > 1 and _sampling_off(params):
        raise invalid("best_of/n can not greater than 1 without using beam search when temperature is 0 or not set, "
                      f"but best_of is {_none(best_of)}, n is {_none(n)}.")
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
    if count > 1 and _sampling_off(params):
        raise invalid("Best_of and n shouldn't be greater than 1 when sampling is disabled, but best_of is "
                      f"{'null' if best_of is None else best_of} and n is {'null' if n is None else n}.")
    _openai_counts(params, count)


def _openai_counts(params: GenParams, count: int) -> None:
    params.num_seqs, params.num_return = count, min(count, params.n or 1)
    if params.num_return < params.num_seqs:
        params.need_logprobs()  # best_of: the best n by cumulative logprob


# -- vLLM /generate -------------------------------------------------------------------------------


_TOP_K_RULES = {  # protocol rule -> (accepted, message range)
    "off_or_positive": (lambda k: k == -1 or 0 < k <= INT32_MAX, f"-1 || (0,{INT32_MAX}]"),  # vLLM, OpenAI
    "positive": (lambda k: 0 < k <= INT32_MAX, f"(0,{INT32_MAX}]"),  # TGI, /infer
    "non_negative": (lambda k: 0 <= k <= INT32_MAX, f"[0,{INT32_MAX}]"),  # Triton
}


def _top_k(source: dict, params: GenParams, rule: str) -> None:
    """``top_k`` by the protocol's range; -1 (vLLM, OpenAI) and 0 mean off."""
    top_k = source.get("top_k")
    if top_k is None:
        return
    accepted, message_range = _TOP_K_RULES[rule]
    if not _is_int(top_k) or not accepted(top_k):
        raise invalid(f"Parameter top_k must be in {message_range}, got {fmt(top_k)}")
    params.top_k = 0 if top_k == -1 else top_k

def parse_vllm(body: dict, default_max_tokens: int, max_n: int = 8192) -> GenParams:
    params = GenParams(default_max_tokens=default_max_tokens)
    ignore_eos = _bool(body, "ignore_eos")
    params.ignore_eos = bool(ignore_eos)
    _check_stop(body, params, tgi=False)
    _check_stop_token_ids(body, params)
    if params.stop or body.get("stop_token_ids") is not None:
        params.include_stop_str_in_output = bool(_bool(body, "include_stop_str_in_output"))
    _temperature(body, params, zero_ok=True)
    _top_k(body, params, "off_or_positive")
    _top_p(body, params)
    _seed(body, params)
    _repetition_penalty(body, params)
    _penalty(body, params, "frequency_penalty")
    _penalty(body, params, "presence_penalty")
    skip = _bool(body, "skip_special_tokens")
    params.skip_special_tokens = True if skip is None else skip
    _n_best_of(body, params, max_n)
    model = get(body, "model", "string", "Model must be string type.")
    if model is not None and not 1 <= len(model) <= 256:
        raise invalid(f"Input validation error: length of `model` must be in [1, 256], but got {len(model)}")
    params.model = model  # a LoRA id in MindIE; unknown ids fall back to the base model
    _max_tokens(body, params, "max_tokens")
    params.stream = bool(get(body, "stream", "boolean", "stream must be boolean type."))
    _vllm_seq_count(params)
    params.video = _vllm_video(body)
    return params


def _vllm_video(body: dict) -> VideoOptions | None:
    """vLLM's per-request media fields: ``mm_processor_kwargs`` and ``media_io_kwargs.video`` (``num_frames``,
    ``fps``), and ``return_timestamps``."""
    media_io = body.get("media_io_kwargs")
    if media_io is not None:
        if not isinstance(media_io, dict):
            raise invalid("media_io_kwargs must be an object")
        other = sorted(set(media_io) - {"video"})
        if other:
            raise invalid(f"media_io_kwargs supports only video for this model, got {other}")
    return parse_controls([("mm_processor_kwargs", body.get("mm_processor_kwargs")),
                           ("media_io_kwargs.video", (media_io or {}).get("video"))], body.get("return_timestamps"))


# -- TGI /generate, /generate_stream, / -----------------------------------------------------------

def parse_tgi(body: dict, stream: bool) -> GenParams:
    params = GenParams(default_max_tokens=20, stream=stream)
    p = get(body, "parameters", "object", "parameters must be object type.") or {}
    _check_stop(p, params, tgi=True)
    _temperature(p, params, zero_ok=False)
    _top_k(p, params, "positive")
    _top_p(p, params, exclusive_one=True)
    _typical_p(p, params)
    params.do_sample = _bool(p, "do_sample")
    _seed(p, params)
    _repetition_penalty(p, params)
    _bool(p, "watermark")  # forwarded in MindIE; no visible effect
    adapter_id = p.get("adapter_id")
    if adapter_id is not None and (not isinstance(adapter_id, str) or not _ADAPTER_ID.match(adapter_id)):
        raise invalid("The format of adapter_id is invalid.")
    _max_tokens(p, params, "max_new_tokens")
    params.details = bool(_bool(p, "details"))
    params.decoder_input_details = bool(_bool(p, "decoder_input_details"))
    if params.decoder_input_details and stream:
        raise invalid("The decoder_input_details must not be true when stream is true.")
    if params.details or params.decoder_input_details:
        params.need_logprobs()  # details.tokens[].logprob
    params.return_full_text = bool(_bool(p, "return_full_text"))
    truncate = p.get("truncate")
    if truncate is not None:
        if not _is_int(truncate) or not 0 < truncate <= INT32_MAX:
            raise invalid(f"Parameter truncate must be in (0,{INT32_MAX}], got {fmt(truncate)}")
        params.truncate = truncate
    params.video = parse_controls([("parameters", {k: p[k] for k in ("num_frames", "fps") if k in p})],
                                  p.get("return_timestamps"))
    return params


# -- Triton /v2/models/{m}/generate[_stream] ------------------------------------------------------

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
    _temperature(p, params, zero_ok=False)
    _top_k(p, params, "non_negative")
    _top_p(p, params)
    _typical_p(p, params)
    params.do_sample = _bool(p, "do_sample")
    _bool(p, "watermark")
    _seed(p, params)
    _repetition_penalty(p, params)
    priority = p.get("priority")
    if priority is not None and (not _is_int(priority) or not 1 <= priority <= 5):
        raise invalid(f"Parameter priority must be in [1, 5], got {fmt(priority)}")
    _max_tokens(p, params, "max_new_tokens")
    params.details = bool(_bool(p, "details"))
    batch_size = p.get("batch_size")
    if batch_size is not None and (not _is_int(batch_size) or not 0 < batch_size <= INT32_MAX):
        raise invalid(f"Parameter batch_size must be in (0,{INT32_MAX}], got {fmt(batch_size)}")
    timeout = p.get("timeout")
    if timeout is not None:
        if not _is_int(timeout) or not 0 < timeout <= 65535:
            raise invalid(f"Parameter timeout must be in (0, 65535], got {fmt(timeout)}")
        params.timeout = float(timeout)
    return params


# -- OpenAI /v1/chat/completions ------------------------------------------------------------------

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
    logprobs = _bool(body, "logprobs")
    top_logprobs = get(body, "top_logprobs", "unsigned")
    if top_logprobs is not None and not 0 <= top_logprobs <= 20:
        raise invalid(f"Parameter top logprobs must be in [0, 20], got {fmt(top_logprobs)}.")
    if logprobs is False and top_logprobs is not None:
        raise invalid("Value error, when using top_logprobs, logprobs must be true or null in chat completions")
    if logprobs or top_logprobs is not None:
        params.logprobs, params.top_logprobs = True, top_logprobs or 0
        params.need_logprobs(params.top_logprobs)
    _chat_seq_count(params)
    params.video = _vllm_video(body)
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
    _max_tokens(body, params, "max_tokens")
    _penalty(body, params, "presence_penalty")
    _penalty(body, params, "frequency_penalty")
    _top_p(body, params)
    params.stream = bool(get(body, "stream", "boolean", "stream must be boolean type."))
    _temperature(body, params, zero_ok=True)
    _top_k(body, params, "off_or_positive")
    _repetition_penalty(body, params, upper=2.0, upper_text="2.0")
    _check_stop(body, params, tgi=False)
    _seed(body, params)
    params.ignore_eos = bool(_bool(body, "ignore_eos"))
    _check_stop_token_ids(body, params)
    if params.stop or params.stop_token_ids:
        params.include_stop_str_in_output = bool(_bool(body, "include_stop_str_in_output"))
    skip = _bool(body, "skip_special_tokens")
    params.skip_special_tokens = True if skip is None else skip
    _n_best_of(body, params, max_n)
    return params


# -- MindIE native POST /infer ----------------------------------------------------------------------

def parse_infer(body: dict) -> GenParams:
    """``parameters`` of /infer: the Triton names without batch_size, TGI ranges for top_k and top_p."""
    params = GenParams(default_max_tokens=20)
    p = get(body, "parameters", "object", "parameters must be object type.") or {}
    _temperature(p, params, zero_ok=False)
    _top_k(p, params, "positive")
    _top_p(p, params, exclusive_one=True)
    _typical_p(p, params)
    params.do_sample = _bool(p, "do_sample")
    _seed(p, params)
    _repetition_penalty(p, params)
    _bool(p, "watermark")
    _priority(p)
    _max_tokens(p, params, "max_new_tokens")
    _timeout(p, params)
    params.details = bool(_bool(p, "details"))
    params.stream = bool(get(body, "stream", "boolean", "stream must be boolean type."))
    return params


# -- Triton token /v2/models/{m}/infer --------------------------------------------------------------

def parse_triton_token(p: dict) -> GenParams:
    """``inputs[0].parameters`` of the Triton token route, in MindIE's order."""
    params = GenParams(default_max_tokens=20)
    _temperature(p, params, zero_ok=False)
    _top_k(p, params, "non_negative")
    _top_p(p, params)
    params.do_sample = _bool(p, "do_sample")
    _seed(p, params)
    _repetition_penalty(p, params)
    _bool(p, "watermark")
    _priority(p)
    _max_tokens(p, params, "max_new_tokens")
    _timeout(p, params)
    params.details = bool(_bool(p, "details"))
    _batch_size(p)
    return params


def _priority(p: dict) -> None:
    priority = p.get("priority")
    if priority is not None and (not _is_int(priority) or not 1 <= priority <= 5):
        raise invalid(f"Parameter priority must be in [1, 5], got {fmt(priority)}")


def _timeout(p: dict, params: GenParams) -> None:
    timeout = p.get("timeout")
    if timeout is not None:
        if not _is_int(timeout) or not 0 < timeout <= 65535:
            raise invalid(f"Parameter timeout must be in (0, 65535], got {fmt(timeout)}")
        params.timeout = float(timeout)


def _batch_size(p: dict) -> None:
    batch_size = p.get("batch_size")
    if batch_size is not None and (not _is_int(batch_size) or not 0 < batch_size <= INT32_MAX):
        raise invalid(f"Parameter batch_size must be in (0,{INT32_MAX}], got {fmt(batch_size)}")
