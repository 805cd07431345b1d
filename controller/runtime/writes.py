"""Read-your-writes over an informer cache, without comparing resourceVersions (the API says they are opaque).

After a write, the object as written stands in for the cached one until the informer delivers that very
version (its watch delivers events in order, so the cache then holds our write or something newer), or until
`ttl` seconds pass (a re-list may skip the version: the cache is then newer anyway). This spares a second
write, or a 409, when a reconcile runs again before the watch has caught up. The informer may deliver our
version before the writer records it: the versions seen lately per object are kept a few seconds to notice that.

`seen` also tells a caller whether the delivered version is this process's own write coming back (its echo): the
reconcile that wrote it already knew that state, so the echo need not wake the object again. The echo often
arrives before the write's own answer (a third of the time at fleet scale), when nobody can tell yet whose version
it is: `delivered` holds the wake-up of an object while a write of it is in flight (`writing`) and, once the
answer names the version written, drops it for that version and gives it for any other (someone else's edit, a
failed write). A wake-up is never lost, only decided a call's answer later.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Key = tuple[str, str]  # (namespace, name)

# How long a delivered version is remembered for a write recorded after it: the writer records its write as soon
# as the API answers, so the gap is a thread switch or two; a few seconds is generous. Kept by time, not per
# object, so that memory follows the event rate rather than the number of objects (10,000 imports would otherwise
# keep 20,000 entries for good).
SEEN_SECONDS = 5.0
_VERSIONS_KEPT = 3  # per object within that time: our write may be followed at once by a newer one
# Wake-ups held per write in flight; beyond that (someone edits the object in a loop meanwhile), they are given
# at once: what is held stays bounded, and such edits wake the object anyway.
_HELD_PER_WRITE = 4


def _version(obj: dict[str, Any] | None) -> str | None:
    return ((obj or {}).get("metadata") or {}).get("resourceVersion")


class RecentWrites:
    def __init__(
        self, ttl: float = 30.0, clock: Callable[[], float] = time.monotonic, seen_seconds: float = SEEN_SECONDS
    ) -> None:
        self._ttl = ttl
        self._clock = clock
        self._seen_seconds = seen_seconds
        self._lock = threading.Lock()
        self._written: dict[Key, tuple[dict[str, Any] | None, float]] = {}  # None: deleted
        # key -> (remembered until, the versions delivered lately), the least recently delivered first.
        self._seen: OrderedDict[Key, tuple[float, tuple[str | None, ...]]] = OrderedDict()
        # key -> the wake-ups held while a write of it is in flight: (the version delivered, its wake-up).
        self._in_flight: dict[Key, list[tuple[str | None, Callable[[], None]]]] = {}

    def wrote(self, key: Key, obj: dict[str, Any]) -> None:
        with self._lock:
            recent = self._seen.get(key)
            if recent is None or _version(obj) not in recent[1]:
                self._written[key] = (obj, self._clock() + self._ttl)

    def deleted(self, key: Key) -> None:
        """This process deleted the object: it reads as gone until the informer says so (forget) or `ttl` passes."""
        with self._lock:
            self._written[key] = (None, self._clock() + self._ttl)

    def seen(self, key: Key, obj: dict[str, Any]) -> bool:
        """The informer delivered `obj`: if it is the version we wrote, the cache has caught up, and True (the
        echo of our own write) is returned."""
        with self._lock:
            return self._seen_locked(key, _version(obj))

    def delivered(self, key: Key, obj: dict[str, Any], wake: Callable[[], None]) -> None:
        """The informer delivered `obj`: `wake()` unless it is our own write coming back. While a write of `key`
        is in flight, the wake-up waits for the write's answer, which says whether this version was its echo."""
        version = _version(obj)
        with self._lock:
            if self._seen_locked(key, version):
                return
            held = self._in_flight.get(key)
            if held is not None and len(held) < _HELD_PER_WRITE:
                held.append((version, wake))
                return
        wake()

    @contextmanager
    def writing(self, key: Key) -> Iterator[Callable[[dict[str, Any]], None]]:
        """Around one write of `key`; yields the function to call with what the API answered (as `wrote`). On the
        way out, the wake-ups `delivered` held meanwhile are given, but for the version written: none was
        written (an error, a conflict) and all are."""
        written: list[str | None] = []

        def record(obj: dict[str, Any]) -> None:
            self.wrote(key, obj)
            written.append(_version(obj))

        with self._lock:
            self._in_flight[key] = []
        try:
            yield record
        finally:
            with self._lock:
                held = self._in_flight.pop(key, [])
            for version, wake in held:
                if not written or version is None or version != written[-1]:
                    wake()

    def _seen_locked(self, key: Key, version: str | None) -> bool:
        """seen, under the lock."""
        now = self._clock()
        recent = self._seen.pop(key, None)
        kept = recent[1][1 - _VERSIONS_KEPT :] if recent is not None else ()
        self._seen[key] = (now + self._seen_seconds, (*kept, version))
        while True:  # the oldest first: each entry is dropped once, so this is constant work per event
            oldest = next(iter(self._seen.items()))
            if oldest[1][0] >= now:
                break
            self._seen.popitem(last=False)
        if self._ours(key, version) is None:
            return False
        del self._written[key]
        return True

    def as_written(self, key: Key, obj: dict[str, Any]) -> dict[str, Any] | None:
        """What this process wrote (as its cache keeps it) if `obj` is that very version coming back, else None: an
        informer's transform can keep it rather than build the same cache form again (one resourceVersion is one
        state of the object, whoever reads it)."""
        version = _version(obj)
        if version is None:
            return None
        with self._lock:
            return self._ours(key, version)

    def _ours(self, key: Key, version: str | None) -> dict[str, Any] | None:
        """Our write of `key` if it is `version`, else None. Under the lock."""
        entry = self._written.get(key)
        if entry is not None and entry[0] is not None and _version(entry[0]) == version:
            return entry[0]
        return None

    def forget(self, key: Key) -> None:
        """The object was deleted, or a write failed: the cache is the truth again."""
        with self._lock:
            self._written.pop(key, None)
            self._seen.pop(key, None)

    def get(self, key: Key, cached: dict[str, Any] | None) -> dict[str, Any] | None:
        """The object as this process last wrote it while the cache lags behind, else the cached one."""
        with self._lock:
            entry = self._written.get(key)
            if entry is None:
                return cached
            if self._clock() >= entry[1]:
                del self._written[key]
                return cached
            return entry[0]
