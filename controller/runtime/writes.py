"""Read-your-writes over an informer cache, without comparing resourceVersions (the API says they are opaque).

After a write, the object as written stands in for the cached one until the informer delivers that very
version (its watch delivers events in order, so the cache then holds our write or something newer), or until
`ttl` seconds pass (a re-list may skip the version: the cache is then newer anyway). This spares a second
write, or a 409, when a reconcile runs again before the watch has caught up. The informer may deliver our
version before the writer records it: the versions seen lately per object are kept a few seconds to notice that.

`seen` also tells a caller whether the delivered version is this process's own write coming back (its echo): the
reconcile that wrote it already knew that state, so the echo need not wake the object again.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

Key = tuple[str, str]  # (namespace, name)

# How long a delivered version is remembered for a write recorded after it: the writer records its write as soon
# as the API answers, so the gap is a thread switch or two; a few seconds is generous. Kept by time, not per
# object, so that memory follows the event rate rather than the number of objects (10,000 imports would otherwise
# keep 20,000 entries for good).
SEEN_SECONDS = 5.0
_VERSIONS_KEPT = 3  # per object within that time: our write may be followed at once by a newer one


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
        version = _version(obj)
        now = self._clock()
        with self._lock:
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
