"""A dict-in, dict-out client for the Kubernetes API, and a list-watch cache, on the official client.

The generated methods of the `kubernetes` package validate every argument and turn every response into
model objects, which costs more than the rest of a controller's work. This module keeps the official
ApiClient for what it is good at (configuration, authentication, TLS, connection pooling, retries) and
speaks plain JSON dicts above it, so that the logic that decides things can take and return plain data.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import random
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import urllib3
from kubernetes import config as kube_config
from kubernetes.client import ApiClient, Configuration, rest
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from kubemcsa.client.kubeconfig import load_api_client
from kubemcsa.contract import api
from kubemcsa.contract.credentials import Credentials

log = logging.getLogger(__name__)

JSON = dict[str, Any]
PATCH_CONTENT_TYPES = {
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
    "strategic": "application/strategic-merge-patch+json",
}
# Errors that mean "could not talk to the API server at all" (as opposed to an API answer).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (urllib3.exceptions.HTTPError, OSError)
# OSErrors that come from this machine's files (a read-only root, no /tmp, a missing path), not from the network.
_LOCAL_FILE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_LOCAL_FILE_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT}
_NETWORK_ERRORS = (ssl.SSLError, ConnectionError, TimeoutError, socket.gaierror, socket.herror)


def local_file_problem(exc: BaseException) -> str | None:
    """What failed, if `exc` is an error of this machine's filesystem rather than of the network; else None."""
    if not isinstance(exc, OSError) or isinstance(exc, _NETWORK_ERRORS):
        return None
    if not (isinstance(exc, _LOCAL_FILE_ERRORS) or exc.errno in _LOCAL_FILE_ERRNOS):
        return None
    detail = exc.strerror or type(exc).__name__
    return f"{detail}: {exc.filename}" if exc.filename else detail


@dataclass(frozen=True)
class ResourceType:
    api_version: str
    plural: str
    kind: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{quote(name, safe='')}"
            if subresource:
                base += f"/{subresource}"
        return base


NAMESPACES = ResourceType("v1", "namespaces", "Namespace", namespaced=False)
SERVICE_ACCOUNTS = ResourceType("v1", "serviceaccounts", "ServiceAccount")
SECRETS = ResourceType("v1", "secrets", "Secret")
CONFIG_MAPS = ResourceType("v1", "configmaps", "ConfigMap")
PODS = ResourceType("v1", "pods", "Pod")
EVENTS = ResourceType("v1", "events", "Event")
SERVICES = ResourceType("v1", "services", "Service")
LEASES = ResourceType("coordination.k8s.io/v1", "leases", "Lease")
SERVICE_ACCOUNT_IMPORTS = ResourceType(api.API_VERSION, api.PLURAL, api.KIND)
MUTATING_WEBHOOK_CONFIGURATIONS = ResourceType(
    "admissionregistration.k8s.io/v1", "mutatingwebhookconfigurations", "MutatingWebhookConfiguration", False
)
CRDS = ResourceType("apiextensions.k8s.io/v1", "customresourcedefinitions", "CustomResourceDefinition", False)
ROLES = ResourceType("rbac.authorization.k8s.io/v1", "roles", "Role")
CLUSTER_ROLES = ResourceType("rbac.authorization.k8s.io/v1", "clusterroles", "ClusterRole", False)
ROLE_BINDINGS = ResourceType("rbac.authorization.k8s.io/v1", "rolebindings", "RoleBinding")
CLUSTER_ROLE_BINDINGS = ResourceType("rbac.authorization.k8s.io/v1", "clusterrolebindings", "ClusterRoleBinding", False)
DEPLOYMENTS = ResourceType("apps/v1", "deployments", "Deployment")
SELF_SUBJECT_REVIEWS = ResourceType(
    "authentication.k8s.io/v1", "selfsubjectreviews", "SelfSubjectReview", namespaced=False
)

RESOURCE_TYPES = {
    (t.api_version, t.kind): t
    for t in (
        NAMESPACES,
        SERVICE_ACCOUNTS,
        SECRETS,
        CONFIG_MAPS,
        PODS,
        EVENTS,
        SERVICES,
        LEASES,
        SERVICE_ACCOUNT_IMPORTS,
        MUTATING_WEBHOOK_CONFIGURATIONS,
        CRDS,
        ROLES,
        CLUSTER_ROLES,
        ROLE_BINDINGS,
        CLUSTER_ROLE_BINDINGS,
        DEPLOYMENTS,
        ResourceType("policy/v1", "poddisruptionbudgets", "PodDisruptionBudget"),
        ResourceType("batch/v1", "jobs", "Job"),
    )
}


def client_for_credentials(creds: Credentials) -> ApiClient:
    """An ApiClient that calls creds.server as the bearer of creds.token, trusting only creds.ca_crt (no file)."""
    config = Configuration(host=creds.server)
    config.api_key = {"authorization": creds.token}
    config.api_key_prefix = {"authorization": "Bearer"}
    config.ca_cert_data = creds.ca_crt.decode()
    config.verify_ssl = True
    config.retries = False  # one connection attempt per call: callers decide about retrying
    return ApiClient(config)


def whoami(api_client: ApiClient, timeout: float = 10) -> JSON:
    """The caller's `userInfo` (username, groups, uid) as the API server sees it (SelfSubjectReview)."""
    review = {"apiVersion": SELF_SUBJECT_REVIEWS.api_version, "kind": SELF_SUBJECT_REVIEWS.kind}
    answer = Resource(api_client, SELF_SUBJECT_REVIEWS, timeout=timeout).create(review)
    return dict((answer.get("status") or {}).get("userInfo") or {})


def get_path(api_client: ApiClient, path: str, timeout: float = 10) -> JSON:
    """GET a non-resource path that answers JSON (e.g. /.well-known/openid-configuration)."""
    return Resource(api_client, NAMESPACES, timeout=timeout)._json("GET", path)


def resource_type_of(obj: JSON) -> ResourceType:
    """The ResourceType of a manifest, from its apiVersion and kind; ValueError if this module does not know it."""
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    try:
        return RESOURCE_TYPES[key]
    except KeyError:
        raise ValueError(f"unknown resource {key[0]} {key[1]}: add it to kubemcsa.client.kube.RESOURCE_TYPES") from None


# What local_api_client raises: no usable configuration, or a file of this machine that could not be used.
LOCAL_CLIENT_ERRORS: tuple[type[BaseException], ...] = (kube_config.ConfigException, OSError, ValueError)


def local_client_problem(exc: BaseException) -> str:
    """What went wrong in local_api_client, for a component's one-line startup error (no final period)."""
    problem = local_file_problem(exc)
    if problem:
        return (
            f"a file on this machine could not be used ({problem}), which is no fault of the cluster configuration; "
            "check the pod's volumes"
        )
    return f"no usable cluster configuration ({exc}); pass --kubeconfig or run in a pod"


def local_api_client(kubeconfig: str | None = None) -> ApiClient:
    """The client of the cluster a component runs in: --kubeconfig, else in-cluster, else KUBECONFIG/~/.kube/config.

    In a pod, the service-account token is a projected token that the kubelet rotates; the in-cluster loader
    re-reads it, so long-running components keep authenticating. A kubeconfig is read by kubemcsa.client.kubeconfig,
    which
    writes nothing to the local filesystem. Raises kubernetes' ConfigException, kubemcsa's ConfigError or OSError.
    """
    if kubeconfig:
        return load_api_client(kubeconfig)
    configuration = Configuration()
    try:
        kube_config.load_incluster_config(client_configuration=configuration)
    except kube_config.ConfigException:
        return load_api_client()
    return ApiClient(configuration)


def error_status(exc: ApiException) -> JSON:
    """The Status body of an API error, or {} if the server did not send one."""
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def error_reason(exc: ApiException) -> str:
    """The Status `reason` of an API error (NotFound, AlreadyExists, Conflict, Forbidden, ...), or ""."""
    return str(error_status(exc).get("reason", ""))


def error_message(exc: ApiException) -> str:
    """The Status `message` of an API error, else its HTTP reason phrase."""
    return str(error_status(exc).get("message") or exc.reason or f"HTTP {exc.status}")


@functools.lru_cache(maxsize=64)  # a Timeout is cloned by urllib3 for each request: one per value will do
def _timeout(value: float | tuple[float, float] | None) -> urllib3.Timeout | None:
    if not value:
        return None
    if isinstance(value, tuple):
        return urllib3.Timeout(connect=value[0], read=value[1])
    return urllib3.Timeout(total=value)


@functools.lru_cache(maxsize=256)
def _parsed_host(host: str) -> tuple[str, str | None, str | None, int | None]:
    """(path prefix, scheme, host name, port) of a configuration's host URL, as the PoolManager would parse it."""
    parsed = urllib3.util.parse_url(host)
    return (parsed.path or "").rstrip("/"), parsed.scheme, parsed.host, parsed.port


def lean_request(
    api_client: ApiClient,
    method: str,
    path: str,
    *,
    query: list[tuple[str, Any]] | None = None,
    body: Any = None,
    content_type: str = "application/json",
    timeout: float | tuple[float, float] | None = None,
) -> rest.RESTResponse:
    """`method path` with a JSON body over `api_client`'s pool, with its auth and default headers (see Resource)."""
    configuration = api_client.configuration
    headers = {**api_client.default_headers, "Accept": "application/json", "Content-Type": content_type}
    if api_client.cookie:
        headers["Cookie"] = api_client.cookie
    bearer = configuration.auth_settings().get("BearerToken")  # runs the refresh hook: a rotated token is read
    if bearer and bearer.get("value"):
        headers[bearer["key"]] = bearer["value"]
    url = configuration.host + path
    pairs = [(k, v) for k, v in (query or []) if v is not None]
    if pairs:
        url += "?" + urlencode(pairs, quote_via=quote)
    if content_type == PATCH_CONTENT_TYPES["json"] and not isinstance(body, list):
        headers["Content-Type"] = PATCH_CONTENT_TYPES["strategic"]  # as the REST client does for such a body
    payload = None if body is None or method in ("GET", "HEAD") else json.dumps(body, separators=(",", ":"))
    pool_manager = api_client.rest_client.pool_manager
    try:
        if type(pool_manager) is urllib3.PoolManager:
            # Straight to the host's connection pool: the PoolManager's own layer parses the URL again and
            # handles redirects, which the API server does not send. A proxy's manager goes the full way.
            prefix, scheme, host, port = _parsed_host(configuration.host)
            pool = pool_manager.connection_from_host(host, port=port, scheme=scheme)
            response = pool.urlopen(
                method,
                prefix + url[len(configuration.host) :],
                body=payload,
                headers=headers,
                timeout=_timeout(timeout),
                preload_content=False,
                redirect=False,
                assert_same_host=False,
            )
        else:
            response = pool_manager.request(
                method, url, body=payload, headers=headers, timeout=_timeout(timeout), preload_content=False
            )
    except urllib3.exceptions.SSLError as exc:  # as the REST client reports it: an ApiException without a status
        raise ApiException(status=0, reason="\n".join([type(exc).__name__, str(exc)])) from exc
    return rest.RESTResponse(response)


class Resource:
    """One resource type of one cluster, e.g. `Resource(client, SECRETS).get("x", "default")`."""

    def __init__(self, api_client: ApiClient, resource_type: ResourceType, *, timeout: float | None = 30) -> None:
        self.api_client = api_client
        self.type = resource_type
        self.timeout = timeout

    def _request(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, Any]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float | tuple[float, float] | None = None,
    ) -> Any:
        """One call: plain JSON over the client's own urllib3 pool, as its REST client sends it.

        The configuration's auth (bearer token, a token file's refresh hook, client certificates in the pool), TLS,
        proxy and default headers are the client's; what is skipped is the generated layer's walk of every body
        (`sanitize_for_serialization`) and its per-request header and query processing, which cost more than the
        controller's own work per import. Errors are the client's: ApiException (status 0 for a TLS failure) and
        urllib3's connection errors.
        """
        client = self.api_client
        if getattr(client.configuration, "client_go_retries", False):
            return self._request_through_client(method, path, query, body, content_type, timeout)
        return lean_request(
            client, method, path, query=query, body=body, content_type=content_type, timeout=timeout or self.timeout
        )

    def _request_through_client(
        self,
        method: str,
        path: str,
        query: list[tuple[str, Any]] | None,
        body: Any,
        content_type: str,
        timeout: float | tuple[float, float] | None,
    ) -> Any:
        """The generated client's own path, for configurations that ask it for client-go's read retries."""
        headers = {"Accept": "application/json", "Content-Type": content_type}
        request = self.api_client.param_serialize(
            method=method,
            resource_path=path,
            query_params=[(k, v) for k, v in (query or []) if v is not None],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        return self.api_client.call_api(*request, _request_timeout=timeout or self.timeout)

    def _json(self, method: str, path: str, **kwargs: Any) -> JSON:
        response = self._request(method, path, **kwargs)
        response.read()
        if not 200 <= response.status <= 299:
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        return json.loads(response.data) if response.data else {}

    def get(self, name: str, namespace: str | None = None, *, timeout: float | None = None) -> JSON:
        return self._json("GET", self.type.path(namespace, name), timeout=timeout)

    def list(
        self,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        *,
        timeout: float | None = None,
        limit: int | None = None,
        continue_token: str | None = None,
    ) -> JSON:
        """One list call; with `limit`, one page of it (its metadata.continue asks for the next)."""
        query = [("labelSelector", label_selector), ("fieldSelector", field_selector)]
        query += [("limit", limit), ("continue", continue_token)]
        return self._json("GET", self.type.path(namespace), query=query, timeout=timeout)

    def create(self, body: JSON, namespace: str | None = None) -> JSON:
        return self._json("POST", self.type.path(namespace or _namespace_of(body)), body=body)

    def replace(self, body: JSON, namespace: str | None = None) -> JSON:
        path = self.type.path(namespace or _namespace_of(body), body["metadata"]["name"])
        return self._json("PUT", path, body=body)

    def replace_status(self, body: JSON, namespace: str | None = None) -> JSON:
        path = self.type.path(namespace or _namespace_of(body), body["metadata"]["name"], "status")
        return self._json("PUT", path, body=body)

    def patch(self, name: str, body: Any, namespace: str | None = None, patch_type: str = "merge") -> JSON:
        content_type = PATCH_CONTENT_TYPES[patch_type]
        return self._json("PATCH", self.type.path(namespace, name), body=body, content_type=content_type)

    def patch_status(self, name: str, body: Any, namespace: str | None = None, patch_type: str = "merge") -> JSON:
        content_type = PATCH_CONTENT_TYPES[patch_type]
        return self._json("PATCH", self.type.path(namespace, name, "status"), body=body, content_type=content_type)

    def delete(
        self,
        name: str,
        namespace: str | None = None,
        propagation_policy: str | None = None,
        preconditions: dict[str, str | None] | None = None,
    ) -> JSON:
        """Delete; with `preconditions` (uid, resourceVersion) only that very object, else 409 Conflict."""
        body: dict[str, Any] = {}
        if propagation_policy:
            body["propagationPolicy"] = propagation_policy
        if preconditions and any(preconditions.values()):
            body["preconditions"] = {key: value for key, value in preconditions.items() if value}
        return self._json("DELETE", self.type.path(namespace, name), body=body or None)

    def create_subresource(self, name: str, subresource: str, body: JSON, namespace: str | None = None) -> JSON:
        return self._json("POST", self.type.path(namespace, name, subresource), body=body)

    def watch(
        self,
        namespace: str | None = None,
        resource_version: str | None = None,
        timeout_seconds: int | None = None,
        label_selector: str | None = None,
        allow_bookmarks: bool = True,
    ) -> WatchStream:
        """Start a watch: iterate it for events ({"type", "object"}, ERROR events included); close() ends it."""
        query: list[tuple[str, Any]] = [
            ("watch", "true"),
            ("resourceVersion", resource_version),
            ("timeoutSeconds", timeout_seconds),
            ("labelSelector", label_selector),
            ("allowWatchBookmarks", "true" if allow_bookmarks else None),
        ]
        # The read timeout must outlast the server's own watch timeout, or a quiet watch looks like a dead one.
        read_timeout = (timeout_seconds or 300) + 30
        response = self._request("GET", self.type.path(namespace), query=query, timeout=(10, read_timeout))
        if not 200 <= response.status <= 299:
            response.read()
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        return WatchStream(response.response)


class WatchStream:
    """The events of one watch request; close() from any thread ends the iteration promptly."""

    def __init__(self, response: Any) -> None:
        self._response = response
        self._closed = False

    def __iter__(self) -> Iterator[JSON]:
        try:
            for line in iter_resp_lines(self._response):
                if self._closed:
                    return
                if line:
                    yield json.loads(line)
        finally:
            self._response.release_conn()

    def close(self) -> None:
        self._closed = True
        # Shutting the socket down unblocks a reader stuck in recv (as kubernetes.watch.Watch.stop does).
        sock = getattr(getattr(self._response, "connection", None), "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _namespace_of(body: JSON) -> str | None:
    return (body.get("metadata") or {}).get("namespace")


def object_key(obj: JSON) -> tuple[str, str]:
    """(namespace, name) of an object; namespace is "" for cluster-scoped objects."""
    metadata = obj.get("metadata") or {}
    return metadata.get("namespace") or "", metadata.get("name", "")


EventHandler = Callable[[str, JSON, "JSON | None"], None]
LIST_PAGE_SIZE = 500  # client-go's reflector pages its lists by 500 too

_SHORT_TEXT = 200  # keys and values up to this long are interned (names, labels, reasons, messages, timestamps)


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
        compacted = self._value(obj)
        metadata = compacted.get("metadata")
        if isinstance(metadata, dict):
            metadata.pop("managedFields", None)
        return compacted

    def _value(self, value: Any) -> Any:
        if isinstance(value, str):
            return sys.intern(value) if len(value) <= _SHORT_TEXT else self._shared(value)
        if isinstance(value, dict):
            return {sys.intern(k) if isinstance(k, str) else k: self._value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._value(item) for item in value]
        return value

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
                    item = self.transform(item) if self.transform is not None else item
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
        if self.transform is not None and isinstance(obj, dict):
            obj = self.transform(obj)
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
