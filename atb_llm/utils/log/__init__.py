"""Logging for ``atb_llm``: ``logger``, ``print_log`` and ``message_filter``.

``logger`` is a standard :class:`logging.Logger` named ``"atb_llm"`` whose logging methods
also accept an :class:`~atb_llm.utils.log.error_code.ErrorCode` as an optional first
positional argument after the message (``logger.error(msg, ErrorCode.X)``), as the
MindIE-LLM framework calls it. The code is written in front of the message.

The level is INFO unless ``ATB_LOG_LEVEL`` (checked first) or ``MINDIE_LOG_LEVEL`` names
another one. Records go to stderr through the logger's own handler and do not propagate
to the root logger, so an application's root configuration does not print them twice;
tests that want to capture them should add a handler to ``logger`` directly.
"""

from __future__ import annotations

import logging
import os
import sys
import unicodedata
from collections.abc import Callable
from typing import Any

from atb_llm.utils.log.error_code import ErrorCode

__all__ = ["ErrorCode", "logger", "message_filter", "print_log"]

LOGGER_NAME = "atb_llm"
MAX_MESSAGE_LENGTH = 4096
_LOG_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] [%(name)s] %(message)s"

_LEVEL_NAMES = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
    # MindIE uses "null" to switch a component's logging off.
    "null": logging.CRITICAL + 1,
    "off": logging.CRITICAL + 1,
}


class AtbLogger(logging.Logger):
    """Logger whose methods take an optional ``ErrorCode`` right after the message.

    Only an ``ErrorCode`` instance is treated as a code, so ordinary ``%``-style
    arguments (``logger.info("x=%s", x)``) keep working.
    """

    def _log(self, level: int, msg: object, args: Any, exc_info: Any = None,
             extra: dict | None = None, stack_info: bool = False, stacklevel: int = 1) -> None:
        if args and isinstance(args[0], ErrorCode):
            msg = f"[{args[0].value}] {msg}"
            args = args[1:]
        # +1 so that findCaller skips this override and reports the real caller.
        super()._log(level, msg, args, exc_info=exc_info, extra=extra,
                     stack_info=stack_info, stacklevel=stacklevel + 1)


class _StderrHandler(logging.StreamHandler):
    """Stream handler that looks ``sys.stderr`` up at each record.

    Binding the stream at import time would keep writing to a stream that was later
    replaced (pytest's capture, daemonised services).
    """

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        # StreamHandler.__init__ assigns the stream; the property always resolves it.
        pass


def _parse_level(raw: str | None) -> int | None:
    """Map an env value to a logging level; ``None`` when it names no level.

    Accepts a plain name (``"debug"``) or MindIE's component form
    (``"llm:debug; *:info"``), where the ``llm``/``atb_llm`` entry wins over a
    global one (``*`` or an entry without a component).
    """
    if not raw:
        return None
    raw = raw.strip().lower()
    if raw.isdigit():
        return int(raw)
    if ":" not in raw:
        return _LEVEL_NAMES.get(raw)
    found_global = None
    for entry in raw.replace(",", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        component, sep, value = entry.partition(":")
        if not sep:
            found_global = _LEVEL_NAMES.get(component.strip(), found_global)
            continue
        component = component.strip()
        level = _LEVEL_NAMES.get(value.strip())
        if component in ("llm", "atb_llm") and level is not None:
            return level
        if component in ("*", "all") and level is not None:
            found_global = level
    return found_global


def _level_from_env() -> int:
    for var in ("ATB_LOG_LEVEL", "MINDIE_LOG_LEVEL"):
        level = _parse_level(os.environ.get(var))
        if level is not None:
            return level
    return logging.INFO


def _make_logger() -> AtbLogger:
    existing = logging.Logger.manager.loggerDict.get(LOGGER_NAME)
    if isinstance(existing, logging.Logger):
        new_logger = existing
    else:
        # Swap the logger class only for this one creation, leaving other libraries alone.
        previous = logging.getLoggerClass()
        logging.setLoggerClass(AtbLogger)
        try:
            new_logger = logging.getLogger(LOGGER_NAME)
        finally:
            logging.setLoggerClass(previous)
    if not isinstance(new_logger, AtbLogger):
        # Someone created the plain logger first; AtbLogger adds no state, so upgrading is safe.
        new_logger.__class__ = AtbLogger
    new_logger.setLevel(_level_from_env())
    new_logger.propagate = False
    if not any(isinstance(h, _StderrHandler) for h in new_logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        new_logger.addHandler(handler)
    return new_logger  # type: ignore[return-value]


logger: AtbLogger = _make_logger()


def message_filter(msg: object) -> str:
    """Make a message safe for a one-line log: at most 4096 chars, no control characters.

    Control characters (``\\r``, ``\\n``, ``\\t``, the rest of Unicode category Cc) and the
    Unicode line/paragraph separators become spaces, so user text cannot forge log lines.
    """
    text = msg if isinstance(msg, str) else str(msg)
    text = text[:MAX_MESSAGE_LENGTH]
    return "".join(
        " " if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch for ch in text
    )


def print_log(rank: int, func: Callable[..., Any], msg: object, need_filter: bool = False) -> None:
    """Call ``func(msg)`` (e.g. ``logger.info``) only on rank 0, filtering ``msg`` if asked."""
    if rank != 0:
        return
    if need_filter:
        msg = message_filter(msg)
    func(msg)
