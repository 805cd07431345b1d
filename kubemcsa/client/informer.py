"""A list-watch cache of one resource type, with indexes, event handlers and a compacting transform: what every
component reads the API through, as client-go's informers.
"""

from __future__ import annotations

import logging
import random
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

from kubernetes.client.exceptions import ApiException

from kubemcsa.client.kube import CONNECTION_ERRORS, JSON, Resource, WatchStream, error_message, log, object_key

EventHandler = Callable[[str, JSON, "JSON | None"], None]


LIST_PAGE_SIZE = 500  # client-go's reflector pages its lists by 500 too


_SHORT_TEXT = 200  # keys and values up to this long are interned (names, labels, reasons, messages, timestamps)
# Values that are one object's own (never another's): interning them would only grow the interpreter's table of
# interned strings (a slot each: 1.1 MB at 10,000 imports and their Secrets).
_UNIQUE_VALUES = frozenset({"resourceVersion", "uid"})
_intern = sys.intern


class Compactor:
    """Makes cached objects small: one copy of each key and short string, and of long strings that repeat
    (a source's CA in each of its imports' Secrets), and no managedFields (which nobody here reads).

    As client-go's informer transforms do; thousands of cached objects otherwise hold thousands of copies of the
    same text. Long strings are remembered in a bounded table (oldest first out), so unique ones (tokens) cost
    only a slot for a while.
    """

    def __init__(self, max_long: int = 1024) -> None:
        self._long: dict[str, str] = {}
        self._max_long = max_long
        self._lock = threading.Lock()

    def __call__(self, obj: JSON) -> JSON:
        metadata = obj.get("metadata")
        if isinstance(metadata, dict):
            metadata.pop("managedFields", None)  # before the walk: most of a real API server's object
        return self._dict(obj)

    # One call per dict and list, none per string: this runs on every object each informer delivers.
    def _dict(self, value: dict[Any, Any]) -> dict[Any, Any]:
        out = {}
        for key, item in value.items():
            if type(key) is str:
                key = _intern(key)
            kind = type(item)
            if kind is str:
                if key not in _UNIQUE_VALUES:
                    item = _intern(item) if len(item) <= _SHORT_TEXT else self._shared(item)
            elif kind is dict:
                item = self._dict(item)
            elif kind is list:
                item = self._list(item)
            out[key] = item
        return out

    def _list(self, value: list[Any]) -> list[Any]:
        out = []
        for item in value:
            kind = type(item)
            if kind is str:
                item = _intern(item) if len(item) <= _SHORT_TEXT else self._shared(item)
            elif kind is dict:
                item = self._dict(item)
            elif kind is list:
                item = self._list(item)
            out.append(item)
        return out

    def _shared(self, text: str) -> str:
        with self._lock:
            known = self._long.get(text)
            if known is not None:
                return known
            if len(self._long) >= self._max_long:
                del self._long[next(iter(self._long))]
            self._long[text] = text
            return text


def _index_values(values: Callable[[JSON], Iterable[str]], obj: JSON | None) -> set[str]:
    if obj is None:
        return set()
    try:
        return {value for value in values(obj) if isinstance(value, str)}
    except (AttributeError, TypeError, KeyError):  # a malformed object is indexed under nothing
        return set()


class Informer:
    """A list-watch cache of one resource type: list once, then follow a watch, re-listing on 410 Gone.

    Handlers get ("ADDED" | "MODIFIED" | "DELETED", object, previous object or None) on the informer's own
    thread; they must be quick (typically: put a key on a work queue). `resync_seconds` replays every cached
    object as MODIFIED periodically, so level-based consumers recover from anything they missed. Indexes
    (`add_index`) answer "which cached objects have this value" without a scan, as client-go's indexers do.
    """

    def __init__(
        self,
        resource: Resource,
        namespace: str | None = None,
        label_selector: str | None = None,
        resync_seconds: float | None = None,
        watch_timeout_seconds: int = 300,
        name: str | None = None,
        max_backoff: float = 30.0,
        transform: Callable[[JSON], JSON] | None = None,
    ) -> None:
        self.resource = resource
        # Applied to each object before it is cached (and handed to handlers), e.g. a Compactor.
        self.transform = transform
        self.namespace = namespace
        self.label_selector = label_selector
        self.resync_seconds = resync_seconds
        self.watch_timeout_seconds = watch_timeout_seconds
        self.max_backoff = max_backoff  # the longest wait between failed lists (the API's recovery is seen this late)
        self.name = name or resource.type.plural
        self._cache: dict[tuple[str, str], JSON] = {}
        self._lock = threading.RLock()
        self._handlers: list[EventHandler] = []
        self._synced = threading.Event()
        # Why the last list or watch failed: its HTTP status (0: unreachable), None once a list succeeded again;
        # and the exception itself, for a caller that explains it.
        self.last_error: int | None = None
        self.last_exception: BaseException | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._resync_thread: threading.Thread | None = None
        self._current_watch: WatchStream | None = None
        # name -> (the values an object is indexed under, value -> keys of the objects that have it)
        self._indexers: dict[str, Callable[[JSON], Iterable[str]]] = {}
        self._indexes: dict[str, dict[str, set[tuple[str, str]]]] = {}

    def cache_form(self, obj: JSON) -> JSON:
        """`obj` (which it may change) as this cache keeps it: what a writer remembers of its own write until the
        cache has caught up must be no larger, nor shaped otherwise, than what the cache would hold."""
        return self.transform(obj) if self.transform is not None else obj

    def add_index(self, name: str, values: Callable[[JSON], Iterable[str]]) -> None:
        """Index the cache by `values(object)` (before start): `by_index(name, value)` is then one lookup."""
        with self._lock:
            self._indexers[name] = values
            self._indexes[name] = {}
            for key, obj in self._cache.items():
                self._index(key, None, obj)

    def by_index(self, name: str, value: str) -> list[JSON]:
        """The cached objects indexed under `value` by index `name`."""
        with self._lock:
            keys = self._indexes[name].get(value, ())
            return [self._cache[key] for key in keys if key in self._cache]

    def _index(self, key: tuple[str, str], old: JSON | None, new: JSON | None) -> None:
        """Move `key` from the index entries of `old` to those of `new` (either may be None). Under the lock."""
        for name, values in self._indexers.items():
            index = self._indexes[name]
            for value in _index_values(values, old):
                keys = index.get(value)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del index[value]
            for value in _index_values(values, new):
                index.setdefault(value, set()).add(key)

    def add_handler(self, handler: EventHandler) -> None:
        with self._lock:
            self._handlers.append(handler)

    @property
    def has_synced(self) -> bool:
        return self._synced.is_set()

    def wait_for_sync(self, timeout: float | None = None) -> bool:
        return self._synced.wait(timeout)

    def get(self, name: str, namespace: str | None = None) -> JSON | None:
        with self._lock:
            return self._cache.get((namespace or "", name))

    def list(self) -> list[JSON]:
        with self._lock:
            return list(self._cache.values())

    def start(self) -> Informer:
        self._thread = threading.Thread(target=self._run, name=f"informer-{self.name}", daemon=True)
        self._thread.start()
        if self.resync_seconds:
            self._resync_thread = threading.Thread(target=self._resync_loop, name=f"resync-{self.name}", daemon=True)
            self._resync_thread.start()
        return self

    def stop(self, timeout: float = 5) -> None:
        self._stopped.set()
        watch = self._current_watch
        if watch is not None:
            watch.close()
        if self._thread is not None:
            self._thread.join(timeout)

    def _dispatch(self, event_type: str, obj: JSON, old: JSON | None) -> None:
        for handler in list(self._handlers):
            try:
                handler(event_type, obj, old)
            except Exception:
                log.exception("informer %s: an event handler failed", self.name)

    def _relist(self) -> str:
        # In pages, as client-go's reflector lists: one answer of 10,000 Secrets is tens of megabytes of JSON,
        # held whole (and decoded whole) before the transform makes it small.
        fresh: dict[tuple[str, str], JSON] = {}
        continue_token: str | None = None
        while True:
            listing = self.resource.list(
                self.namespace, label_selector=self.label_selector, limit=LIST_PAGE_SIZE, continue_token=continue_token
            )
            for item in listing.get("items") or []:
                if isinstance(item, dict):
                    item = self.cache_form(item)
                    fresh[object_key(item)] = item
            continue_token = (listing.get("metadata") or {}).get("continue") or None
            if continue_token is None:
                break
        self.last_error, self.last_exception = None, None
        with self._lock:
            previous = self._cache
            self._cache = fresh
            if self._indexers:
                self._indexes = {name: {} for name in self._indexers}
                for key, obj in fresh.items():
                    self._index(key, None, obj)
        for key, obj in fresh.items():
            old = previous.get(key)
            if old is None:
                self._dispatch("ADDED", obj, None)
            elif old.get("metadata", {}).get("resourceVersion") != obj.get("metadata", {}).get("resourceVersion"):
                self._dispatch("MODIFIED", obj, old)
        for key, old in previous.items():
            if key not in fresh:
                self._dispatch("DELETED", old, old)
        self._synced.set()
        return str((listing.get("metadata") or {}).get("resourceVersion", ""))

    def _apply(self, event: JSON) -> str | None:
        """Apply one watch event to the cache; return its resourceVersion, or None if the watch must re-list."""
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            log.info("informer %s: watch ended with %s, re-listing", self.name, obj.get("reason") or obj.get("code"))
            return None
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            return version
        if isinstance(obj, dict):
            obj = self.cache_form(obj)
        key = object_key(obj)
        with self._lock:
            old = self._cache.get(key)
            if kind == "DELETED":
                self._cache.pop(key, None)
            else:
                self._cache[key] = obj
            if self._indexers:
                self._index(key, old, None if kind == "DELETED" else obj)
        if kind in ("ADDED", "MODIFIED"):
            self._dispatch("MODIFIED" if old is not None else "ADDED", obj, old)
        elif kind == "DELETED":
            self._dispatch("DELETED", obj, old)
        return version

    def _run(self) -> None:
        backoff = 0.2
        version: str | None = None
        while not self._stopped.is_set():
            try:
                if version is None:
                    version = self._relist()
                # Jitter spreads the re-connects of many watches, as client-go does.
                timeout = int(self.watch_timeout_seconds * (1 + random.random() / 5))  # noqa: S311
                watch = self.resource.watch(
                    self.namespace,
                    resource_version=version,
                    timeout_seconds=timeout,
                    label_selector=self.label_selector,
                )
                self._current_watch = watch
                self.last_error = self.last_exception = None  # the API answered again (a watch that resumed)
                for event in watch:
                    if self._stopped.is_set():
                        break
                    next_version = self._apply(event)
                    if next_version is None:
                        version = None
                        break
                    version = next_version
                backoff = 0.2
            except ApiException as exc:
                if exc.status == 410:
                    version = None
                    continue
                # 404: the type is not served (an optional CRD not installed): expected, so not a warning.
                level = logging.INFO if exc.status == 404 else logging.WARNING
                log.log(level, "informer %s: %s; retrying in %.1fs", self.name, error_message(exc), backoff)
                self.last_error, self.last_exception = exc.status or 0, exc
                version = None
                self._stopped.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
            except (*CONNECTION_ERRORS, ValueError) as exc:
                if self._stopped.is_set():
                    break
                log.warning(
                    "informer %s: API unreachable (%s); retrying in %.1fs", self.name, type(exc).__name__, backoff
                )
                self.last_error, self.last_exception = 0, exc
                self._stopped.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
            finally:
                self._current_watch = None

    def _resync_loop(self) -> None:
        assert self.resync_seconds
        while not self._stopped.wait(self.resync_seconds):
            for obj in self.list():
                self._dispatch("MODIFIED", obj, obj)
