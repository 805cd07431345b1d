"""One write per answer: the HTTP protocol's writes of one event-loop step are sent together.

uvicorn writes a response's headers and its body separately, and asyncio's TLS transport turns each write into a
TLS record and a send(2): two of each per admission answer, where one does. On loopback (the benchmark) and on a
pod's network alike, the send path is the largest single cost of an answer (30 % of a worker's CPU in
bench/bench_webhook.py's profile). Here the writes made during one step of the event loop are held and sent as
one at the end of that step (call_soon), or at once when the response is complete, the transport closes, or
more than FLUSH_BYTES are held. Nothing waits longer than the current step; flow control (pause_writing) is the
transport's as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

FLUSH_BYTES = 64 * 1024


class _CoalescingTransport:
    """A transport whose writes of one loop step go out as one write; everything else is the wrapped one's."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []
        self._size = 0
        # Asked about three times per request (by uvicorn and the connection guards): bound here rather than
        # found through __getattr__ each time.
        self.is_closing = transport.is_closing

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(data)
        self._size += len(data)
        if self._size > FLUSH_BYTES:
            self.flush()

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        if not self._held:
            return
        data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
        self._held, self._size = [], 0
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held, self._size = [], 0
        self._transport.abort()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def coalescing(protocol: type[Any]) -> type[Any]:
    """A subclass of uvicorn's HTTP `protocol` whose answers go out in one write (see the module docstring)."""

    class Coalescing(protocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(_CoalescingTransport(transport, asyncio.get_running_loop()))

        def on_response_complete(self) -> None:
            if isinstance(self.transport, _CoalescingTransport):
                self.transport.flush()
            super().on_response_complete()

    Coalescing.__name__ = Coalescing.__qualname__ = f"Coalescing{protocol.__name__}"
    return Coalescing
