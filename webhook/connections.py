"""Slow clients can't hold the server: uvicorn's HTTP/1.1 protocol with a request read deadline and a connection cap.

uvicorn (h11) waits forever for the first request on a connection and for the rest of a request's headers or
body once it started (its keep-alive timeout only runs between requests), and it has no connection cap, only
`limit_concurrency`, which answers 503 to everyone, kube-apiserver included, once slow clients fill it. Here:

- a request (headers and body) must arrive whole within `request_read_timeout` seconds of its first byte, and
  the first one within that time of the connection being made; otherwise the connection is closed;
- beyond `max_connections` open connections, new ones are closed at once: the established connections (those
  kube-apiserver keeps alive) go on being served;
- the TLS handshake must finish within `request_read_timeout` too (asyncio's default is 60 s).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

DEFAULT_REQUEST_READ_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 2048


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with a per-request read deadline and a cap on open connections (see the module's docstring)."""

    request_read_timeout: float = DEFAULT_REQUEST_READ_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    _read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("closing a new connection: %d are open, the most this webhook keeps", self.max_connections)
            transport.abort()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
            self._disarm()  # the request is in; what follows is the answer and then keep-alive (uvicorn's timer)
        else:
            self._arm()  # a request has started: it has until the deadline to arrive whole

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._disarm()  # between requests: uvicorn's keep-alive timeout applies

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._read_timer is None:
            self._read_timer = self.loop.call_later(self.request_read_timeout, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(request_read_timeout: float, max_connections: int) -> type[GuardedH11Protocol]:
    """The protocol class to give uvicorn.Config(http=...), with these limits."""
    settings: dict[str, Any] = {"request_read_timeout": request_read_timeout, "max_connections": max_connections}
    return type("GuardedH11Protocol", (GuardedH11Protocol,), settings)
