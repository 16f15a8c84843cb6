"""Incremental (streaming) detokenization with stop-string handling.

Decoding the whole output after every token is quadratic, and decoding each token alone
is wrong: byte-level BPE tokens can split a UTF-8 character, and SentencePiece-style
tokenizers render a token's leading space depending on what precedes it.  We therefore
decode a small sliding window of ids:

* ``window[:read]`` is context that has already been turned into text;
* ``window[read:]`` is new.  The delta is ``decode(window)`` minus ``decode(window[:read])``.

If the window's text ends with U+FFFD the newest bytes do not form a complete character
yet, so nothing is released and the window keeps growing until a later token completes
it.  Otherwise the window slides: ``window = window[read:]`` and ``read = len(window)``,
so each step decodes only a few tokens however long the output gets.  Decoding is done
without ``clean_up_tokenization_spaces`` (a cross-token rewrite that streaming cannot
undo); transformers already ignores that flag for byte-level BPE such as Llama-3, so the
deltas concatenate to exactly ``tokenizer.decode(output_ids)``.

Decoded text then passes a stop-string filter which releases only text that can no longer
turn into (part of) a stop string: a suffix that is a prefix of some stop string is held
back until disambiguated, so a streaming client never sees anything at or after a stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens used as left context for the first output tokens (enough for tokenizers
# whose rendering of a token depends on its left neighbour).
_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns generated token ids into releasable text deltas, one token at a time."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stops: tuple[str, ...] = tuple(s for s in stop if s)
        self._include_stop = include_stop_str_in_output
        self._max_stop_len = max((len(s) for s in self._stops), default=0)

        # Window ids: _ids[:_read] is already-rendered context (initially a prompt tail),
        # _ids[_read:] is not yet rendered.  Older ids are dropped as the window slides.
        context = self._prompt_context(prompt_ids or [])
        self._ids: list[int] = list(context)
        self._read = len(context)
        self._prefix_text = self._decode(self._ids) if context else ""

        self.output_ids: list[int] = []
        self._decoded = ""  # all complete decoded output text (truncated at a stop)
        self._released = 0  # number of chars of _decoded handed out so far
        self._stopped = False
        self._stop_hit: str | None = None
        self._finished = False

    # -- public API -----------------------------------------------------------------

    def add_token(self, token_id: int) -> str:
        """Feed one generated id; return the newly releasable text (possibly empty)."""
        if self._stopped or self._finished:
            return ""
        token_id = int(token_id)
        self.output_ids.append(token_id)
        self._ids.append(token_id)
        window_text = self._decode(self._ids)
        if window_text.endswith(_REPLACEMENT_CHAR):
            # Incomplete multi-byte character: wait for the bytes that complete it.
            return ""
        new_text = window_text[len(self._prefix_text) :]
        if not new_text:
            # Nothing rendered (e.g. a skipped special token): keep the window as is.
            return ""
        # Slide the window: what was new becomes the context; older ids are dropped.
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return self._push_text(new_text, final=False)

    def finish(self) -> str:
        """End of generation: flush held-back text (and any incomplete bytes) and return it."""
        if self._stopped or self._finished:
            self._finished = True
            return ""
        self._finished = True
        tail = ""
        if self._read < len(self._ids):
            # Undecodable trailing bytes: emit them as decode() would (with U+FFFD).
            tail = self._decode(self._ids)[len(self._prefix_text) :]
            self._ids = self._ids[self._read :]
            self._read = len(self._ids)
            self._prefix_text = self._decode(self._ids)
        return self._push_text(tail, final=True)

    @property
    def text(self) -> str:
        """All text released so far (the concatenation of the returned deltas)."""
        return self._decoded[: self._released]

    @property
    def stopped(self) -> bool:
        """Whether a stop string was found (the text is cut there)."""
        return self._stopped

    @property
    def stop_reason(self) -> str | None:
        """The stop string that ended the text, if any."""
        return self._stop_hit

    # -- internals ------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        # No clean-up of tokenization spaces: it rewrites text across window boundaries
        # (" ." -> "."), which would make deltas inconsistent with what was released.
        return self._tokenizer.decode(
            ids,
            skip_special_tokens=self._skip_special,
            clean_up_tokenization_spaces=False,
        )

    def _prompt_context(self, prompt_ids: list[int]) -> list[int]:
        if not prompt_ids:
            return []
        tail = [int(t) for t in prompt_ids[-_PROMPT_CONTEXT_TOKENS:]]
        # Context ending inside a multi-byte character would let the first output token
        # "complete" a character that belongs to the prompt; skip context in that case.
        if self._decode(tail).endswith(_REPLACEMENT_CHAR):
            return []
        return tail

    def _push_text(self, new_text: str, final: bool) -> str:
        """Append decoded text, apply stop strings and return what may be released."""
        old_len = len(self._decoded)
        self._decoded += new_text
        if self._stops:
            cut = self._find_stop(old_len)
            if cut is not None:
                self._decoded = self._decoded[:cut]
                self._stopped = True
                return self._release(len(self._decoded))
            if not final:
                return self._release(len(self._decoded) - self._partial_stop_len())
        return self._release(len(self._decoded))

    def _find_stop(self, old_len: int) -> int | None:
        """End index of the kept text if a stop string occurs in the new text, else None."""
        text = self._decoded
        # A new match must end past old_len, and cannot start inside released text
        # (released text never ends with a stop-string prefix).
        start = max(self._released, old_len - self._max_stop_len + 1, 0)
        best_pos, best_stop = -1, ""
        for s in self._stops:
            pos = text.find(s, start)
            if pos != -1 and (best_pos == -1 or pos < best_pos):
                best_pos, best_stop = pos, s
        if best_pos == -1:
            return None
        self._stop_hit = best_stop
        return best_pos + len(best_stop) if self._include_stop else best_pos

    def _partial_stop_len(self) -> int:
        """Length of the longest unreleased suffix that is a proper prefix of a stop string."""
        text = self._decoded
        longest = min(self._max_stop_len - 1, len(text) - self._released)
        for n in range(longest, 0, -1):
            suffix = text[-n:]
            if any(s.startswith(suffix) for s in self._stops):
                return n
        return 0

    def _release(self, upto: int) -> str:
        if upto <= self._released:
            return ""
        delta = self._decoded[self._released : upto]
        self._released = upto
        return delta
