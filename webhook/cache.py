"""What the webhook knows about its cluster: which ServiceAccountImports exist (and how a federated one is mounted),
the namespaces' labels, and the audiences of the federated source clusters.

Fed by three watches (kubemcsa.kube.Informer), so a request costs dict hits. On a miss (an import or a
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
from dataclasses import dataclass

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from kubemcsa import api, federation, kube
from kubemcsa.spec import DEFAULT_FEDERATED_EXPIRATION_SECONDS, TOKEN_TYPE_FEDERATED
from webhook.mutation import (
    REASON_AUDIENCE_NOT_ALLOWED,
    REASON_UNKNOWN_FEDERATED_SOURCE,
    FederatedRefusal,
    ImportLookup,
    LookupFailed,
    LookupWouldBlock,
    ProjectedToken,
)

MISS_IMPORT = "import"
MISS_NAMESPACE = "namespace"
# Below the webhook's timeoutSeconds (5), so a slow API server gives a clear refusal, not a webhook timeout.
API_TIMEOUT_SECONDS = 3.0
# How long what a miss learnt from the API server answers again (found or not): long enough that a storm of pods
# naming unknown imports costs one call per namespace per period, short enough that a fix is seen at once.
RECENT_SECONDS = 2.0
# A namespace found absent: the watch shows it the moment it is created, so the answer can stand far longer.
ABSENT_SECONDS = 30.0
# The most answers remembered per kind (the oldest are forgotten first).
RECENT_ENTRIES = 4096
# GETs of namespaces the synced watch does not know (created a moment ago, or named by someone probing).
NAMESPACE_LOOKUPS_PER_SECOND = 5.0
NAMESPACE_LOOKUP_BURST = 20


@dataclass(frozen=True)
class FederatedImport:
    """What the webhook keeps of a federated import: its source, its spec.audiences (the token carries the first),
    the token's lifetime."""

    cluster_name: str
    audiences: tuple[str, ...]
    expiration_seconds: int


def federated_import(obj: Mapping[str, object]) -> FederatedImport | None:
    """The mount-relevant part of a federated import's spec (None for other imports), read leniently: the
    controller reports a bad spec; the webhook mounts what the spec says, or the defaults."""
    spec = obj.get("spec")
    if not isinstance(spec, Mapping) or spec.get("tokenType") != TOKEN_TYPE_FEDERATED:
        return None
    listed = spec.get("audiences")
    # Distinct, and no more than a record may allow plus one: a longer list holds a refused one among those kept.
    strings = (a.strip() for a in (listed if isinstance(listed, list) else ()) if isinstance(a, str))
    audiences = tuple(dict.fromkeys(a for a in strings if a))[: federation.MAX_AUDIENCES + 1]
    expiration = spec.get("expirationSeconds")
    valid = (
        isinstance(expiration, int) and not isinstance(expiration, bool) and expiration >= api.MIN_EXPIRATION_SECONDS
    )
    return FederatedImport(
        cluster_name=str(spec.get("clusterName") or ""),
        audiences=audiences,
        expiration_seconds=expiration if valid else DEFAULT_FEDERATED_EXPIRATION_SECONDS,  # type: ignore[arg-type]
    )


def unowned_secret(obj: Mapping[str, object]) -> str | None:
    """Why the import's `<name>-token` Secret must not be mounted, from its status (None: mount it).

    The controller alone writes an import's status (users have no serviceaccountimports/status): Ready says
    SecretNameConflict, and status.secrets does not list the Secret, exactly when a Secret of that name exists and
    is not controlled by the import. An import the controller has not seen yet says nothing: its Secret is mounted
    (the pod waits for it), the window in which a Secret planted beforehand could be mounted (README, security).
    """
    metadata, status = obj.get("metadata"), obj.get("status")
    if not isinstance(metadata, Mapping) or not isinstance(status, Mapping):
        return None
    conditions = status.get("conditions")
    ready = (
        [c for c in conditions if isinstance(c, Mapping) and c.get("type") == api.CONDITION_READY]
        if isinstance(conditions, list)
        else []
    )
    if not ready or ready[0].get("reason") != api.REASON_SECRET_CONFLICT:
        return None
    name, namespace = str(metadata.get("name") or ""), str(metadata.get("namespace") or "")
    secret = api.secret_name_for_import(name)
    listed = status.get("secrets")
    if isinstance(listed, list) and any(isinstance(s, Mapping) and s.get("name") == secret for s in listed):
        return None
    return (
        f'Secret "{secret}" in namespace "{namespace}" is not controlled by ServiceAccountImport "{name}", so the '
        "webhook does not mount it; delete or rename that Secret, or rename the import."
    )


class _Listed(dict[str, "FederatedImport | None"]):
    """A namespace's imports as one LIST returned them (name -> federated part), and which Secrets are not theirs."""

    unowned: dict[str, str]


def projected_tokens(
    namespace: str,
    names: Sequence[str],
    imports: Mapping[str, FederatedImport | None],
    audiences: Mapping[str, tuple[str, ...]],
) -> dict[str, ProjectedToken | FederatedRefusal]:
    """For the federated ones among `names`: their projected token, or why it cannot be mounted. Only an audience
    the source's record allows is mounted, as the controller checks: a pod whose import asks for another is refused
    with the same fix its import's AudienceNotAllowed condition gives."""
    out: dict[str, ProjectedToken | FederatedRefusal] = {}
    for name in names:
        fed = imports.get(name)
        if fed is None:
            continue
        allowed = audiences.get(fed.cluster_name) or ()
        refusal = federation.audience_refusal(fed.cluster_name[:80], fed.audiences, allowed)
        if not allowed:
            out[name] = FederatedRefusal(
                REASON_UNKNOWN_FEDERATED_SOURCE,
                f'ServiceAccountImport "{name}" in namespace "{namespace}" is federated with cluster '
                f'"{fed.cluster_name[:80]}", which no federated source names; record it with kubemcsa federate.',
            )
        elif refusal is not None:
            out[name] = FederatedRefusal(
                REASON_AUDIENCE_NOT_ALLOWED, f'ServiceAccountImport "{name}" in namespace "{namespace}": {refusal}'
            )
        else:
            audience = fed.audiences[0] if fed.audiences else allowed[0]
            out[name] = ProjectedToken(audience, fed.expiration_seconds)
    return out


class _Recent:
    """What the last API call about a key said, for `ttl` seconds (or the ttl given with it); at most `max_entries`
    keys (the oldest forgotten first); one call in flight per key (single flight)."""

    def __init__(self, ttl: float, *, max_entries: int = RECENT_ENTRIES, clock: Callable[[], float] = time.monotonic):
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        self._answers: dict[str, tuple[float, object]] = {}  # key -> (until, answer), in insertion order
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, key: str) -> object | None:
        entry = self._answers.get(key)
        if entry is None or self._clock() > entry[0]:
            return None
        return entry[1]

    def put(self, key: str, answer: object, ttl: float | None = None) -> None:
        now = self._clock()
        with self._guard:
            self._answers.pop(key, None)
            if len(self._answers) >= self._max_entries:
                # Forget what is stale, then the oldest: the map stays bounded whatever the traffic.
                self._answers = {k: v for k, v in self._answers.items() if now <= v[0]}
                while len(self._answers) >= self._max_entries:
                    del self._answers[next(iter(self._answers))]
            self._answers[key] = (now + (self._ttl if ttl is None else ttl), answer)

    def __len__(self) -> int:
        return len(self._answers)

    def lock(self, key: str) -> threading.Lock:
        with self._guard:
            if len(self._locks) > 1024:
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            return self._locks.setdefault(key, threading.Lock())


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


class _CacheOnly:
    """The cache seen from the event loop: dict hits only; a miss raises LookupWouldBlock."""

    def __init__(self, cache: WatchCache) -> None:
        self._cache = cache

    def namespace_labels(self, namespace: str) -> Mapping[str, str] | None:
        labels = self._cache._namespaces.get(namespace)
        if labels is not None:
            return labels
        recent = self._cache._recent_namespaces.get(namespace)
        if recent is None:
            raise LookupWouldBlock(namespace)
        return recent.labels  # type: ignore[attr-defined]

    def missing_imports(self, namespace: str, names: Sequence[str]) -> list[str]:
        known = self._cache._imports
        unknown = [name for name in names if (namespace, name) not in known]
        if not unknown:
            return []
        recent = self._cache._recent_imports.get(namespace)
        if recent is None:
            raise LookupWouldBlock(namespace)
        return [name for name in unknown if name not in recent]  # type: ignore[operator]

    def federated_imports(self, namespace: str, names: Sequence[str]) -> dict[str, ProjectedToken | FederatedRefusal]:
        cache = self._cache
        recent = cache._recent_imports.get(namespace) or {}
        known = {name: cache._imports.get((namespace, name), recent.get(name)) for name in names}  # type: ignore[attr-defined]
        return projected_tokens(namespace, names, known, cache._audiences)

    def unowned_secrets(self, namespace: str, names: Sequence[str]) -> dict[str, str]:
        cache = self._cache
        recent = cache._recent_imports.get(namespace)
        listed = recent.unowned if isinstance(recent, _Listed) else {}
        out = {}
        for name in names:
            watched = (namespace, name) in cache._imports
            why = cache._unowned.get((namespace, name)) if watched else listed.get(name)
            if why is not None:
                out[name] = why
        return out


@dataclass(frozen=True)
class _NamespaceAnswer:
    labels: Mapping[str, str] | None


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
        self._recent_imports = _Recent(recent_seconds, clock=clock)
        self._recent_namespaces = _Recent(recent_seconds, clock=clock)
        self._absent_seconds = absent_seconds
        self._namespace_lookups = _Bucket(NAMESPACE_LOOKUPS_PER_SECOND, NAMESPACE_LOOKUP_BURST, clock)
        self._misses = {MISS_IMPORT: 0, MISS_NAMESPACE: 0}
        self._misses_lock = threading.Lock()
        self._import_informer = kube.Informer(self._imports_api, name="webhook-serviceaccountimports")
        self._namespace_informer = kube.Informer(self._namespaces_api, name="webhook-namespaces")
        self._source_informer = kube.Informer(
            kube.Resource(api_client, kube.CONFIG_MAPS, timeout=api_timeout),
            namespace=system_namespace,
            label_selector=f"{federation.FEDERATED_SOURCE_LABEL}={federation.FEDERATED_SOURCE_LABEL_VALUE}",
            name="webhook-federated-sources",
        )
        self._import_informer.add_handler(self._on_import)
        self._namespace_informer.add_handler(self._on_namespace)
        self._source_informer.add_handler(self._on_source)
        self._view = _CacheOnly(self)

    # Informer handlers (informer threads): single dict/set operations, atomic under the GIL.
    def _on_import(self, event_type: str, obj: dict, old: dict | None) -> None:
        key = kube.object_key(obj)
        if event_type == "DELETED":
            self._imports.pop(key, None)
            self._unowned.pop(key, None)
            return
        why = unowned_secret(obj)
        if why is None:
            self._unowned.pop(key, None)
        else:
            self._unowned[key] = why  # before the import is seen: never mountable in between
        self._imports[key] = federated_import(obj)

    def _on_source(self, event_type: str, obj: dict, old: dict | None) -> None:
        _, name = kube.object_key(obj)
        previous = self._source_records.pop(name, None)
        if previous is not None:
            self._audiences.pop(previous, None)
        data = obj.get("data") if isinstance(obj.get("data"), dict) else {}
        cluster, allowed = data.get(federation.KEY_CLUSTER_NAME), federation.record_audiences(data)
        if event_type != "DELETED" and isinstance(cluster, str) and allowed:
            self._source_records[name] = cluster
            self._audiences[cluster] = allowed

    def _on_namespace(self, event_type: str, obj: dict, old: dict | None) -> None:
        _, name = kube.object_key(obj)
        if event_type == "DELETED":
            self._namespaces.pop(name, None)
        else:
            self._namespaces[name] = dict((obj.get("metadata") or {}).get("labels") or {})

    def _informers(self) -> tuple[kube.Informer, ...]:
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

    def _remaining(self, what: str) -> float:
        left = min(self._deadline - time.monotonic(), self._cache._api_timeout)
        if left <= 0.05:
            raise LookupFailed(_failure(what, "no time left before the API server's timeout"))
        return left

    def _ask_once(
        self,
        recent: _Recent,
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

        def get(timeout: float) -> _NamespaceAnswer:
            try:
                obj = cache._namespaces_api.get(namespace, timeout=timeout)
            except ApiException as exc:
                if exc.status == 404:
                    return _NamespaceAnswer(None)
                raise
            return _NamespaceAnswer(dict((obj.get("metadata") or {}).get("labels") or {}))

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

        def list_names(timeout: float) -> _Listed:
            listed = cache._imports_api.list(namespace, timeout=timeout)
            items = [item for item in listed.get("items") or () if isinstance(item, dict)]
            present = _Listed({(item.get("metadata") or {}).get("name"): federated_import(item) for item in items})
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


class StaticCache:
    """A fixed cache for tests and benchmarks: the same interface as WatchCache, no API server."""

    def __init__(
        self,
        namespaces: Mapping[str, Mapping[str, str]] | None = None,
        imports: set[tuple[str, str]] | None = None,
        *,
        synced: bool = True,
        federated: Mapping[tuple[str, str], FederatedImport] | None = None,
        audiences: Mapping[str, tuple[str, ...]] | None = None,
        unowned: Mapping[tuple[str, str], str] | None = None,
    ) -> None:
        self.namespaces = dict(namespaces or {})
        self.unowned = dict(unowned or {})
        self.imports = set(imports or ()) | set(federated or ())
        self.synced = synced
        self.federated = dict(federated or {})
        self.audiences = dict(audiences or {})

    @property
    def has_synced(self) -> bool:
        return self.synced

    def cached(self) -> ImportLookup:
        return self

    def misses(self) -> dict[str, int]:
        return {MISS_IMPORT: 0, MISS_NAMESPACE: 0}

    def namespace_labels(self, namespace: str) -> Mapping[str, str] | None:
        return self.namespaces.get(namespace)

    def before(self, deadline: float) -> ImportLookup:
        return self

    def missing_imports(self, namespace: str, names: Sequence[str]) -> list[str]:
        return [name for name in names if (namespace, name) not in self.imports]

    def federated_imports(self, namespace: str, names: Sequence[str]) -> dict[str, ProjectedToken | FederatedRefusal]:
        known = {name: self.federated.get((namespace, name)) for name in names}
        return projected_tokens(namespace, names, known, self.audiences)

    def unowned_secrets(self, namespace: str, names: Sequence[str]) -> dict[str, str]:
        return {name: why for name in names if (why := self.unowned.get((namespace, name))) is not None}
