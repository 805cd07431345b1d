"""Behaviour of the in-memory API server as clients see it: errors, auth, tokens, GC, namespaces, watches,
admission webhooks, kubectl and the command line. Everything goes through real HTTPS."""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from kubemcsa_testing import ApiServer
from kubemcsa_testing.tls import make_serving_certs
from kubemcsa_testing.wait import wait_for


def raw(server: ApiServer, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
        token: str | None = "admin") -> tuple[int, Any]:  # fmt: skip
    """A request with urllib (no client-side checks), answering (status, decoded JSON or text)."""
    ctx = ssl.create_default_context(cadata=server.ca_pem.decode())
    request = urllib.request.Request(server.url + path, data=body, method=method, headers=headers or {})
    if token:
        request.add_header("Authorization", f"Bearer {server.admin_token if token == 'admin' else token}")
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=10) as response:
            code, data = response.status, response.read()
    except urllib.error.HTTPError as exc:
        code, data = exc.code, exc.read()
    try:
        return code, json.loads(data)
    except ValueError:
        return code, data.decode()


def status_of(exc: pytest.ExceptionInfo[ApiException]) -> dict[str, Any]:
    return json.loads(exc.value.body)


CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
    "spec": {
        "group": "example.com",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [{
            "name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
            "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                "spec": {"type": "object", "required": ["size"], "properties": {
                    "size": {"type": "integer", "minimum": 1}, "color": {"type": "string"}}}}}},
        }],
    },
}  # fmt: skip


@pytest.fixture
def core(cluster1: ApiServer) -> client.CoreV1Api:
    return client.CoreV1Api(cluster1.admin_client())


# Bad requests ------------------------------------------------------------------------------------

JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "code", "reason"),
    [
        ("GET", "/api/v1/widgets", None, {}, 404, "NotFound"),
        ("GET", "/apis/nope.example.com/v1", None, {}, 404, "NotFound"),
        ("GET", "/api/v1/namespaces/default/secrets/a/b/c", None, {}, 404, "NotFound"),
        ("POST", "/api/v1/namespaces/default/configmaps", b"{not json", JSON, 400, "BadRequest"),
        ("POST", "/api/v1/namespaces/default/configmaps", b"", JSON, 400, "BadRequest"),
        ("POST", "/api/v1/namespaces/default/configmaps", None, JSON, 400, "BadRequest"),
        ("POST", "/api/v1/namespaces/default/configmaps", b"[1]", JSON, 400, "BadRequest"),
        ("POST", "/api/v1/namespaces/default/configmaps", b"{}", {"Content-Type": "text/plain"}, 415,
         "UnsupportedMediaType"),
        ("PATCH", "/api/v1/namespaces/default/configmaps/kube-root-ca.crt", b"{}", JSON, 415, "UnsupportedMediaType"),
        ("POST", "/api/v1/namespaces/default/configmaps", b"{}", JSON, 422, "Invalid"),
        ("POST", "/api/v1/namespaces/default/configmaps", json.dumps({"kind": "Secret", "metadata": {"name": "x"}})
         .encode(), JSON, 400, "BadRequest"),
        ("POST", "/api/v1/namespaces/nope/configmaps", b'{"metadata":{"name":"x"}}', JSON, 404, "NotFound"),
        ("POST", "/api/v1/namespaces/default/configmaps", b'{"metadata":{"name":"Bad_Name"}}', JSON, 422, "Invalid"),
        ("POST", "/api/v1/namespaces/default/secrets", b'{"metadata":{"name":"s"},"data":{"k":"%%%"}}', JSON, 400,
         "BadRequest"),
        ("GET", "/api/v1/namespaces/default/configmaps?limit=1&continue=garbage", None, {}, 400, "BadRequest"),
        ("GET", "/api/v1/namespaces/default/configmaps?fieldSelector=data.x%3Dy", None, {}, 400, "BadRequest"),
        ("GET", "/api/v1/namespaces/default/configmaps?labelSelector=a%20in%20(", None, {}, 400, "BadRequest"),
        ("DELETE", "/api/v1/namespaces/default/configmaps/nope", None, {}, 404, "NotFound"),
        ("PUT", "/api/v1/namespaces/default/configmaps", b"{}", JSON, 405, "MethodNotAllowed"),
    ],
)  # fmt: skip
def test_bad_requests_get_a_status_with_the_right_code(
    cluster1: ApiServer, method: str, path: str, body: bytes | None, headers: dict[str, str], code: int, reason: str
) -> None:
    got, answer = raw(cluster1, method, path, body, headers)
    assert got == code, answer
    assert answer["kind"] == "Status" and answer["reason"] == reason and answer["code"] == code


def test_too_large_body_is_413_and_the_server_keeps_serving(cluster1: ApiServer) -> None:
    body = b'{"metadata":{"name":"x"},"data":{"k":"' + b"x" * (4 * 1024 * 1024) + b'"}}'
    code, answer = raw(cluster1, "POST", "/api/v1/namespaces/default/configmaps", body, JSON)
    assert code == 413 and answer["reason"] == "RequestEntityTooLarge"
    assert raw(cluster1, "GET", "/healthz") == (200, "ok")


@pytest.mark.parametrize(
    "body",
    [
        {"metadata": {"name": "p"}, "spec": {"containers": 3}},
        {"metadata": {"name": "p"}, "spec": {"containers": [{"name": 1, "image": []}], "volumes": {"a": 1}}},
        {"metadata": {"name": "p", "labels": [1]}, "spec": []},
        {"metadata": "x"},
        {"metadata": {"name": "p", "ownerReferences": [1]}},
    ],
)
def test_odd_objects_are_rejected_not_crashing(cluster1: ApiServer, body: dict[str, Any]) -> None:
    for resource in ("pods", "services", "secrets", "configmaps", "serviceaccounts", "events"):
        code, answer = raw(cluster1, "POST", f"/api/v1/namespaces/default/{resource}", json.dumps(body).encode(), JSON)
        assert code in (201, 400, 403, 422), (resource, answer)


# Authentication and authorization -----------------------------------------------------------------


def test_unknown_token_is_401_and_no_token_is_anonymous(cluster1: ApiServer) -> None:
    code, answer = raw(cluster1, "GET", "/api/v1/namespaces", token="not-a-token")
    assert code == 401 and answer["reason"] == "Unauthorized"
    code, answer = raw(cluster1, "GET", "/api/v1/namespaces", token=None)
    assert code == 403 and 'User "system:anonymous" cannot list resource "namespaces"' in answer["message"]
    assert raw(cluster1, "GET", "/healthz", token=None) == (200, "ok")


def test_service_account_token_is_subject_to_rbac_and_dies_with_its_account(cluster1: ApiServer) -> None:
    core = client.CoreV1Api(cluster1.admin_client())
    rbac = client.RbacAuthorizationV1Api(cluster1.admin_client())
    core.create_namespaced_service_account("default", {"metadata": {"name": "reader"}})
    token = cluster1.issue_token("default", "reader")
    as_reader = client.CoreV1Api(cluster1.client_for_token(token))
    with pytest.raises(ApiException) as exc:
        as_reader.list_namespaced_secret("default")
    assert exc.value.status == 403
    assert status_of(exc)["message"] == (
        'secrets is forbidden: User "system:serviceaccount:default:reader" cannot list resource "secrets" in API '
        'group "" in the namespace "default"'
    )
    rbac.create_namespaced_role(
        "default",
        {"metadata": {"name": "r"}, "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]}]},
    )
    rbac.create_namespaced_role_binding(
        "default",
        {"metadata": {"name": "rb"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "r"},
         "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": "default"}]},
    )  # fmt: skip
    as_reader.list_namespaced_secret("default")
    with pytest.raises(ApiException) as exc:
        as_reader.read_namespaced_secret("x", "default")
    assert exc.value.status == 403
    core.delete_namespaced_service_account("reader", "default")
    with pytest.raises(ApiException) as exc:
        as_reader.list_namespaced_secret("default")
    assert exc.value.status == 401
    core.create_namespaced_service_account("default", {"metadata": {"name": "reader"}})  # same name, new uid
    with pytest.raises(ApiException) as exc:
        as_reader.list_namespaced_secret("default")
    assert exc.value.status == 401


def test_cached_rbac_answers_follow_every_rbac_change_at_once(cluster1: ApiServer) -> None:
    """The server caches RBAC decisions; a grant, a revocation, a changed role and a deleted role each count from
    the very next request."""
    core = client.CoreV1Api(cluster1.admin_client())
    rbac = client.RbacAuthorizationV1Api(cluster1.admin_client())
    core.create_namespaced_service_account("default", {"metadata": {"name": "cached"}})
    as_sa = client.CoreV1Api(cluster1.client_for_token(cluster1.issue_token("default", "cached")))

    def may_list() -> bool:
        try:
            as_sa.list_namespaced_config_map("default")
            return True
        except ApiException as exc:
            assert exc.status == 403
            return False

    list_rule = {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}
    rbac.create_namespaced_role("default", {"metadata": {"name": "lister"}, "rules": [list_rule]})
    role_ref = {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "lister"}
    subject = {"kind": "ServiceAccount", "name": "cached", "namespace": "default"}
    binding = {"metadata": {"name": "lister"}, "roleRef": role_ref, "subjects": [subject]}
    rbac.create_namespaced_role_binding("default", binding)
    assert may_list() and may_list()  # the second from the cache
    rbac.delete_namespaced_role_binding("lister", "default")
    assert not may_list()
    rbac.create_namespaced_role_binding("default", binding)
    assert may_list()
    rbac.patch_namespaced_role("lister", "default", {"rules": [{**list_rule, "verbs": ["get"]}]})
    assert not may_list()
    rbac.patch_namespaced_role("lister", "default", {"rules": [list_rule]})
    assert may_list()
    rbac.delete_namespaced_role("lister", "default")
    assert not may_list()
    rbac.create_cluster_role({"metadata": {"name": "cached-lister"}, "rules": [list_rule]})
    rbac.create_cluster_role_binding(
        {"metadata": {"name": "cached-lister"}, "roleRef": {**role_ref, "kind": "ClusterRole", "name": "cached-lister"},
         "subjects": [subject]}
    )  # fmt: skip
    assert may_list()
    rbac.delete_cluster_role("cached-lister")
    with pytest.raises(ApiException) as exc:
        as_sa.list_namespaced_config_map("default")
    assert exc.value.status == 403
    assert 'clusterrole.rbac.authorization.k8s.io "cached-lister" not found' in status_of(exc)["message"]


def test_rbac_cache_is_bounded() -> None:
    from kubemcsa_testing.auth import RbacCache
    from kubemcsa_testing.rbac import RequestAttributes, UserInfo

    cache = RbacCache(max_entries=8)
    state = (1, 2, 3, 4)
    for i in range(100):
        user = UserInfo(f"user-{i}", ("g",))
        attrs = RequestAttributes("get", "", "configmaps", namespace="default", name=f"cm-{i}")
        cache.remember(state, user, "default", (), attrs)
        assert cache.allowed(state, user, attrs)
    assert len(cache._rules) <= 8 and len(cache._allowed) <= 8
    assert not cache.allowed((1, 2, 3, 5), user, attrs)  # another state of the RBAC objects knows nothing yet


def test_rbac_writes_cannot_escalate(cluster1: ApiServer) -> None:
    admin_rbac = client.RbacAuthorizationV1Api(cluster1.admin_client())
    client.CoreV1Api(cluster1.admin_client()).create_namespaced_service_account("default", {"metadata": {"name": "rb"}})
    rules = [{"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"],
              "verbs": ["create"]}, {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]  # fmt: skip
    admin_rbac.create_namespaced_role("default", {"metadata": {"name": "writer"}, "rules": rules})
    admin_rbac.create_namespaced_role_binding("default", {
        "metadata": {"name": "writer"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                                    "name": "writer"},
        "subjects": [{"kind": "ServiceAccount", "name": "rb", "namespace": "default"}]})  # fmt: skip
    as_sa = client.RbacAuthorizationV1Api(cluster1.client_for_token(cluster1.issue_token("default", "rb")))
    held = {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}
    as_sa.create_namespaced_role("default", {"metadata": {"name": "ok"}, "rules": [held]})
    with pytest.raises(ApiException) as exc:
        as_sa.create_namespaced_role(
            "default", {"metadata": {"name": "more"}, "rules": [{**held, "resources": ["secrets"]}]}
        )
    assert exc.value.status == 403 and "attempting to grant RBAC permissions not currently held" in exc.value.body


def test_token_request_honours_the_server_cap(api_server_factory) -> None:
    server = api_server_factory(name="capped", max_token_expiration_seconds=700)
    core = client.CoreV1Api(server.admin_client())
    answer = core.create_namespaced_service_account_token(
        "default", "default", {"spec": {"expirationSeconds": 86400, "audiences": ["a"]}}
    )
    payload = answer.status.token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["exp"] - claims["iat"] == 700 and claims["aud"] == ["a"]
    assert claims["sub"] == "system:serviceaccount:default:default"
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_service_account_token("nope", "default", {"spec": {}})
    assert exc.value.status == 404 and status_of(exc)["message"] == 'serviceaccounts "nope" not found'
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_service_account_token("default", "default", {"spec": {"expirationSeconds": 500}})
    assert exc.value.status == 422


def test_legacy_token_secret_is_filled_in_and_revoked_with_its_secret(cluster1: ApiServer, core) -> None:
    core.create_namespaced_service_account("default", {"metadata": {"name": "legacy"}})
    core.create_namespaced_secret(
        "default",
        {"metadata": {"name": "legacy-token", "annotations": {"kubernetes.io/service-account.name": "legacy"}},
         "type": "kubernetes.io/service-account-token"},
    )  # fmt: skip
    secret = wait_for(lambda: (s := core.read_namespaced_secret("legacy-token", "default")).data and s)
    assert set(secret.data) == {"token", "ca.crt", "namespace"}
    assert base64.b64decode(secret.data["ca.crt"]) == cluster1.ca_pem
    sa = core.read_namespaced_service_account("legacy", "default")
    assert secret.metadata.annotations["kubernetes.io/service-account.uid"] == sa.metadata.uid
    assert not sa.secrets  # not added to sa.secrets (kube >= 1.24)
    token = base64.b64decode(secret.data["token"]).decode()
    review = client.AuthenticationV1Api(cluster1.admin_client()).create_token_review({"spec": {"token": token}})
    assert review.status.authenticated and review.status.user.username == "system:serviceaccount:default:legacy"
    assert raw(cluster1, "GET", "/version", token=token)[0] == 200
    core.delete_namespaced_secret("legacy-token", "default")
    assert raw(cluster1, "GET", "/version", token=token)[0] == 401


def test_oidc_discovery_and_health(cluster1: ApiServer) -> None:
    code, doc = raw(cluster1, "GET", "/.well-known/openid-configuration")
    assert code == 200 and doc["issuer"] and doc["jwks_uri"].endswith("/openid/v1/jwks")
    code, jwks = raw(cluster1, "GET", "/openid/v1/jwks")
    assert code == 200 and jwks["keys"][0]["alg"] == "RS256"
    for path in ("/healthz", "/readyz", "/livez"):
        assert raw(cluster1, "GET", path) == (200, "ok")
    code, version = raw(cluster1, "GET", "/version")
    assert code == 200 and version["major"] == "1"


# Lifecycle: finalizers, garbage collection, namespaces -------------------------------------------


def test_finalizers_hold_deletion_until_removed(core) -> None:
    core.create_namespaced_config_map("default", {"metadata": {"name": "held", "finalizers": ["example.com/x"]}})
    core.delete_namespaced_config_map("held", "default")
    held = core.read_namespaced_config_map("held", "default")
    assert held.metadata.deletion_timestamp is not None
    with pytest.raises(ApiException) as exc:
        core.patch_namespaced_config_map("held", "default", {"metadata": {"finalizers": ["example.com/x", "more"]}})
    assert exc.value.status == 422
    core.patch_namespaced_config_map("held", "default", {"metadata": {"finalizers": None}})
    with pytest.raises(ApiException) as exc:
        core.read_namespaced_config_map("held", "default")
    assert exc.value.status == 404


def _owned(name: str, owner: Any, kind: str = "ConfigMap") -> dict[str, Any]:
    ref = {"apiVersion": "v1", "kind": kind, "name": owner.metadata.name, "uid": owner.metadata.uid}
    return {"metadata": {"name": name, "ownerReferences": [ref]}}


def _gone(read) -> bool:
    try:
        read()
    except ApiException as exc:
        return exc.status == 404
    return False


def test_garbage_collection_background_orphan_and_foreground(core) -> None:
    owner = core.create_namespaced_config_map("default", {"metadata": {"name": "owner"}})
    child = core.create_namespaced_config_map("default", _owned("child", owner))
    core.create_namespaced_secret("default", _owned("grandchild", child))
    core.delete_namespaced_config_map("owner", "default")
    wait_for(lambda: _gone(lambda: core.read_namespaced_secret("grandchild", "default")))
    assert _gone(lambda: core.read_namespaced_config_map("child", "default"))

    owner = core.create_namespaced_config_map("default", {"metadata": {"name": "owner2"}})
    core.create_namespaced_config_map("default", _owned("kept", owner))
    core.delete_namespaced_config_map("owner2", "default", propagation_policy="Orphan")
    wait_for(lambda: _gone(lambda: core.read_namespaced_config_map("owner2", "default")))
    assert not core.read_namespaced_config_map("kept", "default").metadata.owner_references

    owner = core.create_namespaced_config_map("default", {"metadata": {"name": "owner3"}})
    core.create_namespaced_config_map("default", _owned("dep3", owner))
    core.delete_namespaced_config_map("owner3", "default", propagation_policy="Foreground")
    wait_for(lambda: _gone(lambda: core.read_namespaced_config_map("owner3", "default")))
    assert _gone(lambda: core.read_namespaced_config_map("dep3", "default"))


def test_dependent_of_a_missing_owner_is_collected(core) -> None:
    ghost = client.V1ObjectMeta(name="ghost", uid="00000000-0000-0000-0000-000000000000")
    core.create_namespaced_config_map("default", _owned("orphaned", client.V1ConfigMap(metadata=ghost)))
    wait_for(lambda: _gone(lambda: core.read_namespaced_config_map("orphaned", "default")))


def test_namespace_deletion_removes_its_objects(cluster1: ApiServer, core) -> None:
    core.create_namespace({"metadata": {"name": "doomed"}})
    wait_for(lambda: core.list_namespaced_service_account("doomed").items)
    core.create_namespaced_secret("doomed", {"metadata": {"name": "s"}})
    deleted = core.delete_namespace("doomed")
    assert deleted.status.phase == "Terminating" if hasattr(deleted, "status") else True
    wait_for(lambda: _gone(lambda: core.read_namespace("doomed")))
    assert core.list_namespaced_secret("doomed").items == []
    assert core.list_namespaced_service_account("doomed").items == []


def test_creating_in_a_terminating_namespace_is_forbidden(core) -> None:
    core.create_namespace({"metadata": {"name": "stuck"}})
    core.create_namespaced_config_map("stuck", {"metadata": {"name": "held", "finalizers": ["example.com/x"]}})
    core.delete_namespace("stuck")
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_config_map("stuck", {"metadata": {"name": "late"}})
    assert exc.value.status == 403 and "because it is being terminated" in status_of(exc)["message"]
    core.patch_namespaced_config_map("held", "stuck", {"metadata": {"finalizers": None}})
    wait_for(lambda: _gone(lambda: core.read_namespace("stuck")))


def test_default_service_account_is_recreated(core) -> None:
    core.delete_namespaced_service_account("default", "default")
    wait_for(lambda: core.list_namespaced_service_account("default", field_selector="metadata.name=default").items)


# Patches and updates -----------------------------------------------------------------------------


def test_patch_types_and_generation(cluster1: ApiServer) -> None:
    apps = client.AppsV1Api(cluster1.admin_client())
    container = {"name": "c", "image": "i", "env": [{"name": "A", "value": "1"}]}
    deployment = {
        "metadata": {"name": "d", "labels": {"a": "1"}},
        "spec": {"selector": {"matchLabels": {"app": "d"}},
                 "template": {"metadata": {"labels": {"app": "d"}}, "spec": {"containers": [container]}}},
    }  # fmt: skip
    created = apps.create_namespaced_deployment("default", deployment)
    assert created.metadata.generation == 1
    labelled = apps.patch_namespaced_deployment("d", "default", {"metadata": {"labels": {"b": "2"}}})
    assert labelled.metadata.generation == 1 and labelled.metadata.labels == {"a": "1", "b": "2"}
    strategic = apps.patch_namespaced_deployment(
        "d",
        "default",
        {"spec": {"template": {"spec": {"containers": [{"name": "c", "env": [{"name": "B", "value": "2"}]}]}}}},
    )
    container = strategic.spec.template.spec.containers[0]
    assert container.image == "i" and [e.name for e in container.env] == ["A", "B"]
    assert strategic.metadata.generation == 2
    code, answer = raw(
        cluster1, "PATCH", "/apis/apps/v1/namespaces/default/deployments/d",
        json.dumps([{"op": "replace", "path": "/spec/replicas", "value": 3}]).encode(),
        {"Content-Type": "application/json-patch+json"},
    )  # fmt: skip
    assert code == 200 and answer["spec"]["replicas"] == 3 and answer["metadata"]["generation"] == 3
    code, answer = raw(
        cluster1, "PATCH", "/apis/apps/v1/namespaces/default/deployments/d",
        json.dumps({"metadata": {"resourceVersion": "1"}, "spec": {"replicas": 4}}).encode(),
        {"Content-Type": "application/merge-patch+json"},
    )  # fmt: skip
    assert code == 409 and answer["reason"] == "Conflict"
    with pytest.raises(ApiException) as exc:
        apps.patch_namespaced_deployment("nope", "default", {"metadata": {"labels": {"b": "2"}}})
    assert exc.value.status == 404


def test_list_pages_with_limit_and_continue(core) -> None:
    for i in range(5):
        core.create_namespaced_config_map("default", {"metadata": {"name": f"page-{i}", "labels": {"page": "y"}}})
    names, token = [], None
    while True:
        page = core.list_namespaced_config_map("default", label_selector="page", limit=2, _continue=token)
        names += [c.metadata.name for c in page.items]
        token = page.metadata._continue
        if not token:
            break
        assert page.metadata.remaining_item_count > 0
    assert names == [f"page-{i}" for i in range(5)]


def test_immutable_secrets_and_secret_type(core) -> None:
    core.create_namespaced_secret("default", {"metadata": {"name": "frozen"}, "data": {"a": "Yg=="}, "immutable": True})
    for change in ({"data": {"a": "Yw=="}}, {"immutable": False}, {"type": "kubernetes.io/tls"}):
        with pytest.raises(ApiException) as exc:
            core.patch_namespaced_secret("frozen", "default", change)
        assert exc.value.status == 422
    core.patch_namespaced_secret("frozen", "default", {"metadata": {"labels": {"still": "ok"}}})


def test_a_no_op_update_does_not_bump_the_resource_version(core) -> None:
    created = core.create_namespaced_config_map("default", {"metadata": {"name": "same"}, "data": {"a": "b"}})
    again = core.patch_namespaced_config_map("same", "default", {"data": {"a": "b"}})
    assert again.metadata.resource_version == created.metadata.resource_version


def test_custom_resource_update_needs_a_resource_version(cluster1: ApiServer) -> None:
    client.ApiextensionsV1Api(cluster1.admin_client()).create_custom_resource_definition(CRD)
    custom = client.CustomObjectsApi(cluster1.admin_client())
    body = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 1}}
    custom.create_namespaced_custom_object("example.com", "v1", "default", "widgets", body)
    with pytest.raises(ApiException) as exc:
        custom.replace_namespaced_custom_object("example.com", "v1", "default", "widgets", "w", body)
    assert exc.value.status == 422 and "must be specified for an update" in status_of(exc)["message"]


# Watches -----------------------------------------------------------------------------------------


def _watch_lines(server: ApiServer, path: str, until: int, timeout: float = 10) -> list[dict[str, Any]]:
    ctx = ssl.create_default_context(cadata=server.ca_pem.decode())
    request = urllib.request.Request(server.url + path, headers={"Authorization": f"Bearer {server.admin_token}"})
    lines = []
    with urllib.request.urlopen(request, context=ctx, timeout=timeout) as response:
        for line in response:
            lines.append(json.loads(line))
            if len(lines) >= until:
                break
    return lines


def test_watch_from_a_compacted_resource_version_is_410_gone(cluster1: ApiServer, core) -> None:
    cluster1.cluster.store._compacted = cluster1.cluster.store.resource_version  # as if the history had rolled over
    events = _watch_lines(cluster1, "/api/v1/namespaces/default/configmaps?watch=true&resourceVersion=1", 1)
    assert events[0]["type"] == "ERROR"
    assert events[0]["object"]["code"] == 410 and events[0]["object"]["reason"] == "Expired"


def test_watch_bookmarks_and_timeout(cluster1: ApiServer, core) -> None:
    rv = core.list_namespaced_config_map("default").metadata.resource_version
    path = (
        f"/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=1"
    )
    events = _watch_lines(cluster1, path, 100)
    assert events and all(e["type"] == "BOOKMARK" for e in events)
    assert events[-1]["object"]["metadata"]["resourceVersion"] == rv


def test_watch_with_selectors_and_many_watchers(cluster1: ApiServer, core) -> None:
    rv = core.list_namespaced_config_map("default").metadata.resource_version
    results: list[list[tuple[str, str]]] = []

    def run() -> None:
        seen: list[tuple[str, str]] = []
        for event in watch.Watch().stream(
            core.list_namespaced_config_map, "default", resource_version=rv, label_selector="app=x",
            timeout_seconds=5,
        ):  # fmt: skip
            seen.append((event["type"], event["object"].metadata.name))
            if event["type"] == "DELETED":
                break
        results.append(seen)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for thread in threads:
        thread.start()
    core.create_namespaced_config_map("default", {"metadata": {"name": "other"}})
    core.create_namespaced_config_map("default", {"metadata": {"name": "x", "labels": {"app": "x"}}})
    core.patch_namespaced_config_map("x", "default", {"metadata": {"labels": {"app": "y"}}})
    for thread in threads:
        thread.join(timeout=10)
    assert results == [[("ADDED", "x"), ("DELETED", "x")]] * 8


def test_watches_end_promptly_when_the_server_stops(api_server_factory) -> None:
    server = api_server_factory(name="stopping")
    core = client.CoreV1Api(server.admin_client())
    done = threading.Event()

    def run() -> None:
        try:
            for _ in watch.Watch().stream(core.list_namespaced_config_map, "default", timeout_seconds=60):
                pass
        except Exception:  # the connection closes: either way the watch ends
            pass
        done.set()

    threading.Thread(target=run, daemon=True).start()
    wait_for(lambda: any(r.verb == "watch" for r in server.requests))
    server.stop()
    assert done.wait(10)


# Requests log ------------------------------------------------------------------------------------


def test_requests_are_recorded(cluster1: ApiServer, core) -> None:
    cluster1.reset_requests()
    core.create_namespaced_config_map("default", {"metadata": {"name": "r"}})
    with pytest.raises(ApiException):
        core.read_namespaced_config_map("missing", "default")
    records = [(r.user, r.verb, r.resource, r.namespace, r.name, r.code) for r in cluster1.requests]
    assert records == [("admin", "create", "configmaps", "default", "", 201),
                       ("admin", "get", "configmaps", "default", "missing", 404)]  # fmt: skip
    cluster1.reset_requests()
    assert cluster1.requests == []


# Mutating admission ------------------------------------------------------------------------------


@pytest.fixture
def webhook_service(cluster1: ApiServer) -> Iterator[bytes]:
    """A webhook at service hook.default.svc:443 adding a label to pods; yields its CA."""
    certs = make_serving_certs("hook", dns_names=("hook.default.svc",), ips=())
    reviews: list[dict[str, Any]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            request = review["request"]
            reviews.append(request)
            patch = [{"op": "add", "path": "/metadata/labels", "value": {"mutated": "yes"}}]
            encoded = base64.b64encode(json.dumps(patch).encode()).decode()
            response = {"uid": request["uid"], "allowed": True, "patchType": "JSONPatch", "patch": encoded,
                        "warnings": ['look "out"']}  # fmt: skip
            if request["object"]["metadata"].get("name") == "denied":
                response = {"uid": request["uid"], "allowed": False, "status": {"code": 403, "message": "no way"}}
            data = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data.encode())

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    httpd.socket = certs.server_context().wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    cluster1.register_service("default", "hook", 443, f"https://127.0.0.1:{httpd.server_address[1]}")
    cluster1.webhook_reviews = reviews  # type: ignore[attr-defined]
    yield certs.ca_pem
    httpd.shutdown()
    httpd.server_close()


def test_mutating_webhook_is_called_on_pod_creation(cluster1: ApiServer, core, webhook_service: bytes) -> None:
    admission = client.AdmissionregistrationV1Api(cluster1.admin_client())
    admission.create_mutating_webhook_configuration(
        {
            "metadata": {"name": "hook"},
            "webhooks": [{
                "name": "hook.example.com", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                "failurePolicy": "Fail",
                "clientConfig": {"service": {"namespace": "default", "name": "hook", "port": 443},
                                 "caBundle": base64.b64encode(webhook_service).decode()},
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            }],
        }
    )  # fmt: skip
    pod = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
    created = core.create_namespaced_pod("default", pod)
    assert created.metadata.labels == {"mutated": "yes"}
    request = urllib.request.Request(
        cluster1.url + "/api/v1/namespaces/default/pods", method="POST",
        data=json.dumps({**pod, "metadata": {"name": "warned"}}).encode(),
        headers={**JSON, "Authorization": f"Bearer {cluster1.admin_token}"},
    )  # fmt: skip
    ctx = ssl.create_default_context(cadata=cluster1.ca_pem.decode())
    with urllib.request.urlopen(request, context=ctx, timeout=10) as response:
        assert response.status == 201 and response.headers["Warning"] == '299 - "look \\"out\\""'

    assert created.spec.volumes[0].name.startswith("kube-api-access-")  # the ServiceAccount plugin ran first
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_pod("default", {**pod, "metadata": {"name": "denied"}})
    assert exc.value.status == 403 and "no way" in status_of(exc)["message"]
    calls = len(cluster1.webhook_reviews)
    core.create_namespaced_config_map("default", {"metadata": {"name": "not-a-pod"}})  # rules do not match
    assert len(cluster1.webhook_reviews) == calls
    generated = core.create_namespaced_pod("default", {**pod, "metadata": {"generateName": "rs-"}})
    request = cluster1.webhook_reviews[-1]
    assert not request.get("name")  # names are generated after admission, as in kube
    assert "name" not in request["object"]["metadata"] and generated.metadata.name.startswith("rs-")


def test_pod_needs_its_service_account(core) -> None:
    pod = {
        "metadata": {"name": "p"},
        "spec": {"serviceAccountName": "nope", "containers": [{"name": "c", "image": "i"}]},
    }
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_pod("default", pod)
    assert exc.value.status == 403 and 'serviceaccount "nope" not found' in status_of(exc)["message"]


# kubectl and the command line --------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_works_against_the_server(cluster1: ApiServer, tmp_path) -> None:
    kubeconfig = cluster1.write_kubeconfig(tmp_path / "kubeconfig")
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(tmp_path)}

    def kubectl(*args: str, stdin: str | None = None) -> str:
        done = subprocess.run(["kubectl", *args], input=stdin, capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    manifest = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: k\n  namespace: default\ndata:\n  a: b\n"
    kubectl("create", "-f", "-", stdin=manifest)
    kubectl("apply", "-f", "-", stdin=manifest.replace("a: b", "a: c"))
    kubectl("label", "configmap", "k", "x=y")
    kubectl("annotate", "configmap", "k", "z=w")
    got = json.loads(kubectl("get", "configmap", "k", "-o", "json"))
    assert got["data"] == {"a": "c"} and got["metadata"]["labels"] == {"x": "y"}
    assert got["metadata"]["annotations"]["z"] == "w"
    assert "k" in kubectl("get", "cm")
    kubectl("apply", "-f", "-", stdin=json.dumps(CRD))
    kubectl("wait", "--for=condition=established", "crd/widgets.example.com", "--timeout=20s")
    kubectl("create", "-f", "-", stdin=json.dumps(
        {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w", "namespace": "default"},
         "spec": {"size": 1}}))  # fmt: skip
    assert "w" in kubectl("get", "widgets")
    typo = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "typo", "namespace": "default"},
            "spec": {"size": 1, "colour": "red"}}  # fmt: skip
    done = subprocess.run(
        ["kubectl", "create", "-f", "-"], capture_output=True, text=True, env=env, timeout=60, input=json.dumps(typo)
    )
    assert done.returncode != 0 and 'unknown field "spec.colour"' in done.stderr
    waiter = subprocess.Popen(
        ["kubectl", "wait", "--for=delete", "configmap/k", "--timeout=30s"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for(lambda: any(r.verb == "watch" and r.resource == "configmaps" for r in cluster1.requests), timeout=30)
    kubectl("delete", "configmap", "k")
    _, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 0, err


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_imperative_commands_send_protobuf_we_understand(cluster1: ApiServer, tmp_path) -> None:
    env = {**os.environ, "KUBECONFIG": str(cluster1.write_kubeconfig(tmp_path / "kc")), "HOME": str(tmp_path)}

    def kubectl(*args: str) -> str:
        done = subprocess.run(["kubectl", *args], capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    kubectl("create", "namespace", "imp")
    kubectl("create", "serviceaccount", "bot", "-n", "imp")
    kubectl("create", "secret", "generic", "sec", "-n", "imp", "--from-literal=a=b")
    kubectl("create", "role", "r", "-n", "imp", "--verb=get", "--resource=secrets", "--resource-name=sec")
    kubectl("create", "rolebinding", "rb", "-n", "imp", "--role=r", "--serviceaccount=imp:bot")
    core = client.CoreV1Api(cluster1.admin_client())
    secret = core.read_namespaced_secret("sec", "imp")
    assert secret.data == {"a": "Yg=="} and secret.type == "Opaque" and secret.metadata.generate_name is None
    token = kubectl("create", "token", "bot", "-n", "imp", "--duration=20m", "--audience=x")
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["aud"] == ["x"] and claims["exp"] - claims["iat"] == 1200
    as_bot = ("-n", "imp", "--as=system:serviceaccount:imp:bot")
    assert kubectl("auth", "can-i", "get", "secrets/sec", *as_bot) == "yes"
    done = subprocess.run(["kubectl", "auth", "can-i", "get", "secrets/other", *as_bot], capture_output=True, text=True,
                          env=env, timeout=60)  # fmt: skip
    assert done.stdout.strip() == "no"
    assert kubectl("get", "secret", "sec", "-o", "name", *as_bot) == "secret/sec"  # impersonation is enforced


def test_command_line_serves_until_terminated(tmp_path) -> None:
    kubeconfig = tmp_path / "kc"
    process = subprocess.Popen(
        [sys.executable, "-m", "kubemcsa_testing", "--port", "0", "--kubeconfig-out", str(kubeconfig)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert "serving" in process.stdout.readline()
        from kubernetes import config

        api = config.new_client_from_config(str(kubeconfig))
        assert client.CoreV1Api(api).read_namespace("default").metadata.name == "default"
        assert oct(os.stat(kubeconfig).st_mode & 0o777) == "0o600"
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


def test_tls_certificate_names_loopback(cluster1: ApiServer) -> None:
    with tempfile.NamedTemporaryFile("wb", suffix=".pem") as ca:
        ca.write(cluster1.ca_pem)
        ca.flush()
        ctx = ssl.create_default_context(cafile=ca.name)
        for host in ("127.0.0.1", "localhost"):
            url = cluster1.url.replace("127.0.0.1", host) + "/healthz"
            with urllib.request.urlopen(url, context=ctx, timeout=5) as response:
                assert response.read() == b"ok"


# Fuzzing: no input makes the server answer 500 or drop the connection ---------------------------

_PATHS = st.sampled_from(
    [
        "/api/v1/namespaces/default/configmaps",
        "/api/v1/namespaces/default/configmaps/fuzz",
        "/api/v1/namespaces/default/secrets/fuzz",
        "/api/v1/namespaces/default/pods/fuzz",
        "/api/v1/namespaces/default/pods/fuzz/status",
        "/api/v1/namespaces/fuzz",
        "/api/v1/namespaces",
        "/api/v1/namespaces/default/serviceaccounts/default/token",
        "/apis/apps/v1/namespaces/default/deployments/fuzz",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/fuzz.example.com",
        "/apis/rbac.authorization.k8s.io/v1/namespaces/default/roles/fuzz",
        "/apis/authentication.k8s.io/v1/tokenreviews",
        "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/fuzz",
        "/api/v1/services",
    ]
)
_QUERIES = st.sampled_from(
    [
        "",
        "?watch=1&timeoutSeconds=0",
        "?labelSelector=a%3Db",
        "?fieldSelector=metadata.name%3Dx",
        "?limit=1",
        "?dryRun=All",
        "?propagationPolicy=Foreground",
        "?resourceVersion=zz",
    ]
)
_BODIES = st.one_of(
    st.none(),
    st.binary(max_size=40),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=6),
        lambda c: (
            st.lists(c, max_size=3)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "metadata",
                        "name",
                        "spec",
                        "data",
                        "kind",
                        "apiVersion",
                        "containers",
                        "labels",
                        "finalizers",
                        "ownerReferences",
                        "status",
                        "token",
                        "rules",
                        "webhooks",
                        "names",
                        "x",
                    ]
                ),
                c,
                max_size=4,
            )
        ),
        max_leaves=10,
    ).map(lambda v: json.dumps(v).encode()),
)
_TYPES = st.sampled_from(
    [
        "application/json",
        "application/merge-patch+json",
        "application/json-patch+json",
        "application/strategic-merge-patch+json",
        "application/yaml",
        "text/plain",
        "application/vnd.kubernetes.protobuf",
    ]
)


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ApiServer]:
    with ApiServer(name="fuzz") as server:
        yield server


@given(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE"]), _PATHS, _QUERIES, _BODIES, _TYPES)
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_no_request_makes_the_server_fail(fuzz_server: ApiServer, method, path, query, body, content_type) -> None:
    code, answer = raw(fuzz_server, method, path + query, body, {"Content-Type": content_type})
    assert code < 500, answer
    if code >= 400:
        assert answer["kind"] == "Status" and answer["code"] == code


_VALID = {
    "/api/v1/namespaces/default/pods": {
        "metadata": {"name": "p"},
        "spec": {
            "containers": [
                {
                    "name": "c",
                    "image": "i",
                    "volumeMounts": [{"name": "v", "mountPath": "/v"}],
                    "ports": [{"containerPort": 1}],
                }
            ],
            "volumes": [{"name": "v", "emptyDir": {}}],
        },
    },
    "/api/v1/namespaces/default/services": {"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}},
    "/api/v1/namespaces/default/secrets": {
        "metadata": {"name": "s", "labels": {"a": "b"}},
        "data": {"k": "dg=="},
        "stringData": {"x": "y"},
        "type": "kubernetes.io/service-account-token",
    },
    "/api/v1/namespaces/default/serviceaccounts/default/token": {
        "spec": {"audiences": ["a"], "expirationSeconds": 700}
    },
    "/apis/authentication.k8s.io/v1/tokenreviews": {"spec": {"token": "abc", "audiences": ["a"]}},
    "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews": {"spec": {"resourceAttributes": {"verb": "get"}}},
    "/apis/apiextensions.k8s.io/v1/customresourcedefinitions": {
        "metadata": {"name": "things.example.com"},
        "spec": {
            "group": "example.com",
            "scope": "Namespaced",
            "names": {"plural": "things", "kind": "Thing"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {"spec": {"type": "object", "properties": {"n": {"type": "integer"}}}},
                        }
                    },
                }
            ],
        },
    },
    "/apis/rbac.authorization.k8s.io/v1/namespaces/default/rolebindings": {
        "metadata": {"name": "rb"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": "default"}],
    },
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations": {
        "metadata": {"name": "m"},
        "webhooks": [
            {
                "name": "m.example.com",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Ignore",
                "clientConfig": {"url": "https://127.0.0.1:1/x"},
                "namespaceSelector": {"matchLabels": {"a": "b"}},
                "rules": [
                    {"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["configmaps"]}
                ],
            }
        ],
    },
    "/api/v1/namespaces/default/configmaps": {
        "metadata": {
            "name": "c",
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "o", "uid": "u"}],
            "finalizers": ["a/b"],
        },
        "data": {"a": "b"},
    },
}


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += _paths(item, (*prefix, i))
    return out


def _replace(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replace(copy[path[0]], path[1:], new)
    return copy


_ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda c: st.lists(c, max_size=2) | st.dictionaries(st.text(max_size=4), c, max_size=2),
    max_leaves=6,
)


@given(st.sampled_from(sorted(_VALID)), st.data(), _ANY_JSON, st.sampled_from(["POST", "PUT", "PATCH"]))
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_no_mutated_object_makes_the_server_fail(
    fuzz_server: ApiServer, path: str, data, new: Any, method: str
) -> None:
    valid = _VALID[path]
    where = data.draw(st.sampled_from(_paths(valid)[1:]))
    body = json.dumps(_replace(valid, where, new)).encode()
    name = valid.get("metadata", {}).get("name", "x")
    target = path if method == "POST" or path.endswith(("token", "reviews")) else f"{path}/{name}"
    content_type = "application/merge-patch+json" if method == "PATCH" else "application/json"
    code, answer = raw(fuzz_server, method, target, body, {"Content-Type": content_type})
    assert code < 500, answer
