"""A work queue keyed by "namespace/name": coalesces events, delays re-adds, backs off per key (thread-safe).

Semantics follow client-go's workqueue: a key is queued at most once; a key being processed that is added
again is queued once more when `done` is called, so two workers never handle the same key at once.
"""

from __future__ import annotations

import heapq
import random
import threading
import time
from collections import deque
from collections.abc import Callable


class WorkQueue:
    def __init__(
        self,
        *,
        base_delay: float = 0.5,
        max_delay: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._clock = clock
        self._jitter = jitter
        self._cond = threading.Condition()
        self._queue: deque[str] = deque()
        self._dirty: set[str] = set()  # queued, or to be re-queued once done
        self._processing: set[str] = set()
        self._waiting: dict[str, float] = {}  # key -> earliest time it is due
        self._heap: list[tuple[float, str]] = []
        self._failures: dict[str, int] = {}
        self._shutting_down = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue)

    def add(self, key: str) -> None:
        """Queue `key` now (a no-op if it is already queued)."""
        with self._cond:
            self._add_locked(key)

    def _add_locked(self, key: str) -> None:
        if self._shutting_down or key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._queue.append(key)
            self._cond.notify()

    def add_after(self, key: str, delay: float) -> None:
        """Queue `key` after `delay` seconds (an earlier pending re-add wins)."""
        if delay <= 0:
            self.add(key)
            return
        with self._cond:
            if self._shutting_down:
                return
            due = self._clock() + delay
            current = self._waiting.get(key)
            if current is not None and current <= due:
                return
            self._waiting[key] = due
            heapq.heappush(self._heap, (due, key))
            self._cond.notify()

    def add_rate_limited(self, key: str) -> float:
        """Queue `key` after its exponential backoff with jitter; return the delay used.

        The delay is base * 2^failures, capped, times a random factor in [0.5, 1]: keys that failed together
        (one source, many imports) do not retry in step.
        """
        with self._cond:
            failures = self._failures.get(key, 0)
            self._failures[key] = failures + 1
        delay = min(self._max_delay, self._base_delay * (2 ** min(failures, 62)))
        delay *= 0.5 + 0.5 * self._jitter()
        self.add_after(key, delay)
        return delay

    def forget(self, key: str) -> None:
        """Reset the backoff of `key` (after a success)."""
        with self._cond:
            self._failures.pop(key, None)

    def failures(self, key: str) -> int:
        with self._cond:
            return self._failures.get(key, 0)

    def _promote_due_locked(self) -> float | None:
        """Move due delayed keys to the queue; return when the next one is due, if any."""
        now = self._clock()
        while self._heap:
            due, key = self._heap[0]
            if self._waiting.get(key) != due:  # superseded by an earlier re-add, or already promoted
                heapq.heappop(self._heap)
                continue
            if due > now:
                return due
            heapq.heappop(self._heap)
            del self._waiting[key]
            self._add_locked(key)
        return None

    def get(self, timeout: float | None = None) -> str | None:
        """The next key to process, or None on shutdown or after `timeout` seconds (0: do not wait)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._shutting_down:
                    return None
                next_due = self._promote_due_locked()
                if self._queue:
                    key = self._queue.popleft()
                    self._dirty.discard(key)
                    self._processing.add(key)
                    return key
                wait: float | None = None if next_due is None else max(0.0, next_due - self._clock())
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    wait = remaining if wait is None else min(wait, remaining)
                self._cond.wait(wait)

    def done(self, key: str) -> None:
        """Mark `key` processed; if it was added meanwhile, queue it again."""
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._queue.append(key)
                self._cond.notify()

    def shutdown(self) -> None:
        """Wake every waiting `get` (they return None) and accept no more keys."""
        with self._cond:
            self._shutting_down = True
            self._cond.notify_all()
