"""What the webhook knows about its cluster, as plain data, and the event loop's view of it.

The part of the cache that every serving process needs: the dicts a watch fills (which ServiceAccountImports
exist, how a federated one is mounted and whose Secret is not theirs, the namespaces' labels, the audiences the
federated sources allow), what a recent API call said, and the non-blocking view of them (dict hits; a miss
raises LookupWouldBlock). It imports neither the Kubernetes client nor anything that talks to the API server: the
webhook's serving workers (webhook.worker) use it alone, fed by the one process that watches
(webhook.cache.WatchCache, through webhook.workers).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from kubemcsa.contract import api, federation
from kubemcsa.contract.spec import FederatedImport, federated_import
from webhook.mutation import (
    REASON_AUDIENCE_NOT_ALLOWED,
    REASON_UNKNOWN_FEDERATED_SOURCE,
    FederatedRefusal,
    ImportLookup,
    LookupWouldBlock,
    ProjectedToken,
)

MISS_IMPORT = "import"
MISS_NAMESPACE = "namespace"
# How long what a miss learnt from the API server answers again (found or not): long enough that a storm of pods
# naming unknown imports costs one call per namespace per period, short enough that a fix is seen at once.
RECENT_SECONDS = 2.0
# The most answers remembered per kind (the oldest are forgotten first).
RECENT_ENTRIES = 4096
# The most audiences kept of a federated import: no more than a record may allow plus one (a longer list holds a
# refused one among those kept).
KEPT_AUDIENCES = federation.MAX_AUDIENCES + 1


def mount_spec(obj: Mapping[str, object]) -> FederatedImport | None:
    """What the webhook keeps of an import's spec: for a federated one, how it is mounted (kubemcsa.contract.spec's
    lenient
    reading); None for the others (a Secret volume)."""
    return federated_import(obj, max_audiences=KEPT_AUDIENCES)


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


class Listed(dict[str, "FederatedImport | None"]):
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


class Recent:
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

    def entry(self, key: str) -> tuple[float, object] | None:
        """(seconds it stands still, answer) while fresh: what another process may remember for the rest."""
        entry = self._answers.get(key)
        left = entry[0] - self._clock() if entry is not None else 0.0
        if entry is None or left < 0:
            return None
        return left, entry[1]

    def __len__(self) -> int:
        return len(self._answers)

    def lock(self, key: str) -> threading.Lock:
        with self._guard:
            if len(self._locks) > 1024:
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            return self._locks.setdefault(key, threading.Lock())


class Known(Protocol):
    """The dicts a cache keeps (WatchCache, and a serving worker's copy of it, webhook.worker.FeedCache)."""

    _imports: dict[tuple[str, str], FederatedImport | None]
    _unowned: dict[tuple[str, str], str]
    _namespaces: dict[str, Mapping[str, str]]
    _audiences: dict[str, tuple[str, ...]]
    _recent_imports: Recent
    _recent_namespaces: Recent


class CacheView:
    """The cache seen from the event loop: dict hits only; a miss raises LookupWouldBlock."""

    def __init__(self, cache: Known) -> None:
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
        listed = recent.unowned if isinstance(recent, Listed) else {}
        out = {}
        for name in names:
            watched = (namespace, name) in cache._imports
            why = cache._unowned.get((namespace, name)) if watched else listed.get(name)
            if why is not None:
                out[name] = why
        return out


@dataclass(frozen=True)
class NamespaceAnswer:
    """What a GET of a namespace said: its labels, or None if it does not exist."""

    labels: Mapping[str, str] | None


# --- what the watching process tells the serving workers (webhook.workers, webhook.worker) ----------------------


@dataclass(frozen=True)
class Snapshot:
    """Everything a cache knows at one instant: what a new serving worker starts from."""

    imports: dict[tuple[str, str], FederatedImport | None]
    unowned: dict[tuple[str, str], str]
    namespaces: dict[str, Mapping[str, str]]
    audiences: dict[str, tuple[str, ...]]
    synced: bool


# A change, applied in order after a Snapshot: ("import", (namespace, name), FederatedImport | None, unowned why
# | None), ("import-deleted", (namespace, name)), ("namespace", name, labels), ("namespace-deleted", name),
# ("audiences", {cluster: audiences}), ("synced",).
Change = tuple


@dataclass(frozen=True)
class LookupReply:
    """The watching process's answer to a worker's miss: `value` (the namespace's labels, or the missing
    imports), what the API server said to remember (`recent`, for `ttl` more seconds), the kinds that made an API
    call (`asked`, for the miss counter), or `error` (a LookupFailed message)."""

    kind: str
    namespace: str
    value: object = None
    recent: object = None
    ttl: float = 0.0
    asked: tuple[str, ...] = ()
    error: str | None = None


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
        self.changes = threading.RLock()  # (nothing changes; for the workers' feed, see WatchCache.changes)

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

    def wait_for_sync(self, timeout: float | None = None) -> bool:
        return self.synced

    def subscribe(self, listener: object) -> Snapshot:
        imports: dict[tuple[str, str], FederatedImport | None] = dict.fromkeys(self.imports)
        imports.update(self.federated)
        return Snapshot(imports, dict(self.unowned), dict(self.namespaces), dict(self.audiences), self.synced)

    def unsubscribe(self, listener: object) -> None:
        pass

    def answer(self, kind: str, namespace: str, names: Sequence[str], deadline: float) -> LookupReply:
        value = self.namespace_labels(namespace) if kind == MISS_NAMESPACE else self.missing_imports(namespace, names)
        return LookupReply(kind, namespace, value)
