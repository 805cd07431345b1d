"""What the webhook knows about its cluster: which ServiceAccountImports exist, and the namespaces' labels.

Fed by two watches (kubemcsa.kube.Informer), so a request costs dict hits. On a miss (an import or a
namespace created a moment ago, not yet seen by the watch) it asks the API server once before answering.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from kubemcsa import kube
from webhook.mutation import ImportLookup, LookupFailed, LookupWouldBlock

MISS_IMPORT = "import"
MISS_NAMESPACE = "namespace"
# Below the webhook's timeoutSeconds (5), so a slow API server gives a clear refusal, not a webhook timeout.
API_TIMEOUT_SECONDS = 3.0


class _CacheOnly:
    """The cache seen from the event loop: dict hits only; a miss raises LookupWouldBlock."""

    def __init__(self, cache: WatchCache) -> None:
        self._cache = cache

    def namespace_labels(self, namespace: str) -> Mapping[str, str] | None:
        labels = self._cache._namespaces.get(namespace)
        if labels is None:
            raise LookupWouldBlock(namespace)
        return labels

    def import_exists(self, namespace: str, name: str) -> bool:
        if (namespace, name) not in self._cache._imports:
            raise LookupWouldBlock(name)
        return True


class WatchCache:
    """Watch-fed lookups for the webhook; `cached()` gives the non-blocking view used on the request path."""

    def __init__(self, api_client: ApiClient, *, api_timeout: float = API_TIMEOUT_SECONDS) -> None:
        self._imports_api = kube.Resource(api_client, kube.SERVICE_ACCOUNT_IMPORTS, timeout=api_timeout)
        self._namespaces_api = kube.Resource(api_client, kube.NAMESPACES, timeout=api_timeout)
        self._imports: set[tuple[str, str]] = set()
        self._namespaces: dict[str, Mapping[str, str]] = {}
        self._misses = {MISS_IMPORT: 0, MISS_NAMESPACE: 0}
        self._misses_lock = threading.Lock()
        self._import_informer = kube.Informer(self._imports_api, name="webhook-serviceaccountimports")
        self._namespace_informer = kube.Informer(self._namespaces_api, name="webhook-namespaces")
        self._import_informer.add_handler(self._on_import)
        self._namespace_informer.add_handler(self._on_namespace)
        self._view = _CacheOnly(self)

    # Informer handlers (informer threads): single dict/set operations, atomic under the GIL.
    def _on_import(self, event_type: str, obj: dict, old: dict | None) -> None:
        key = kube.object_key(obj)
        if event_type == "DELETED":
            self._imports.discard(key)
        else:
            self._imports.add(key)

    def _on_namespace(self, event_type: str, obj: dict, old: dict | None) -> None:
        _, name = kube.object_key(obj)
        if event_type == "DELETED":
            self._namespaces.pop(name, None)
        else:
            self._namespaces[name] = dict((obj.get("metadata") or {}).get("labels") or {})

    def start(self) -> WatchCache:
        self._import_informer.start()
        self._namespace_informer.start()
        return self

    def stop(self) -> None:
        self._import_informer.stop()
        self._namespace_informer.stop()

    @property
    def has_synced(self) -> bool:
        return self._import_informer.has_synced and self._namespace_informer.has_synced

    def wait_for_sync(self, timeout: float | None = None) -> bool:
        return self._import_informer.wait_for_sync(timeout) and self._namespace_informer.wait_for_sync(timeout)

    def cached(self) -> ImportLookup:
        return self._view

    def misses(self) -> dict[str, int]:
        """How many lookups missed the cache and went to the API server, by kind."""
        with self._misses_lock:
            return dict(self._misses)

    def _count_miss(self, kind: str) -> None:
        with self._misses_lock:
            self._misses[kind] += 1

    # The blocking lookups (a thread of the pool, never the event loop).
    def namespace_labels(self, namespace: str) -> Mapping[str, str] | None:
        labels = self._namespaces.get(namespace)
        if labels is not None:
            return labels
        self._count_miss(MISS_NAMESPACE)
        try:
            obj = self._namespaces_api.get(namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise LookupFailed(_failure("namespace", f'"{namespace}"', f"HTTP {exc.status}")) from None
        except kube.CONNECTION_ERRORS as exc:
            raise LookupFailed(_failure("namespace", f'"{namespace}"', type(exc).__name__)) from None
        return dict((obj.get("metadata") or {}).get("labels") or {})

    def import_exists(self, namespace: str, name: str) -> bool:
        if (namespace, name) in self._imports:
            return True
        self._count_miss(MISS_IMPORT)
        try:
            self._imports_api.get(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return False
            what = f'"{name}" in namespace "{namespace}"'
            raise LookupFailed(_failure("ServiceAccountImport", what, f"HTTP {exc.status}")) from None
        except kube.CONNECTION_ERRORS as exc:
            what = f'"{name}" in namespace "{namespace}"'
            raise LookupFailed(_failure("ServiceAccountImport", what, type(exc).__name__)) from None
        return True


def _failure(kind: str, what: str, cause: str) -> str:
    return (
        f"The webhook could not look up {kind} {what} with the API server ({cause}); retry, and check the "
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
    ) -> None:
        self.namespaces = dict(namespaces or {})
        self.imports = set(imports or ())
        self.synced = synced

    @property
    def has_synced(self) -> bool:
        return self.synced

    def cached(self) -> ImportLookup:
        return self

    def misses(self) -> dict[str, int]:
        return {MISS_IMPORT: 0, MISS_NAMESPACE: 0}

    def namespace_labels(self, namespace: str) -> Mapping[str, str] | None:
        return self.namespaces.get(namespace)

    def import_exists(self, namespace: str, name: str) -> bool:
        return (namespace, name) in self.imports
