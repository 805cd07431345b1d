"""Read-your-writes over an informer cache, without comparing resourceVersions (the API says they are opaque).

After a write, the object as written stands in for the cached one until the informer delivers that very
version (its watch delivers events in order, so the cache then holds our write or something newer), or until
`ttl` seconds pass (a re-list may skip the version: the cache is then newer anyway). This spares a second
write, or a 409, when a reconcile runs again before the watch has caught up. The informer may deliver our
version before the writer records it: the last few versions seen per object are kept to notice that.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

Key = tuple[str, str]  # (namespace, name)


def _version(obj: dict[str, Any] | None) -> str | None:
    return ((obj or {}).get("metadata") or {}).get("resourceVersion")


class RecentWrites:
    def __init__(self, ttl: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._written: dict[Key, tuple[dict[str, Any] | None, float]] = {}  # None: deleted
        self._seen: dict[Key, tuple[str | None, ...]] = {}

    def wrote(self, key: Key, obj: dict[str, Any]) -> None:
        with self._lock:
            if _version(obj) not in self._seen.get(key, ()):
                self._written[key] = (obj, self._clock() + self._ttl)

    def deleted(self, key: Key) -> None:
        """This process deleted the object: it reads as gone until the informer says so (forget) or `ttl` passes."""
        with self._lock:
            self._written[key] = (None, self._clock() + self._ttl)

    def seen(self, key: Key, obj: dict[str, Any]) -> None:
        """The informer delivered `obj`: if it is the version we wrote, the cache has caught up."""
        with self._lock:
            self._seen[key] = (*self._seen.get(key, ())[-2:], _version(obj))
            entry = self._written.get(key)
            if entry is not None and entry[0] is not None and _version(entry[0]) == _version(obj):
                del self._written[key]

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
