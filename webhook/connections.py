"""Slow clients can't hold the server, and one client can't take every connection: uvicorn's HTTP/1.1 protocol with
a request read deadline, a connection cap in total and per client address, and fair eviction at the cap.

uvicorn (h11) waits forever for the first request on a connection and for the rest of a request's headers or
body once it started (its keep-alive timeout only runs between requests), and it has no connection cap, only
`limit_concurrency`, which answers 503 to everyone, kube-apiserver included, once slow clients fill it. Here:

- a request (headers and body) must arrive whole within `request_read_timeout` seconds of its first byte, and
  the first one within that time of the connection being made; otherwise the connection is closed;
- one client address keeps at most `max_connections_per_client` open connections; newer ones are closed at once,
  so one pod (whatever it sends) cannot take the slots kube-apiserver needs;
- beyond `max_connections` open connections, a new one is served only if an idle connection of a client holding
  more connections than the newcomer does can be closed for it (the biggest holder pays first); otherwise the
  new one is closed: the established connections (those kube-apiserver keeps alive) go on being served;
- idle keep-alive connections close after uvicorn's `timeout_keep_alive` (set by the server);
- the TLS handshake must finish within `request_read_timeout` too (asyncio's default is 60 s).

A connection is counted once its TLS handshake is done (that is when asyncio hands it to the protocol); a
handshake that does not finish is dropped after the handshake timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

DEFAULT_REQUEST_READ_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 2048
# kube-apiserver keeps a pool per webhook (Go keeps 25 idle connections per host, more under a burst): far below
# this, while one pod is held to an eighth of the total.
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 256
# Between requests; below the 90 s after which Go's clients drop idle connections themselves, so the webhook,
# not the client, decides when a kept-alive connection ends.
DEFAULT_IDLE_TIMEOUT = 65.0


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    """The webhook port's guards (see the module's docstring), as `python -m webhook`'s flags set them: one value
    handed from the command line to the server, or to the worker pool and on to each serving worker."""

    request_read_timeout: float = DEFAULT_REQUEST_READ_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT


DEFAULT_LIMITS = ConnectionLimits()

# Refused connections are logged at most this often (a flood of them must not become a flood of log lines).
_LOG_EVERY_SECONDS = 10.0


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with a per-request read deadline and connection caps (see the module's docstring).

    The class attributes are set per server by `guarded_protocol` (each server gets its own class, so its own
    table of connections by client address); everything runs on the server's event loop, so nothing is locked.
    """

    request_read_timeout: float = DEFAULT_REQUEST_READ_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    by_client: ClassVar[dict[str, set[GuardedH11Protocol]]] = {}
    refused: ClassVar[list[float]] = [0, 0.0]  # [refused since the last log line, when that line was written]
    _read_timer: asyncio.TimerHandle | None = None
    _address: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        address = self.client[0] if self.client else ""
        peers = self.by_client.get(address, set())
        if len(peers) >= self.max_connections_per_client:
            self._refuse(transport, f"{address} already holds {len(peers)}, the most one client address may")
            return
        if len(self.connections) > self.max_connections and not self._make_room(len(peers) + 1):
            self._refuse(transport, f"{self.max_connections} are open, the most this server keeps")
            return
        self.by_client.setdefault(address, set()).add(self)
        self._address = address
        self._arm()

    def _make_room(self, newcomer_holds: int) -> bool:
        """Close an idle connection of the client holding the most (more than the newcomer would): True if done."""
        holders = sorted(self.by_client.values(), key=len, reverse=True)
        for peers in holders:
            if len(peers) <= newcomer_holds:
                return False
            for peer in peers:
                if peer.is_idle():
                    peer._forget()
                    peer.transport.close()
                    return True
        return False

    def is_idle(self) -> bool:
        """Between requests (kept alive, or made and silent): closing it loses no request."""
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return False
        return self.cycle is None or self.cycle.response_complete

    def _refuse(self, transport: asyncio.Transport, why: str) -> None:
        counts = type(self).refused
        counts[0] += 1
        now = time.monotonic()
        if now - counts[1] >= _LOG_EVERY_SECONDS:
            log.warning("closing new connections: %s (%d closed since the last message)", why, counts[0])
            counts[0], counts[1] = 0, now
        transport.abort()

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
        self._forget()
        super().connection_lost(exc)

    def _forget(self) -> None:
        if self._address is None:
            return
        peers = self.by_client.get(self._address)
        if peers is not None:
            peers.discard(self)
            if not peers:
                del self.by_client[self._address]
        self._address = None

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


def guarded_protocol(
    request_read_timeout: float,
    max_connections: int,
    max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
) -> type[GuardedH11Protocol]:
    """The protocol class to give uvicorn.Config(http=...), with these limits (and a table of its own)."""
    settings: dict[str, Any] = {
        "request_read_timeout": request_read_timeout,
        "max_connections": max_connections,
        "max_connections_per_client": max(1, min(max_connections_per_client, max_connections)),
        "by_client": {},
        "refused": [0, 0.0],
    }
    return type("GuardedH11Protocol", (GuardedH11Protocol,), settings)
