"""What the protocols' parameters share: the JSON body reader, type rules, and one check per field (range and
error text of the spec), each raising ``ApiError(422)`` at the first failure.

Each protocol's ``parse_*`` (service/protocols/<name>.py) calls these checks in its spec's order. The result,
``GenParams``, is protocol-neutral; the service turns it into the engine's ``SamplingParams`` once the prompt
length is known.
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


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_TYPE_CHECKS = {
    "float": _is_number,
    "integer": is_int,
    "unsigned": lambda v: is_int(v) and v >= 0,
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

def check_stop(body: dict, params: GenParams, tgi: bool) -> None:
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


def check_stop_token_ids(body: dict, params: GenParams) -> None:
    value = body.get("stop_token_ids")
    if value is None:
        return
    if not isinstance(value, list) or not all(is_int(t) for t in value):
        raise invalid("Parameter stop_token_ids not list[int]")
    params.stop_token_ids = list(value)


def get_bool(body: dict, key: str) -> bool | None:
    return get(body, key, "boolean")


def check_temperature(body: dict, params: GenParams, zero_ok: bool, upper: float = FLT_MAX,
                 upper_text: str = FLT_MAX_TEXT) -> None:
    value = get(body, "temperature", "float")
    if value is None:
        return
    low_ok = value >= 0 if zero_ok else value > 0
    if not (low_ok and value <= upper):
        raise invalid(f"Parameter temperature must be in (0.0,{upper_text}], got {fmt(value)}.")
    params.temperature = value


def check_top_p(body: dict, params: GenParams, exclusive_one: bool = False) -> None:
    value = get(body, "top_p", "float")
    if value is None:
        return
    if not (0 < value < 1 if exclusive_one else 0 < value <= 1):
        raise invalid(f"Parameter top_p must be in (0.0,1.0], got {fmt(value)}.")
    params.top_p = value


def check_typical_p(body: dict, params: GenParams) -> None:
    value = get(body, "typical_p", "float")
    if value is None:
        return
    if not 0 < value <= 1:
        raise invalid(f"Parameter typical_p must be in (0.0,1.0], got {fmt(value)}.")
    params.typical_p = value


def check_tgi_sampling(p: dict, params: GenParams) -> None:
    """TGI's sampling fields in MindIE's check order; /infer takes the same ones."""
    check_temperature(p, params, zero_ok=False)
    check_top_k(p, params, "positive")
    check_top_p(p, params, exclusive_one=True)
    check_typical_p(p, params)
    params.do_sample = get_bool(p, "do_sample")
    check_seed(p, params)
    check_repetition_penalty(p, params)
    get_bool(p, "watermark")  # forwarded in MindIE; no visible effect


def check_seed(body: dict, params: GenParams) -> None:
    value = body.get("seed")
    if value is None:
        return
    if not is_int(value) or not 0 <= value <= INT63_MAX:
        raise invalid(f"Parameter seed must be in [0, {INT63_MAX}], got {fmt(value)}.")
    params.seed = value


def check_repetition_penalty(body: dict, params: GenParams, upper: float = FLT_MAX, upper_text: str = FLT_MAX_TEXT):
    value = get(body, "repetition_penalty", "float")
    if value is None:
        return
    if not 0 < value <= upper:
        raise invalid(f"Parameter 'repetition_penalty' must be in (0.0, {upper_text}], got {fmt(value)}.")
    params.repetition_penalty = value


def check_penalty(body: dict, params: GenParams, key: str) -> None:
    value = get(body, key, "float")
    if value is None:
        return
    if not -2.0 <= value <= 2.0:
        if key == "presence_penalty":
            raise invalid(f"Parameter presence_penalty not in [-2.0, 2.0], but got {fmt(value)}.")
        raise invalid(f"Parameter frequency_penalty should be in [-2.0, 2.0], got {fmt(value)}.")
    setattr(params, key, value)


def check_max_tokens(body: dict, params: GenParams, key: str) -> None:
    value = body.get(key)
    if value is None:
        return
    if not is_int(value):
        raise invalid(f"Parameter {key} not number_integer")
    if not 0 < value <= INT32_MAX:
        raise invalid(f"Parameter {key} must be (0,{INT32_MAX}], got {fmt(value)}")
    params.max_tokens = value


def check_n_best_of(body: dict, params: GenParams, max_n: int) -> None:
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


def none_text(value) -> str:
    return "None" if value is None else str(value)


def sampling_off(params: GenParams) -> bool:
    return not params.temperature  # absent or 0


_TOP_K_RULES = {  # protocol rule -> (accepted, message range)
    "off_or_positive": (lambda k: k == -1 or 0 < k <= INT32_MAX, f"-1 || (0,{INT32_MAX}]"),  # vLLM, OpenAI
    "positive": (lambda k: 0 < k <= INT32_MAX, f"(0,{INT32_MAX}]"),  # TGI, /infer
    "non_negative": (lambda k: 0 <= k <= INT32_MAX, f"[0,{INT32_MAX}]"),  # Triton
}


def check_top_k(source: dict, params: GenParams, rule: str) -> None:
    """``top_k`` by the protocol's range; -1 (vLLM, OpenAI) and 0 mean off."""
    top_k = source.get("top_k")
    if top_k is None:
        return
    accepted, message_range = _TOP_K_RULES[rule]
    if not is_int(top_k) or not accepted(top_k):
        raise invalid(f"Parameter top_k must be in {message_range}, got {fmt(top_k)}")
    params.top_k = 0 if top_k == -1 else top_k


def media_options(body: dict) -> VideoOptions | None:  # vLLM /generate and OpenAI chat
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


def check_priority(p: dict) -> None:
    priority = p.get("priority")
    if priority is not None and (not is_int(priority) or not 1 <= priority <= 5):
        raise invalid(f"Parameter priority must be in [1, 5], got {fmt(priority)}")


def check_timeout(p: dict, params: GenParams) -> None:
    timeout = p.get("timeout")
    if timeout is not None:
        if not is_int(timeout) or not 0 < timeout <= 65535:
            raise invalid(f"Parameter timeout must be in (0, 65535], got {fmt(timeout)}")
        params.timeout = float(timeout)


def check_batch_size(p: dict) -> None:
    batch_size = p.get("batch_size")
    if batch_size is not None and (not is_int(batch_size) or not 0 < batch_size <= INT32_MAX):
        raise invalid(f"Parameter batch_size must be in (0,{INT32_MAX}], got {fmt(batch_size)}")
