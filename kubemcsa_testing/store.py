"""Objects, resourceVersions and watches of the in-memory API server.

One lock, one resourceVersion counter per server, a bounded history of events for watches that resume from
a resourceVersion. Stored objects are never mutated: a write replaces the dict, so readers may serialise what
they got after releasing the lock.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubemcsa_testing import errors
from kubemcsa_testing.resources import ResourceInfo

Obj = dict[str, Any]
ObjectMatcher = Callable[[Mapping[str, Any]], bool]

DEFAULT_HISTORY = 5000
_CLOSED = object()
INITIAL_EVENTS_END = "INITIAL_EVENTS_END"


@dataclass(frozen=True)
class Event:
    rv: int
    storage_key: str
    type: str  # ADDED, MODIFIED, DELETED
    obj: Obj
    old: Obj | None


@dataclass(eq=False)
class Watcher:
    """One watch: events for one storage, filtered by namespace and selectors, queued for the HTTP thread."""

    storage_key: str
    namespace: str | None
    matches: ObjectMatcher
    queue: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    closed: bool = False

    def _visible(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        if self.namespace is not None and obj["metadata"].get("namespace") != self.namespace:
            return False
        return self.matches(obj)

    def offer(self, event: Event) -> None:
        """Queue `event` as this watch sees it: an object entering or leaving the selection is ADDED/DELETED."""
        now = self._visible(event.obj) if event.type != "DELETED" else False
        before = self._visible(event.old) if event.old is not None else False
        if event.type == "DELETED":
            if self._visible(event.obj):
                self.queue.put(("DELETED", event.obj))
        elif now and before:
            self.queue.put(("MODIFIED", event.obj))
        elif now:
            self.queue.put(("ADDED", event.obj))
        elif before:
            # As kube's cacher: the previous content (the last state this watch saw), at the event's version.
            last = event.old or event.obj
            gone = {**last, "metadata": {**last["metadata"], "resourceVersion": str(event.rv)}}
            self.queue.put(("DELETED", gone))

    def next(self, timeout: float | None) -> tuple[str, Obj] | None:
        """The next (type, object); None on timeout; raises EOFError once the watch is closed."""
        try:
            item = self.queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _CLOSED:
            self.closed = True
            raise EOFError
        return item

    def pending(self, limit: int) -> list[tuple[str, Obj]]:
        """Up to `limit` more queued (type, object) pairs, without waiting; the end of a closed watch stays queued,
        for next() to raise."""
        out: list[tuple[str, Obj]] = []
        while len(out) < limit:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item is _CLOSED:
                self.queue.put(_CLOSED)  # nothing is queued after it: close() is the last put
                break
            out.append(item)
        return out

    def close(self) -> None:
        self.queue.put(_CLOSED)


def _meta_key(obj: Obj) -> tuple[str, str]:
    meta = obj["metadata"]
    return meta.get("namespace", ""), meta["name"]


class Store:
    """Thread-safe object storage. Callers hold `lock` for read-modify-write sequences (it is reentrant)."""

    def __init__(self, history_size: int = DEFAULT_HISTORY) -> None:
        self.lock = threading.RLock()
        self._rv = 0
        # storage key -> namespace ("" if cluster-scoped) -> name -> object
        self._objects: dict[str, dict[str, dict[str, Obj]]] = {}
        self._uids: dict[str, tuple[str, str, str]] = {}
        self._dependents: dict[str, set[str]] = {}  # owner uid -> dependent uids
        self._history: deque[Event] = deque(maxlen=history_size)
        self._compacted = 0  # the newest resourceVersion whose event is no longer in the history
        self._watchers: dict[str, set[Watcher]] = {}
        self._last_write: dict[str, int] = {}  # storage key -> resourceVersion of its newest write
        self._listeners: list[Callable[[Event], None]] = []

    # Reads ------------------------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        return self._rv

    def last_write(self, storage_key: str) -> int:
        """The resourceVersion of the newest write to a storage (0 if none): what caches of its content key on."""
        return self._last_write.get(storage_key, 0)

    def get(self, storage_key: str, namespace: str, name: str) -> Obj | None:
        return self._objects.get(storage_key, {}).get(namespace, {}).get(name)

    def list(self, storage_key: str, namespace: str | None = None) -> tuple[list[Obj], int]:
        """Objects of a storage (of one namespace if given), sorted like etcd keys, and the current RV."""
        with self.lock:
            by_ns = self._objects.get(storage_key, {})
            if namespace is not None:
                spaces: Iterable[tuple[str, dict[str, Obj]]] = [(namespace, by_ns.get(namespace, {}))]
            else:
                spaces = sorted(by_ns.items())
            out = [obj for _, objs in spaces for _, obj in sorted(objs.items())]
            return out, self._rv

    def namespaces_in_use(self, namespace: str) -> list[tuple[str, Obj]]:
        """(storage key, object) for every object in a namespace."""
        with self.lock:
            return [(key, obj) for key, by_ns in self._objects.items() for obj in by_ns.get(namespace, {}).values()]

    def by_uid(self, uid: str) -> tuple[str, Obj] | None:
        with self.lock:
            where = self._uids.get(uid)
            if where is None:
                return None
            obj = self.get(*where)
            return (where[0], obj) if obj is not None else None

    def uid_exists(self, uid: str) -> bool:
        return uid in self._uids

    def dependents_of(self, uid: str) -> list[tuple[str, Obj]]:
        with self.lock:
            out = []
            for dep in self._dependents.get(uid, ()):
                found = self.by_uid(dep)
                if found:
                    out.append(found)
            return out

    # Writes: the caller has built the object; the store assigns resourceVersion ----------------------

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _with_rv(self, obj: Obj, rv: str) -> Obj:
        obj = dict(obj)
        obj["metadata"] = {**obj["metadata"], "resourceVersion": rv}
        return obj

    def create(self, info: ResourceInfo, obj: Obj) -> Obj:
        with self.lock:
            ns, name = _meta_key(obj)
            space = self._objects.setdefault(info.storage_key, {}).setdefault(ns, {})
            if name in space:
                raise errors.already_exists(info.plural, name, info.group)
            stored = self._with_rv(obj, self._next_rv())
            space[name] = stored
            self._index(info.storage_key, stored, None)
            self._emit(Event(self._rv, info.storage_key, "ADDED", stored, None))
            return stored

    def update(self, info: ResourceInfo, obj: Obj, expected_rv: str) -> Obj:
        """Replace an object if its current resourceVersion is `expected_rv` (409 Conflict otherwise)."""
        with self.lock:
            ns, name = _meta_key(obj)
            current = self.get(info.storage_key, ns, name)
            if current is None:
                raise errors.not_found(info.plural, name, info.group)
            if current["metadata"]["resourceVersion"] != expected_rv:
                raise errors.conflict(info.plural, name, info.group)
            stored = self._with_rv(obj, self._next_rv())
            self._objects[info.storage_key][ns][name] = stored
            self._index(info.storage_key, stored, current)
            self._emit(Event(self._rv, info.storage_key, "MODIFIED", stored, current))
            return stored

    def delete(self, info: ResourceInfo, namespace: str, name: str, expected_rv: str | None = None) -> Obj:
        """Remove an object; the DELETED event carries it with a new resourceVersion, as etcd's watch does."""
        with self.lock:
            current = self.get(info.storage_key, namespace, name)
            if current is None:
                raise errors.not_found(info.plural, name, info.group)
            if expected_rv is not None and current["metadata"]["resourceVersion"] != expected_rv:
                raise errors.conflict(info.plural, name, info.group)
            del self._objects[info.storage_key][namespace][name]
            if not self._objects[info.storage_key][namespace]:
                del self._objects[info.storage_key][namespace]
            self._index(info.storage_key, None, current)
            gone = self._with_rv(current, self._next_rv())
            self._emit(Event(self._rv, info.storage_key, "DELETED", gone, current))
            return gone

    def drop_storage(self, storage_key: str) -> list[Obj]:
        """Forget a whole storage (a CRD's objects once it is deleted); returns the removed objects."""
        removed = []
        with self.lock:
            for _, objs in sorted(self._objects.get(storage_key, {}).items()):
                for name in sorted(objs):
                    current = objs[name]
                    self._index(storage_key, None, current)
                    gone = self._with_rv(current, self._next_rv())
                    self._emit(Event(self._rv, storage_key, "DELETED", gone, current))
                    removed.append(gone)
            self._objects.pop(storage_key, None)
        return removed

    def _index(self, storage_key: str, new: Obj | None, old: Obj | None) -> None:
        if old is not None:
            uid = old["metadata"].get("uid")
            if new is None and uid:
                self._uids.pop(uid, None)
            for ref in old["metadata"].get("ownerReferences") or []:
                owner = ref.get("uid") if isinstance(ref, dict) else None
                deps = self._dependents.get(owner) if isinstance(owner, str) else None
                if deps is not None:
                    deps.discard(uid)
                    if not deps:
                        del self._dependents[owner]
        if new is not None:
            uid = new["metadata"]["uid"]
            self._uids[uid] = (storage_key, *_meta_key(new))
            for ref in new["metadata"].get("ownerReferences") or []:
                if isinstance(ref, dict) and isinstance(ref.get("uid"), str) and ref["uid"]:
                    self._dependents.setdefault(ref["uid"], set()).add(uid)

    def _emit(self, event: Event) -> None:
        if len(self._history) == self._history.maxlen:
            self._compacted = self._history[0].rv
        self._history.append(event)
        self._last_write[event.storage_key] = event.rv
        for watcher in self._watchers.get(event.storage_key, ()):
            watcher.offer(event)
        for listener in self._listeners:
            listener(event)

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        """Call `listener(event)` for every write, under the lock (it must only enqueue work)."""
        self._listeners.append(listener)

    # Watches ---------------------------------------------------------------------------------------

    def watch(self, info: ResourceInfo, namespace: str | None, matches: ObjectMatcher, since: int | None) -> Watcher:
        """Start a watch. `since` None: ADDED for every current object, then changes. Else replay from there.

        Raises 410 Gone (Expired) when events after `since` have left the history.
        """
        watcher = Watcher(info.storage_key, namespace, matches)
        with self.lock:
            if since is None:
                objs, _ = self.list(info.storage_key, namespace)
                for obj in objs:
                    if matches(obj):
                        watcher.queue.put(("ADDED", obj))
                # Marks the end of the synthetic ADDED events (for watch-list's initial-events-end bookmark).
                watcher.queue.put((INITIAL_EVENTS_END, {"metadata": {"resourceVersion": str(self._rv)}}))
            else:
                if since < self._compacted:
                    raise errors.gone(f"too old resource version: {since} ({self._compacted + 1})")
                for event in self._history:
                    if event.rv > since and event.storage_key == info.storage_key:
                        watcher.offer(event)
            self._watchers.setdefault(info.storage_key, set()).add(watcher)
        return watcher

    def stop_watch(self, watcher: Watcher) -> None:
        with self.lock:
            watchers = self._watchers.get(watcher.storage_key)
            if watchers is not None:
                watchers.discard(watcher)

    def close_watches(self) -> None:
        """End every watch (the server is stopping)."""
        with self.lock:
            for watchers in self._watchers.values():
                for watcher in watchers:
                    watcher.close()
            self._watchers.clear()

    def compacted_revision(self) -> int:
        return self._compacted
