"""uvicorn's h11 protocol with the limits a public server needs (uvicorn has no header timeout, refuses
surplus connections only once their request head arrived, in plain text, and closes without lingering).

- **Header timeout**: a connection must start a request (its whole request head must arrive) within
  ``header_timeout`` seconds of being accepted and of its previous response ending; otherwise it is closed
  (with a 408 if part of a request head had arrived). Half-sent requests can no longer pile up.
- **Connection cap** (``uvicorn.Config(limit_concurrency=N)``): a connection accepted while N are open is
  answered at once with a JSON 503 (``Retry-After: 1``) and closed, instead of uvicorn's plain-text 503 that
  only comes once the request head has arrived.
- **Lingering close**: when the server answers before it has read the whole request body (413, 401, 408,
  the 503 above), it does not close the socket at once, which would make the kernel reset the connection
  and destroy the response before the client reads it. It sends FIN after the response and reads and
  discards what the client still sends, until the client closes, goes quiet for ``LINGER_IDLE_S`` or
  ``LINGER_MAX_S`` pass (``REFUSED_LINGER_S`` for a connection refused by the cap; beyond twice the cap,
  new connections are closed at once).
- The keep-alive idle timeout is uvicorn's own ``timeout_keep_alive``.
"""
from __future__ import annotations

import asyncio
import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("service")

LINGER_IDLE_S = 2.0
LINGER_MAX_S = 30.0
REFUSED_LINGER_S = 1.0  # a connection refused for the cap lingers only this long


def raw_response(status: int, reason: str, body: dict, extra: str = "") -> bytes:
    """A complete HTTP/1.1 response with a JSON body and ``Connection: close``, as bytes."""
    payload = json.dumps(body, separators=(",", ":")).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n{extra}"
            f"content-length: {len(payload)}\r\n\r\n")
    return head.encode("latin-1") + payload


class _Transport:
    """The transport uvicorn's code sees: ``close()`` becomes a lingering close when the client may still
    be sending, and a lingering connection reads as closing."""

    def __init__(self, transport: asyncio.Transport, protocol: HardenedH11Protocol):
        self._transport = transport
        self._protocol = protocol

    def write(self, data) -> None:
        if not self._protocol.lingering:
            self._transport.write(data)

    def close(self) -> None:
        self._protocol.close_connection()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()

    def __getattr__(self, name):
        return getattr(self._transport, name)


class HardenedH11Protocol(H11Protocol):
    """Set ``header_timeout`` on a subclass (``protocol_class``); the cap comes from ``limit_concurrency``."""

    header_timeout: float = 10.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_connections = self.limit_concurrency
        self.limit_concurrency = None  # uvicorn's own check: replaced by the JSON 503 at accept time
        self.raw_transport: asyncio.Transport | None = None
        self.lingering = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._idle_cycle = None  # the cycle that was current when the header timer was armed
        self._linger_timer: asyncio.TimerHandle | None = None
        self._linger_deadline = 0.0
        self._linger_last = 0.0  # when the lingering client last sent something

    # -- connection lifecycle -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.raw_transport = transport
        self.transport = _Transport(transport, self)  # type: ignore[assignment]
        cap = self.max_connections
        if cap is not None and len(self.connections) > cap:
            logger.warning(f"connection refused: {len(self.connections) - 1} connections are open "
                           f"(--max-connections {cap})")
            if len(self.connections) > 2 * cap:  # a flood: refused connections must not hold descriptors
                transport.close()
                return
            transport.write(raw_response(503, "Service Unavailable", {
                "error": f"Too many open connections (the limit is {cap}); retry later",
                "error_type": "Service Unavailable"}, extra="retry-after: 1\r\n"))
            self.start_linger(REFUSED_LINGER_S)
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self._linger_last = self.loop.time()  # discarded: the response is out, the client finishes its upload
            return
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self._header_timer is not None and self.cycle is not self._idle_cycle:
            self._cancel_header_timer()  # a request head arrived

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm_header_timer()
        super().on_response_complete()  # may start a pipelined request: handle_events cancels the timer

    def shutdown(self) -> None:
        """Server shutdown: idle, half-sent and lingering connections close now; a request in flight
        finishes with ``Connection: close`` (uvicorn's own behaviour)."""
        if self.lingering or self.cycle is None or self.cycle.response_complete:
            self._cancel_header_timer()
            self.raw_transport.close()
            return
        super().shutdown()

    # -- header timeout -------------------------------------------------------------------------
    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._idle_cycle = self.cycle
        self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.lingering or self.raw_transport.is_closing() or self.cycle is not self._idle_cycle:
            return
        partial = bool(self.conn.trailing_data[0]) and self.conn.our_state is h11.IDLE
        if partial:
            self.raw_transport.write(raw_response(408, "Request Timeout", {
                "error": f"The request head did not arrive within {self.header_timeout:g} s",
                "error_type": "Request Timeout"}))
            self.start_linger()
        else:
            self.close_connection()

    # -- lingering close ------------------------------------------------------------------------
    def close_connection(self) -> None:
        """uvicorn's ``transport.close()``: lingers if the client may still be sending its request."""
        transport = self.raw_transport
        if self.lingering or transport.is_closing():
            return
        their_state = self.conn.their_state
        if their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED) or (
                their_state is h11.IDLE and not self.conn.trailing_data[0]):
            transport.close()
        else:
            self.start_linger()

    def start_linger(self, max_s: float = LINGER_MAX_S) -> None:
        transport = self.raw_transport
        if self.lingering or transport.is_closing():
            return
        self.lingering = True
        self._cancel_header_timer()
        self._unset_keepalive_if_required()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        try:
            if transport.can_write_eof():
                transport.write_eof()  # FIN once the response is flushed
            transport.resume_reading()
        except (OSError, RuntimeError):
            transport.close()
            return
        self._linger_last = self.loop.time()
        self._linger_deadline = self._linger_last + max_s
        self._linger_timer = self.loop.call_later(min(LINGER_IDLE_S, max_s), self._check_linger)

    def _check_linger(self) -> None:
        """Close once the client has been quiet for ``LINGER_IDLE_S`` or ``LINGER_MAX_S`` have passed."""
        now = self.loop.time()
        until = min(self._linger_last + LINGER_IDLE_S, self._linger_deadline)
        if now >= until:
            self._linger_timer = None
            self.raw_transport.close()
        else:
            self._linger_timer = self.loop.call_later(until - now, self._check_linger)


def protocol_class(header_timeout: float) -> type[HardenedH11Protocol]:
    """The protocol class to pass as ``uvicorn.Config(http=...)``."""
    return type("ServiceH11Protocol", (HardenedH11Protocol,), {"header_timeout": float(header_timeout)})
