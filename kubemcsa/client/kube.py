"""A dict-in, dict-out client for the Kubernetes API, and a list-watch cache, on the official client.

The generated methods of the `kubernetes` package validate every argument and turn every response into
model objects, which costs more than the rest of a controller's work. This module keeps the official
ApiClient for what it is good at (configuration, authentication, TLS, connection pooling, retries) and
speaks plain JSON dicts above it, so that the logic that decides things can take and return plain data."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import urllib3
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from kubemcsa import jsonwire
from kubemcsa.client.lean import PATCH_CONTENT_TYPES, LeanStream, json_request, stream_request
from kubemcsa.contract import api

log = logging.getLogger(__name__)


JSON = dict[str, Any]


# Errors that mean "could not talk to the API server at all" (as opposed to an API answer).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (urllib3.exceptions.HTTPError, OSError)


_NETWORK_ERRORS = (ssl.SSLError, ConnectionError, TimeoutError, socket.gaierror, socket.herror)


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
        stream: bool = False,
    ) -> Any:
        """One call: plain JSON as the client's REST client sends it, its answer read whole (on the lean HTTP/1.1
        path, kubemcsa.client.lean) or, with `stream` (a watch), left unread on the client's own urllib3 pool.

        The configuration's auth (bearer token, a token file's refresh hook, client certificates in the pool), TLS,
        proxy and default headers are the client's; what is skipped is the generated layer's walk of every body
        (`sanitize_for_serialization`) and its per-request header and query processing, which cost more than the
        controller's own work per import. Errors are the client's: ApiException (status 0 for a TLS failure) and
        urllib3's connection errors.
        """
        client, timeout = self.api_client, timeout or self.timeout
        if getattr(client.configuration, "client_go_retries", False):
            response = self._request_through_client(method, path, query, body, content_type, timeout)
            if not stream:
                response.read()
            return response
        if stream:
            return stream_request(client, method, path, query=query, timeout=timeout)
        return json_request(client, method, path, query=query, body=body, content_type=content_type, timeout=timeout)

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
        if not 200 <= response.status <= 299:
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        return jsonwire.loads(response.data) if response.data else {}

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
        response = self._request("GET", self.type.path(namespace), query=query, timeout=(10, read_timeout), stream=True)
        if not 200 <= response.status <= 299:
            response.read()
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        return WatchStream(response)


class WatchStream:
    """The events of one watch request; close() from any thread ends the iteration promptly.

    Read on the lean path (kubemcsa.client.lean.LeanStream) or, through a proxy or with client-go's retries, from
    the REST client's urllib3 response."""

    def __init__(self, response: Any) -> None:
        self._response = response
        self._closed = False

    def __iter__(self) -> Iterator[JSON]:
        if isinstance(self._response, LeanStream):
            for line in self._response.lines():
                if self._closed:
                    return
                yield jsonwire.loads(line)
            return
        urllib3_response = self._response.response
        try:
            for line in iter_resp_lines(urllib3_response):
                if self._closed:
                    return
                if line:
                    yield jsonwire.loads(line)
        finally:
            urllib3_response.release_conn()

    def close(self) -> None:
        self._closed = True
        if isinstance(self._response, LeanStream):
            self._response.close()
            return
        # Shutting the socket down unblocks a reader stuck in recv (as kubernetes.watch.Watch.stop does).
        sock = getattr(getattr(self._response.response, "connection", None), "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _namespace_of(body: JSON) -> str | None:
    return (body.get("metadata") or {}).get("namespace")


def object_key(obj: JSON) -> tuple[str, str]:
    """(namespace, name) of an object; namespace is "" for cluster-scoped objects."""
    metadata = obj.get("metadata") or {}
    return metadata.get("namespace") or "", metadata.get("name", "")
