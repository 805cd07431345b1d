"""Large AdmissionReview bodies parsed in a process of their own, so that the event loop never waits for one.

The GIL would tie a long parse to the event loop: webhook.app hands bodies over INLINE_BODY_BYTES (or asking for
many mounts) to `ParsingProcess`, one spawned process at a lower priority that runs review.parse, started on
first use (or by `warm()`), restarted if it dies, and gone once its parent is. Module-level imports stay few: the
spawned process imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from webhook import review

# At most this many large bodies are held (read, or being parsed) at once; others wait, within their deadline.
LARGE_BODIES_AT_ONCE = 4
_WORKER_NICENESS = 10
_PARENT_CHECK_SECONDS = 1.0


def _lower_priority() -> None:
    with contextlib.suppress(OSError, AttributeError):
        os.nice(_WORKER_NICENESS)


def _start_parsing_process() -> None:
    """In the parsing process: a lower priority, and an end once its parent is gone. A parent killed outright (a
    serving worker's OOM kill, SIGKILL) would otherwise leave it behind for good: it holds both ends of its own
    call queue's pipe (multiprocessing passes both), so it never reads an end of file."""
    _lower_priority()
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_CHECK_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class ParsingProcess:
    """review.parse for large bodies, in one worker process (started on first use; restarted if it dies)."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self.slots = asyncio.Semaphore(LARGE_BODIES_AT_ONCE)

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # spawn: the server has threads, which fork would copy in whatever state they are. The worker runs
                # at a lower priority: on a busy node, ordinary requests on the event loop go first.
                self._pool = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_parsing_process,
                )
            return self._pool

    def warm(self) -> None:
        """Start the worker process now rather than on the first large body."""
        self._executor().submit(int).result(timeout=60)

    async def parse(self, body: bytes) -> review.Answer | review.Pending:
        pool = self._executor()
        try:
            return await asyncio.wrap_future(pool.submit(review.parse, body))
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
