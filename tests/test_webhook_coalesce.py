"""webhook.coalesce: the writes of one event-loop step leave as one write, and nothing is held past that step."""

from __future__ import annotations

import asyncio
from typing import Any

from webhook.coalesce import FLUSH_BYTES, _CoalescingTransport


class RecordingTransport(asyncio.Transport):
    """A transport that records what reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default


def test_headers_and_body_of_one_step_leave_as_one_write() -> None:
    async def scenario() -> list[bytes]:
        raw = RecordingTransport()
        transport = _CoalescingTransport(raw, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(b"{}")
        assert raw.writes == []  # held until the end of this step
        await asyncio.sleep(0)
        assert transport.get_extra_info("peername") == ("127.0.0.1", 1)  # the rest is the wrapped transport's
        return raw.writes

    assert asyncio.run(scenario()) == [b"HTTP/1.1 200 OK\r\n\r\n{}"]


def test_close_sends_what_is_held_abort_drops_it_and_a_large_answer_goes_at_once() -> None:
    async def scenario() -> tuple[RecordingTransport, RecordingTransport, RecordingTransport]:
        loop = asyncio.get_running_loop()
        closing, aborting, large = RecordingTransport(), RecordingTransport(), RecordingTransport()
        first = _CoalescingTransport(closing, loop)
        first.write(b"last words")
        first.close()
        second = _CoalescingTransport(aborting, loop)
        second.write(b"never sent")
        second.abort()
        third = _CoalescingTransport(large, loop)
        third.write(b"x" * (FLUSH_BYTES + 1))
        assert large.writes == [b"x" * (FLUSH_BYTES + 1)]
        await asyncio.sleep(0)
        return closing, aborting, large

    closing, aborting, large = asyncio.run(scenario())
    assert closing.writes == [b"last words"] and closing.closed
    assert aborting.writes == [] and aborting.aborted
    assert len(large.writes) == 1
