"""What the webhook knows about its cluster: which ServiceAccountImports exist (and how a federated one is mounted),
the namespaces' labels, and the audiences of the federated source clusters.

Fed by three watches (kubemcsa.client.Informer), so a request costs dict hits. On a miss (an import or a
namespace created a moment ago, not yet seen by the watch) it asks the API server once per kind (one GET of the
namespace, one LIST of its imports, whatever the number of names), remembers the answer for a moment, and never
waits past the caller's deadline. A namespace that does not exist is remembered longer (ABSENT_SECONDS: anyone
who reaches the webhook can name one), every remembered answer is bounded in number (RECENT_ENTRIES), and once
the namespace watch has synced, GETs of namespaces it does not know are rate limited (a client naming a new
unknown namespace in each review costs the API server at most NAMESPACE_LOOKUPS_PER_SECOND GETs).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from kubemcsa.client import kube
from kubemcsa.client.informer import Informer
from kubemcsa.contract import api, federation
from kubemcsa.contract.spec import FederatedImport
from webhook.lookups import (
    MISS_IMPORT,
    MISS_NAMESPACE,
    RECENT_SECONDS,
    CacheView,
    Change,
    Listed,
    LookupReply,
    NamespaceAnswer,
    Recent,
    Snapshot,
    mount_spec,
    unowned_secret,
)
from webhook.mutation import FederatedRefusal, ImportLookup, LookupFailed, LookupWouldBlock, ProjectedToken

# A namespace found absent: the watch shows it the moment it is created, so the answer can stand far longer.
ABSENT_SECONDS = 30.0
# Below the webhook's timeoutSeconds (5), so a slow API server gives a clear refusal, not a webhook timeout.
API_TIMEOUT_SECONDS = 3.0
# GETs of namespaces the synced watch does not know (created a moment ago, or named by someone probing).
NAMESPACE_LOOKUPS_PER_SECOND = 5.0
NAMESPACE_LOOKUP_BURST = 20


class _Bucket:
    """A token bucket: `take()` is True at most `rate` times a second on average, `burst` at once."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self._rate, self._burst, self._clock = rate, float(burst), clock
        self._tokens, self._at = float(burst), clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
            self._at = now
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True


class WatchCache:
    """Watch-fed lookups for the webhook; `cached()` gives the non-blocking view used on the request path.

    A miss makes one API call: a GET of the namespace, or one LIST of the namespace's imports (whatever the
    number of names), remembered for RECENT_SECONDS, and made by one thread at a time per namespace.
    `before(deadline)` gives a view whose calls end by that time.monotonic() deadline (the caller's timeout).
    """

    def __init__(
        self,
        api_client: ApiClient,
        *,
        api_timeout: float = API_TIMEOUT_SECONDS,
        recent_seconds: float = RECENT_SECONDS,
        absent_seconds: float = ABSENT_SECONDS,
        system_namespace: str = api.SYSTEM_NAMESPACE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._imports_api = kube.Resource(api_client, kube.SERVICE_ACCOUNT_IMPORTS, timeout=api_timeout)
        self._namespaces_api = kube.Resource(api_client, kube.NAMESPACES, timeout=api_timeout)
        self._api_timeout = api_timeout
        # (namespace, name) of every import -> what mounting it needs beyond its Secret (None: a Secret volume).
        self._imports: dict[tuple[str, str], FederatedImport | None] = {}
        # (namespace, name) of the imports whose Secret name is taken by a Secret they do not control -> why.
        self._unowned: dict[tuple[str, str], str] = {}
        # Federated source cluster -> the audiences its record allows (the default first), from the ConfigMaps
        # `kubemcsa federate` records.
        self._audiences: dict[str, tuple[str, ...]] = {}
        self._source_records: dict[str, str] = {}  # ConfigMap name -> the cluster it records
        self._namespaces: dict[str, Mapping[str, str]] = {}
        self._recent_imports = Recent(recent_seconds, clock=clock)
        self._recent_namespaces = Recent(recent_seconds, clock=clock)
        self._absent_seconds = absent_seconds
        self._namespace_lookups = _Bucket(NAMESPACE_LOOKUPS_PER_SECOND, NAMESPACE_LOOKUP_BURST, clock)
        self._misses = {MISS_IMPORT: 0, MISS_NAMESPACE: 0}
        self._misses_lock = threading.Lock()
        self._import_informer = Informer(self._imports_api, name="webhook-serviceaccountimports")
        self._namespace_informer = Informer(self._namespaces_api, name="webhook-namespaces")
        self._source_informer = Informer(
            kube.Resource(api_client, kube.CONFIG_MAPS, timeout=api_timeout),
            namespace=system_namespace,
            label_selector=f"{federation.FEDERATED_SOURCE_LABEL}={federation.FEDERATED_SOURCE_LABEL_VALUE}",
            name="webhook-federated-sources",
        )
        self._import_informer.add_handler(self._on_import)
        self._namespace_informer.add_handler(self._on_namespace)
        self._source_informer.add_handler(self._on_source)
        self._view = CacheView(self)
        # Held while a change is applied and told to the subscribers (the serving workers' feed, webhook.workers):
        # whoever sends a worker something after taking it sends it after every change it could have seen.
        self.changes = threading.RLock()
        self._listeners: list[Callable[[Change], None]] = []

    # Informer handlers (informer threads): single dict/set operations, atomic under the GIL.
    def _on_import(self, event_type: str, obj: dict, old: dict | None) -> None:
        key = kube.object_key(obj)
        with self.changes:
            if event_type == "DELETED":
                self._imports.pop(key, None)
                self._unowned.pop(key, None)
                self._tell(("import-deleted", key))
                return
            why = unowned_secret(obj)
            if why is None:
                self._unowned.pop(key, None)
            else:
                self._unowned[key] = why  # before the import is seen: never mountable in between
            value = self._imports[key] = mount_spec(obj)
            self._tell(("import", key, value, why))

    def _on_source(self, event_type: str, obj: dict, old: dict | None) -> None:
        _, name = kube.object_key(obj)
        with self.changes:
            previous = self._source_records.pop(name, None)
            if previous is not None:
                self._audiences.pop(previous, None)
            data = obj.get("data") if isinstance(obj.get("data"), dict) else {}
            cluster, allowed = data.get(federation.KEY_CLUSTER_NAME), federation.record_audiences(data)
            if event_type != "DELETED" and isinstance(cluster, str) and allowed:
                self._source_records[name] = cluster
                self._audiences[cluster] = allowed
            self._tell(("audiences", dict(self._audiences)))

    def _on_namespace(self, event_type: str, obj: dict, old: dict | None) -> None:
        _, name = kube.object_key(obj)
        with self.changes:
            if event_type == "DELETED":
                self._namespaces.pop(name, None)
                self._tell(("namespace-deleted", name))
            else:
                labels = self._namespaces[name] = dict((obj.get("metadata") or {}).get("labels") or {})
                self._tell(("namespace", name, labels))

    def _tell(self, change: Change) -> None:
        for listener in self._listeners:
            listener(change)

    def subscribe(self, listener: Callable[[Change], None]) -> Snapshot:
        """What the cache knows now; every later change is then given to `listener` (under `changes`, in order)."""
        with self.changes:
            self._listeners.append(listener)
            return Snapshot(
                dict(self._imports), dict(self._unowned), dict(self._namespaces), dict(self._audiences), self.has_synced
            )

    def unsubscribe(self, listener: Callable[[Change], None]) -> None:
        with self.changes:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def answer(self, kind: str, namespace: str, names: Sequence[str], deadline: float) -> LookupReply:
        """A serving worker's miss, answered here (the API call, if one is needed, is this process's): the
        answer, what to remember of the API server's, and whether it was asked. Never raises."""
        view = _Blocking(self, deadline)
        try:
            if kind == MISS_NAMESPACE:
                value: object = view.namespace_labels(namespace)
                recent = self._recent_namespaces.entry(namespace)
            else:
                value = view.missing_imports(namespace, names)
                recent = self._recent_imports.entry(namespace)
        except LookupFailed as exc:
            return LookupReply(kind, namespace, asked=tuple(view.asked), error=str(exc))
        ttl, remembered = recent if recent is not None else (0.0, None)
        return LookupReply(kind, namespace, value, remembered, ttl, tuple(view.asked))

    def _informers(self) -> tuple[Informer, ...]:
        return (self._import_informer, self._namespace_informer, self._source_informer)

    def start(self) -> WatchCache:
        for informer in self._informers():
            informer.start()
        return self

    def stop(self) -> None:
        for informer in self._informers():
            informer.stop()

    @property
    def has_synced(self) -> bool:
        return all(informer.has_synced for informer in self._informers())

    def wait_for_sync(self, timeout: float | None = None) -> bool:
        return all(informer.wait_for_sync(timeout) for informer in self._informers())

    def cached(self) -> ImportLookup:
        return self._view

    def before(self, deadline: float) -> ImportLookup:
        """The blocking lookups, each API call ending by `deadline` (time.monotonic())."""
        return _Blocking(self, deadline)

    def misses(self) -> dict[str, int]:
        """How many lookups missed the cache and went to the API server, by kind."""
        with self._misses_lock:
            return dict(self._misses)

    def _count_miss(self, kind: str) -> None:
        with self._misses_lock:
            self._misses[kind] += 1

    # The blocking lookups (a thread of the pool, never the event loop), without a deadline of their own.
    def namespace_labels(self, namespace: str) -> Mapping[str, str] | None:
        return self.before(time.monotonic() + self._api_timeout).namespace_labels(namespace)

    def missing_imports(self, namespace: str, names: Sequence[str]) -> list[str]:
        return self.before(time.monotonic() + self._api_timeout).missing_imports(namespace, names)

    def federated_imports(self, namespace: str, names: Sequence[str]) -> dict[str, ProjectedToken | FederatedRefusal]:
        return self._view.federated_imports(namespace, names)

    def unowned_secrets(self, namespace: str, names: Sequence[str]) -> dict[str, str]:
        return self._view.unowned_secrets(namespace, names)


class _Blocking:
    """WatchCache's lookups that may ask the API server (once per request and kind), within a deadline."""

    def __init__(self, cache: WatchCache, deadline: float) -> None:
        self._cache = cache
        self._deadline = deadline
        self.asked: list[str] = []  # the kinds for which this view called the API server

    def _remaining(self, what: str) -> float:
        left = min(self._deadline - time.monotonic(), self._cache._api_timeout)
        if left <= 0.05:
            raise LookupFailed(_failure(what, "no time left before the API server's timeout"))
        return left

    def _ask_once(
        self,
        recent: Recent,
        key: str,
        kind: str,
        what: str,
        call: Callable[[float], object],
        *,
        ttl_of: Callable[[object], float | None] = lambda answer: None,
        allowed: Callable[[], bool] = lambda: True,
    ) -> object:
        """`call(timeout)`'s answer, remembered under `key` (for `ttl_of(answer)` seconds, None: the default); or
        the answer another thread got while this one waited. `allowed()` False: the call is not made."""
        lock = recent.lock(key)
        if not lock.acquire(timeout=self._remaining(what)):
            raise LookupFailed(_failure(what, "timed out waiting for another lookup"))
        try:
            answer = recent.get(key)
            if answer is not None:
                return answer
            if not allowed():
                raise LookupFailed(
                    f"The webhook looked up too many namespaces it does not know just now (among them {what}); "
                    "retry in a moment."
                )
            self._cache._count_miss(kind)
            self.asked.append(kind)
            try:
                answer = call(self._remaining(what))
            except ApiException as exc:
                raise LookupFailed(_failure(what, f"HTTP {exc.status}")) from None
            except kube.CONNECTION_ERRORS as exc:
                raise LookupFailed(_failure(what, type(exc).__name__)) from None
            recent.put(key, answer, ttl_of(answer))
            return answer
        finally:
            lock.release()

    def namespace_labels(self, namespace: str) -> Mapping[str, str] | None:
        cache = self._cache
        try:
            return cache._view.namespace_labels(namespace)
        except LookupWouldBlock:
            pass

        def get(timeout: float) -> NamespaceAnswer:
            try:
                obj = cache._namespaces_api.get(namespace, timeout=timeout)
            except ApiException as exc:
                if exc.status == 404:
                    return NamespaceAnswer(None)
                raise
            return NamespaceAnswer(dict((obj.get("metadata") or {}).get("labels") or {}))

        def ttl_of(answer: object) -> float | None:
            return cache._absent_seconds if answer.labels is None else None  # type: ignore[attr-defined]

        def allowed() -> bool:
            # Before the watch has listed, every namespace is unknown and the GETs are needed; after, only the
            # newest are, and the rest is someone naming namespaces that do not exist.
            return not cache._namespace_informer.has_synced or cache._namespace_lookups.take()

        what = f'namespace "{namespace[:80]}"'
        answer = self._ask_once(
            cache._recent_namespaces, namespace, MISS_NAMESPACE, what, get, ttl_of=ttl_of, allowed=allowed
        )
        return answer.labels  # type: ignore[attr-defined]

    def missing_imports(self, namespace: str, names: Sequence[str]) -> list[str]:
        cache = self._cache
        try:
            return cache._view.missing_imports(namespace, names)
        except LookupWouldBlock:
            pass

        def list_names(timeout: float) -> Listed:
            listed = cache._imports_api.list(namespace, timeout=timeout)
            items = [item for item in listed.get("items") or () if isinstance(item, dict)]
            present = Listed({(item.get("metadata") or {}).get("name"): mount_spec(item) for item in items})
            present.unowned = {
                (item.get("metadata") or {}).get("name"): why
                for item in items
                if (why := unowned_secret(item)) is not None
            }
            return present

        what = f'ServiceAccountImports in namespace "{namespace}"'
        present = self._ask_once(cache._recent_imports, namespace, MISS_IMPORT, what, list_names)
        return [name for name in names if (namespace, name) not in cache._imports and name not in present]  # type: ignore[operator]

    def federated_imports(self, namespace: str, names: Sequence[str]) -> dict[str, ProjectedToken | FederatedRefusal]:
        return self._cache._view.federated_imports(namespace, names)

    def unowned_secrets(self, namespace: str, names: Sequence[str]) -> dict[str, str]:
        return self._cache._view.unowned_secrets(namespace, names)


def _failure(what: str, cause: str) -> str:
    return (
        f"The webhook could not look up {what} with the API server ({cause}); retry, and check the "
        "webhook's RBAC and its connection to the API server if it persists."
    )
