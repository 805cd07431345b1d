"""Conformance: the same assertions against the in-memory API server or a real cluster.

Each test runs against a fresh in-memory server (kubemcsa_testing) and, with KUBEBUILDER_ASSETS naming an envtest
asset folder, against the session's real control plane too (the `tier` parameter; kubemcsa_testing.pytest_plugin),
reset to its first state before each test. The assertions come from the Kubernetes API documentation and from
what a real kube-apiserver was seen to do (shared/reference/kube-apiserver-facts.md), not from the
in-memory implementation: where the tiers disagreed, the in-memory server was changed and the behaviour is pinned
down here. Mutating admission through the manifests' webhook is in tests/test_webhook_e2e.py (both tiers).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from kubemcsa_testing.pytest_plugin import REAL, fresh_real_clusters
from kubemcsa_testing.wait import wait_for as shared_wait_for

pytestmark = pytest.mark.real_tier


class Kube:
    """A client on the cluster under test, with raw access for what the typed client cannot send."""

    def __init__(self, api: client.ApiClient, in_memory: Any = None) -> None:
        self.api = api
        self.in_memory = in_memory
        self.kubeconfig = ""
        self.last_content_type = ""
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.rbac = client.RbacAuthorizationV1Api(api)
        self.ext = client.ApiextensionsV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.authn = client.AuthenticationV1Api(api)

    def raw(
        self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json",
        token: str | None = None, accept: str = "application/json",
    ) -> tuple[int, Any]:  # fmt: skip
        """(status, decoded JSON or text) for any request, through the client's own TLS and credentials; the
        answer's Content-Type is kept in `last_content_type`."""
        headers = {"Accept": accept}
        if body is not None:
            headers["Content-Type"] = content_type
        _, url, headers, _, _ = self.api.param_serialize(
            method, path, header_params=headers, auth_settings=["BearerToken"]
        )
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
            headers.pop("Authorization", None)
        response = self.api.rest_client.pool_manager.request(method, url, body=body, headers=headers, retries=False)
        data = response.data
        self.last_content_type = response.headers.get("Content-Type", "")
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, data.decode(errors="replace")

    def as_token(self, token: str) -> client.ApiClient:
        """A client for the same server that authenticates with `token` only."""
        configuration = client.Configuration()
        base = self.api.configuration
        configuration.host = base.host
        configuration.ssl_ca_cert = base.ssl_ca_cert
        configuration.ca_cert_data = getattr(base, "ca_cert_data", None)
        configuration.verify_ssl = base.verify_ssl
        configuration.api_key = {"BearerToken": f"Bearer {token}"}
        return client.ApiClient(configuration)


@pytest.fixture
def kube(tier: str, request: pytest.FixtureRequest, tmp_path: Any) -> Kube:
    if tier == REAL:
        real = fresh_real_clusters(request)[0]
        kube = Kube(real.admin_client())
        kube.kubeconfig = str(real.write_kubeconfig(tmp_path / "kubeconfig"))
        return kube
    server = request.getfixturevalue("api_server_factory")(name="conformance", history_size=50)
    kube = Kube(server.admin_client(), server)
    kube.kubeconfig = str(server.write_kubeconfig(tmp_path / "kubeconfig"))
    return kube


def wait_for(condition: Callable[[], Any], timeout: float = 60.0) -> Any:
    """A real cluster may take longer than the in-memory one (namespace deletion, token controller)."""
    return shared_wait_for(condition, timeout=timeout)


def gone(read: Callable[[], Any]) -> bool:
    try:
        read()
    except ApiException as exc:
        if exc.status == 404:
            return True
        raise
    return False


def status_of(exc: pytest.ExceptionInfo[ApiException]) -> dict[str, Any]:
    return json.loads(exc.value.body)


def jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


@pytest.fixture
def ns(kube: Kube) -> Iterator[str]:
    name = f"conf-{secrets.token_hex(4)}"
    kube.core.create_namespace({"metadata": {"name": name}})
    wait_for(lambda: kube.core.list_namespaced_service_account(name, field_selector="metadata.name=default").items)
    yield name
    try:
        kube.core.delete_namespace(name)
    except ApiException:
        pass


def crd_body(suffix: str) -> dict[str, Any]:
    plural = f"widgets{suffix}"
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.conformance.kubemcsa.io"},
        "spec": {
            "group": "conformance.kubemcsa.io",
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": f"widget{suffix}", "kind": f"Widget{suffix}"},
            "versions": [{
                "name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "spec": {"type": "object", "required": ["size"], "properties": {
                            "size": {"type": "integer", "minimum": 1},
                            "color": {"type": "string", "enum": ["red", "blue"]}}},
                        "status": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
                    },
                }},
            }],
        },
    }  # fmt: skip


@pytest.fixture
def crd(kube: Kube) -> Iterator[tuple[str, str]]:
    """A fresh CRD, established; yields (plural, kind)."""
    suffix = secrets.token_hex(3)
    body = crd_body(suffix)
    kube.ext.create_custom_resource_definition(body)
    name = body["metadata"]["name"]

    def established() -> bool:
        conditions = kube.ext.read_custom_resource_definition(name).status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conditions)

    wait_for(established)
    plural = body["spec"]["names"]["plural"]
    wait_for(lambda: _served(kube, plural))
    yield plural, body["spec"]["names"]["kind"]
    try:
        kube.ext.delete_custom_resource_definition(name)
    except ApiException:
        pass


def _served(kube: Kube, plural: str) -> bool:
    code, doc = kube.raw("GET", "/apis/conformance.kubemcsa.io/v1")
    return code == 200 and any(r["name"] == plural for r in doc["resources"])


GROUP = "conformance.kubemcsa.io"


# 1. HTTPS, discovery and health ------------------------------------------------------------------


def test_discovery_documents(kube: Kube) -> None:
    code, versions = kube.raw("GET", "/api")
    assert code == 200 and versions["kind"] == "APIVersions" and "v1" in versions["versions"]
    code, groups = kube.raw("GET", "/apis")
    names = {g["name"] for g in groups["groups"]}
    assert {"apps", "rbac.authorization.k8s.io", "apiextensions.k8s.io", "coordination.k8s.io",
            "admissionregistration.k8s.io", "events.k8s.io", "authentication.k8s.io"} <= names  # fmt: skip
    code, core = kube.raw("GET", "/api/v1")
    resources = {r["name"]: r for r in core["resources"]}
    assert resources["serviceaccounts/token"]["kind"] == "TokenRequest"
    assert resources["serviceaccounts/token"]["group"] == "authentication.k8s.io"
    assert "create" in resources["serviceaccounts/token"]["verbs"]
    assert resources["pods/status"]["kind"] == "Pod"
    assert resources["secrets"]["namespaced"] is True and resources["namespaces"]["namespaced"] is False
    assert "sa" in resources["serviceaccounts"]["shortNames"]
    assert {"create", "delete", "get", "list", "patch", "update", "watch"} <= set(resources["configmaps"]["verbs"])
    code, rbac_doc = kube.raw("GET", "/apis/rbac.authorization.k8s.io/v1")
    assert code == 200 and {"roles", "clusterroles", "rolebindings", "clusterrolebindings"} <= {
        r["name"] for r in rbac_doc["resources"]
    }


def test_version_and_health(kube: Kube) -> None:
    code, version = kube.raw("GET", "/version")
    assert code == 200 and version["major"] and version["gitVersion"].startswith("v1.")
    for path in ("/healthz", "/readyz", "/livez"):
        assert kube.raw("GET", path) == (200, "ok")


def test_custom_resources_appear_in_discovery(kube: Kube, crd: tuple[str, str]) -> None:
    plural, kind = crd
    code, doc = kube.raw("GET", f"/apis/{GROUP}/v1")
    assert code == 200
    resources = {r["name"]: r for r in doc["resources"]}
    assert resources[plural]["kind"] == kind and resources[plural]["namespaced"] is True
    assert f"{plural}/status" in resources


# 2-3. Objects and their metadata ----------------------------------------------------------------


def test_create_assigns_uid_timestamp_and_string_resource_version(kube: Kube, ns: str) -> None:
    created = kube.core.create_namespaced_config_map(ns, {"metadata": {"name": "a"}, "data": {"k": "v"}})
    code, raw = kube.raw("GET", f"/api/v1/namespaces/{ns}/configmaps/a")
    assert code == 200 and isinstance(raw["metadata"]["resourceVersion"], str)
    assert raw["metadata"]["uid"] == created.metadata.uid and raw["metadata"]["creationTimestamp"].endswith("Z")
    assert raw["kind"] == "ConfigMap" and raw["apiVersion"] == "v1"
    listed = kube.core.list_namespaced_config_map(ns)
    assert isinstance(listed.metadata.resource_version, str)
    assert int(listed.metadata.resource_version) >= int(created.metadata.resource_version)


def test_every_kind_the_project_uses_is_stored(kube: Kube, ns: str) -> None:
    kube.core.create_namespaced_service_account(ns, {"metadata": {"name": "sa"}})
    kube.core.create_namespaced_secret(ns, {"metadata": {"name": "s"}, "data": {"k": "dg=="}})
    kube.core.create_namespaced_service(ns, {"metadata": {"name": "svc"}, "spec": {"ports": [{"port": 443}]}})
    kube.core.create_namespaced_pod(
        ns, {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}
    )
    kube.core.create_namespaced_event(
        ns, {"metadata": {"name": "e"}, "involvedObject": {"kind": "Pod", "name": "p", "namespace": ns},
             "reason": "Test", "message": "hello", "type": "Normal"},
    )  # fmt: skip
    code, event = kube.raw("GET", f"/apis/events.k8s.io/v1/namespaces/{ns}/events/e")  # the same Event, converted
    assert code == 200 and event["note"] == "hello" and event["regarding"]["name"] == "p"
    kube.apps.create_namespaced_deployment(
        ns, {"metadata": {"name": "d"}, "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {
            "metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}},
    )  # fmt: skip
    client.CoordinationV1Api(kube.api).create_namespaced_lease(ns, {"metadata": {"name": "l"}, "spec": {}})
    kube.rbac.create_namespaced_role(ns, {"metadata": {"name": "r"}, "rules": []})
    kube.rbac.create_namespaced_role_binding(
        ns, {"metadata": {"name": "rb"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "r"},
             "subjects": [{"kind": "ServiceAccount", "name": "sa", "namespace": ns}]},
    )  # fmt: skip
    admission = client.AdmissionregistrationV1Api(kube.api)
    webhook_name = f"conformance-{ns}"
    admission.create_mutating_webhook_configuration({
        "metadata": {"name": webhook_name},
        "webhooks": [{"name": "nothing.conformance.kubemcsa.io", "admissionReviewVersions": ["v1"],
                      "sideEffects": "None", "failurePolicy": "Ignore",
                      "clientConfig": {"url": "https://127.0.0.1:1/never"},
                      "rules": [{"operations": ["CREATE"], "apiGroups": ["conformance.kubemcsa.io"],
                                 "apiVersions": ["v1"], "resources": ["nothings"]}]}],
    })  # fmt: skip
    try:
        stored = admission.read_mutating_webhook_configuration(webhook_name)
        assert stored.webhooks[0].client_config.url == "https://127.0.0.1:1/never"
    finally:
        admission.delete_mutating_webhook_configuration(webhook_name)
    assert kube.core.read_namespaced_pod("p", ns).status.phase == "Pending"
    assert kube.core.read_namespaced_service("svc", ns).spec.cluster_ip


def test_generate_name(kube: Kube, ns: str) -> None:
    created = kube.core.create_namespaced_config_map(ns, {"metadata": {"generateName": "gen-"}})
    assert created.metadata.name.startswith("gen-") and len(created.metadata.name) > len("gen-")


def test_already_exists_conflict_and_not_found(kube: Kube, ns: str) -> None:
    kube.core.create_namespaced_service_account(ns, {"metadata": {"name": "demo"}})
    with pytest.raises(ApiException) as exc:
        kube.core.create_namespaced_service_account(ns, {"metadata": {"name": "demo"}})
    status = status_of(exc)
    assert exc.value.status == 409 and status["reason"] == "AlreadyExists"
    assert status["message"] == 'serviceaccounts "demo" already exists'
    assert status["details"] == {"name": "demo", "kind": "serviceaccounts"}
    assert status["kind"] == "Status" and status["status"] == "Failure" and status["code"] == 409
    sa = kube.core.read_namespaced_service_account("demo", ns)
    kube.core.patch_namespaced_service_account("demo", ns, {"metadata": {"labels": {"a": "b"}}})
    with pytest.raises(ApiException) as exc:
        kube.core.replace_namespaced_service_account("demo", ns, sa)
    assert exc.value.status == 409 and status_of(exc)["reason"] == "Conflict"
    with pytest.raises(ApiException) as exc:
        kube.core.read_namespaced_service_account("nope", ns)
    assert exc.value.status == 404 and status_of(exc)["reason"] == "NotFound"
    assert status_of(exc)["details"] == {"name": "nope", "kind": "serviceaccounts"}


def test_invalid_objects_are_422(kube: Kube, ns: str) -> None:
    for body in (
        {"metadata": {}},
        {"metadata": {"name": "Not_A_Name"}},
        {"metadata": {"name": "l", "labels": {"a": "!"}}},
    ):
        with pytest.raises(ApiException) as exc:
            kube.core.create_namespaced_config_map(ns, body)
        assert exc.value.status == 422 and status_of(exc)["reason"] == "Invalid"
    code, status = kube.raw(
        "POST",
        f"/api/v1/namespaces/{ns}/secrets",
        json.dumps({"metadata": {"name": "s"}, "data": {"k": "%%"}}).encode(),
    )
    assert code == 400 and status["reason"] == "BadRequest"  # base64 is decoded before validation
    assert status["message"].startswith('Secret in version "v1" cannot be handled as a Secret: illegal base64 data')


def test_bad_requests(kube: Kube, ns: str) -> None:
    code, status = kube.raw("GET", "/api/v1/nosuchresources")
    assert code == 404 and status["reason"] == "NotFound"
    code, status = kube.raw("POST", f"/api/v1/namespaces/{ns}/configmaps", b"{nope")
    assert code == 400 and status["reason"] == "BadRequest"
    code, status = kube.raw(
        "PATCH", f"/api/v1/namespaces/{ns}/serviceaccounts/default", b"{}", content_type="text/plain"
    )
    assert code == 415 and status["reason"] == "UnsupportedMediaType"
    code, status = kube.raw("GET", f"/api/v1/namespaces/{ns}/configmaps?fieldSelector=data.x%3Dy")
    assert code == 400 and status["kind"] == "Status"


def test_selectors(kube: Kube, ns: str) -> None:
    for name, labels in (("a", {"tier": "web", "env": "prod"}), ("b", {"tier": "db"}), ("c", {})):
        kube.core.create_namespaced_config_map(ns, {"metadata": {"name": name, "labels": labels}})

    def names(**kw: str) -> list[str]:
        items = kube.core.list_namespaced_config_map(ns, **kw).items
        return sorted(i.metadata.name for i in items if i.metadata.name in "abc")

    assert names(label_selector="tier=web") == ["a"]
    assert names(label_selector="tier==web") == ["a"]
    assert names(label_selector="tier!=web") == ["b", "c"]
    assert names(label_selector="tier in (web,db)") == ["a", "b"]
    assert names(label_selector="tier notin (web)") == ["b", "c"]
    assert names(label_selector="env") == ["a"]
    assert names(label_selector="!env") == ["b", "c"]
    assert names(label_selector="tier,!env") == ["b"]
    assert names(field_selector="metadata.name=b") == ["b"]
    assert names(field_selector="metadata.name!=b") == ["a", "c"]
    assert names(field_selector=f"metadata.namespace={ns}") == ["a", "b", "c"]


def test_patch_types(kube: Kube, ns: str) -> None:
    kube.core.create_namespaced_config_map(ns, {"metadata": {"name": "p", "labels": {"a": "1"}}, "data": {"x": "1"}})
    merge = json.dumps({"data": {"x": None, "y": "2"}}).encode()
    merged = kube.raw("PATCH", f"/api/v1/namespaces/{ns}/configmaps/p", merge, "application/merge-patch+json")[1]
    assert merged["data"] == {"y": "2"}
    patched = kube.raw("PATCH", f"/api/v1/namespaces/{ns}/configmaps/p",
                       json.dumps([{"op": "add", "path": "/data/z", "value": "3"}]).encode(),
                       "application/json-patch+json")[1]  # fmt: skip
    assert patched["data"] == {"y": "2", "z": "3"}
    code, status = kube.raw("PATCH", f"/api/v1/namespaces/{ns}/configmaps/p",
                            json.dumps([{"op": "replace", "path": "/nope/x", "value": "3"}]).encode(),
                            "application/json-patch+json")  # fmt: skip
    assert code in (422, 500) and status["kind"] == "Status"
    containers = [{"name": "a", "image": "i", "env": [{"name": "E", "value": "1"}]}, {"name": "b", "image": "j"}]
    kube.core.create_namespaced_pod(ns, {"metadata": {"name": "pod"}, "spec": {"containers": containers}})
    strategic = kube.core.patch_namespaced_pod(
        "pod", ns, {"metadata": {"labels": {"n": "1"}}, "spec": {"containers": [{"name": "b", "image": "k"}]}}
    )
    assert [(c.name, c.image) for c in strategic.spec.containers] == [("a", "i"), ("b", "k")]
    assert strategic.spec.containers[0].env[0].name == "E" and strategic.metadata.labels == {"n": "1"}


def test_custom_resources_status_subresource_generation_and_schema(kube: Kube, ns: str, crd) -> None:
    plural, kind = crd
    body = {"apiVersion": f"{GROUP}/v1", "kind": kind, "metadata": {"name": "w"},
            "spec": {"size": 1, "unknownField": "x"}, "status": {"ready": True}}  # fmt: skip
    created = kube.custom.create_namespaced_custom_object(GROUP, "v1", ns, plural, body)
    assert created["metadata"]["generation"] == 1
    assert "status" not in created and "unknownField" not in created["spec"]  # status ignored, unknowns pruned
    with_status = kube.custom.patch_namespaced_custom_object_status(
        GROUP, "v1", ns, plural, "w", {"status": {"ready": True}, "spec": {"size": 5}}
    )
    assert with_status["status"] == {"ready": True} and with_status["spec"]["size"] == 1
    assert with_status["metadata"]["generation"] == 1
    labelled = kube.custom.patch_namespaced_custom_object(
        GROUP, "v1", ns, plural, "w", {"metadata": {"labels": {"a": "b"}}}
    )
    assert labelled["metadata"]["generation"] == 1
    changed = kube.custom.patch_namespaced_custom_object(
        GROUP, "v1", ns, plural, "w", {"spec": {"size": 2}, "status": {"ready": False}}
    )
    assert changed["metadata"]["generation"] == 2 and changed["status"] == {"ready": True}
    for bad in ({"size": 0}, {"size": "big"}, {"color": "green", "size": 1}, {}):
        with pytest.raises(ApiException) as exc:
            kube.custom.create_namespaced_custom_object(
                GROUP, "v1", ns, plural, {**body, "metadata": {"name": "bad"}, "spec": bad}
            )
        assert exc.value.status == 422 and status_of(exc)["reason"] == "Invalid"


def test_finalizers_and_deletion_timestamp(kube: Kube, ns: str) -> None:
    kube.core.create_namespaced_config_map(ns, {"metadata": {"name": "f", "finalizers": ["example.com/hold"]}})
    kube.core.delete_namespaced_config_map("f", ns)
    held = kube.core.read_namespaced_config_map("f", ns)
    assert held.metadata.deletion_timestamp is not None and held.metadata.finalizers == ["example.com/hold"]
    kube.core.patch_namespaced_config_map("f", ns, {"metadata": {"finalizers": None}})
    wait_for(lambda: gone(lambda: kube.core.read_namespaced_config_map("f", ns)))


def test_owner_references_garbage_collection(kube: Kube, ns: str) -> None:
    owner = kube.core.create_namespaced_config_map(ns, {"metadata": {"name": "owner"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    kube.core.create_namespaced_secret(ns, {"metadata": {"name": "dependent", "ownerReferences": [ref]}})
    kube.core.delete_namespaced_config_map("owner", ns)
    wait_for(lambda: gone(lambda: kube.core.read_namespaced_secret("dependent", ns)))


def test_namespace_deletion_removes_its_objects(kube: Kube) -> None:
    name = f"conf-del-{secrets.token_hex(3)}"
    kube.core.create_namespace({"metadata": {"name": name}})
    kube.core.create_namespaced_config_map(name, {"metadata": {"name": "c"}})
    code, deleted = kube.raw("DELETE", f"/api/v1/namespaces/{name}")
    assert code == 200 and deleted["kind"] == "Namespace" and deleted["status"]["phase"] == "Terminating"
    assert deleted["metadata"]["deletionTimestamp"]
    wait_for(lambda: gone(lambda: kube.core.read_namespace(name)))
    assert kube.core.list_namespaced_config_map(name).items == []


def test_fresh_namespace_has_default_service_account_and_root_ca(kube: Kube, ns: str) -> None:
    sa = kube.core.read_namespaced_service_account("default", ns)
    assert not sa.secrets
    root_ca = wait_for(
        lambda: kube.core.list_namespaced_config_map(ns, field_selector="metadata.name=kube-root-ca.crt").items
    )
    assert "BEGIN CERTIFICATE" in root_ca[0].data["ca.crt"]
    names = {n.metadata.name for n in kube.core.list_namespace().items}
    assert {"default", "kube-system", "kube-public", "kube-node-lease"} <= names


# 4. Watch ----------------------------------------------------------------------------------------


def test_watch_events_in_order(kube: Kube, ns: str) -> None:
    rv = kube.core.list_namespaced_config_map(ns).metadata.resource_version
    seen: list[tuple[str, str]] = []

    def run() -> None:
        w = watch.Watch()
        for event in w.stream(kube.core.list_namespaced_config_map, ns, resource_version=rv, timeout_seconds=30):
            if event["object"].metadata.name == "w":
                seen.append((event["type"], event["object"].metadata.resource_version))
            if event["type"] == "DELETED":
                w.stop()

    thread = threading.Thread(target=run)
    thread.start()
    created = kube.core.create_namespaced_config_map(ns, {"metadata": {"name": "w"}})
    modified = kube.core.patch_namespaced_config_map("w", ns, {"data": {"a": "b"}})
    kube.core.delete_namespaced_config_map("w", ns)
    thread.join(timeout=60)
    assert [t for t, _ in seen] == ["ADDED", "MODIFIED", "DELETED"]
    assert seen[0][1] == created.metadata.resource_version and seen[1][1] == modified.metadata.resource_version


def test_watch_with_label_selector_sees_objects_enter_and_leave(kube: Kube, ns: str) -> None:
    rv = kube.core.list_namespaced_config_map(ns).metadata.resource_version
    seen: list[str] = []

    def run() -> None:
        w = watch.Watch()
        for event in w.stream(
            kube.core.list_namespaced_config_map, ns, resource_version=rv, label_selector="sel=yes", timeout_seconds=30
        ):
            seen.append(event["type"])
            if event["type"] == "DELETED":
                w.stop()

    thread = threading.Thread(target=run)
    thread.start()
    kube.core.create_namespaced_config_map(ns, {"metadata": {"name": "x"}})
    kube.core.patch_namespaced_config_map("x", ns, {"metadata": {"labels": {"sel": "yes"}}})
    kube.core.patch_namespaced_config_map("x", ns, {"metadata": {"labels": {"sel": "no"}}})
    thread.join(timeout=60)
    assert seen == ["ADDED", "DELETED"]


def test_a_watch_of_labelled_service_accounts_sees_the_label_removed_as_deleted(kube: Kube, ns: str) -> None:
    """What the controller's export watch relies on. kube's cacher sends an object leaving the selection as
    DELETED with its previous content (still labelled), at the new resourceVersion."""
    rv = kube.core.list_namespaced_service_account(ns).metadata.resource_version
    events: list[tuple[str, dict, str]] = []

    def run() -> None:
        w = watch.Watch()
        for event in w.stream(
            kube.core.list_namespaced_service_account, ns, resource_version=rv, label_selector="exported=true",
            timeout_seconds=30,
        ):  # fmt: skip
            meta = event["object"].metadata
            events.append((event["type"], meta.labels or {}, meta.resource_version))
            if event["type"] == "DELETED":
                w.stop()

    thread = threading.Thread(target=run)
    thread.start()
    kube.core.create_namespaced_service_account(ns, {"metadata": {"name": "quiet"}})
    kube.core.create_namespaced_service_account(ns, {"metadata": {"name": "bot", "labels": {"exported": "true"}}})
    patched = kube.core.patch_namespaced_service_account("bot", ns, {"metadata": {"labels": {"exported": None}}})
    thread.join(timeout=60)
    assert [(kind, labels) for kind, labels, _ in events] == [
        ("ADDED", {"exported": "true"}),
        ("DELETED", {"exported": "true"}),
    ]
    assert events[1][2] == patched.metadata.resource_version


def test_watch_timeout_seconds_is_honoured(kube: Kube, ns: str) -> None:
    finished = threading.Event()

    def run() -> None:
        for _ in watch.Watch().stream(kube.core.list_namespaced_config_map, ns, timeout_seconds=1):
            pass
        finished.set()

    threading.Thread(target=run, daemon=True).start()
    assert finished.wait(30)


def test_watch_from_a_too_old_resource_version_is_410_gone(kube: Kube, ns: str) -> None:
    for i in range(60):  # enough writes to push the first events out of a small history
        kube.core.create_namespaced_config_map(ns, {"metadata": {"name": f"fill-{i}"}})
    code, text = kube.raw("GET", f"/api/v1/namespaces/{ns}/configmaps?watch=true&resourceVersion=1&timeoutSeconds=5")
    first = json.loads(text.splitlines()[0]) if isinstance(text, str) else text
    if kube.in_memory is None and first["type"] != "ERROR":
        pytest.skip("this cluster has not compacted etcd since it started (kube does every 5 minutes); run again later")
    assert code == 200 and first["type"] == "ERROR"
    assert first["object"]["code"] == 410 and first["object"]["reason"] == "Expired"


# 5. Service-account tokens -----------------------------------------------------------------------


def test_token_request(kube: Kube, ns: str) -> None:
    kube.core.create_namespaced_service_account(ns, {"metadata": {"name": "demo"}})
    code, answer = kube.raw(
        "POST", f"/api/v1/namespaces/{ns}/serviceaccounts/demo/token",
        json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                    "spec": {"expirationSeconds": 3600, "audiences": ["foo"]}}).encode(),
    )  # fmt: skip
    assert code == 201 and answer["kind"] == "TokenRequest"
    assert answer["spec"]["audiences"] == ["foo"] and answer["spec"]["boundObjectRef"] is None
    assert answer["status"]["expirationTimestamp"].endswith("Z")
    claims = jwt_claims(answer["status"]["token"])
    sa = kube.core.read_namespaced_service_account("demo", ns)
    assert claims["aud"] == ["foo"] and claims["sub"] == f"system:serviceaccount:{ns}:demo"
    assert claims["exp"] - claims["iat"] == 3600 and claims["nbf"] == claims["iat"] and claims["iss"]
    assert claims["kubernetes.io"]["namespace"] == ns
    assert claims["kubernetes.io"]["serviceaccount"] == {"name": "demo", "uid": sa.metadata.uid}
    header = json.loads(base64.urlsafe_b64decode(answer["status"]["token"].split(".")[0] + "=="))
    assert header["alg"] == "RS256"


def test_token_request_bound_to_a_pod(kube: Kube, ns: str) -> None:
    """As the kubelet asks for a projected token: bound to the pod, which the token names; every token has a jti."""
    kube.core.create_namespaced_service_account(ns, {"metadata": {"name": "demo"}})
    pod = kube.core.create_namespaced_pod(ns, {"metadata": {"name": "p"}, "spec": {
        "serviceAccountName": "demo", "containers": [{"name": "c", "image": "busybox"}]}})  # fmt: skip
    uid = pod.metadata.uid

    def request(ref: dict[str, Any]) -> tuple[int, Any]:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"audiences": ["foo"], "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", **ref}},
        }
        return kube.raw("POST", f"/api/v1/namespaces/{ns}/serviceaccounts/demo/token", json.dumps(body).encode())

    code, answer = request({"name": "p", "uid": uid})
    assert code == 201
    assert answer["spec"]["boundObjectRef"] == {"kind": "Pod", "apiVersion": "v1", "name": "p", "uid": uid}
    claims = jwt_claims(answer["status"]["token"])
    assert claims["kubernetes.io"]["pod"] == {"name": "p", "uid": uid} and claims["jti"]
    code, answer = request({"name": "p"})  # without a uid: echoed without, but the token names the pod's
    assert code == 201 and answer["spec"]["boundObjectRef"] == {"kind": "Pod", "apiVersion": "v1", "name": "p"}
    assert jwt_claims(answer["status"]["token"])["kubernetes.io"]["pod"] == {"name": "p", "uid": uid}
    code, status = request({"name": "nope"})
    assert code == 404 and status["reason"] == "NotFound" and status["message"] == 'pods "nope" not found'
    code, status = request({"name": "p", "uid": "wrong"})
    assert code == 409 and status["reason"] == "Conflict"
    assert "the UID in the bound object reference (wrong) does not match the UID in record" in status["message"]


def test_token_request_defaults_and_errors(kube: Kube, ns: str) -> None:
    answer = kube.core.create_namespaced_service_account_token("default", ns, {"spec": {}})
    assert answer.spec.expiration_seconds == 3600 and answer.spec.audiences
    assert jwt_claims(answer.status.token)["aud"] == answer.spec.audiences
    with pytest.raises(ApiException) as exc:
        kube.core.create_namespaced_service_account_token("default", ns, {"spec": {"expirationSeconds": 500}})
    status = status_of(exc)
    assert exc.value.status == 422 and status["reason"] == "Invalid"
    assert status["message"] == (
        'TokenRequest.authentication.k8s.io "" is invalid: spec.expirationSeconds: Invalid value: 500: may not '
        "specify a duration less than 10 minutes"
    )
    assert status["details"]["causes"][0]["field"] == "spec.expirationSeconds"
    with pytest.raises(ApiException) as exc:
        kube.core.create_namespaced_service_account_token("nope", ns, {"spec": {}})
    assert exc.value.status == 404 and status_of(exc)["message"] == 'serviceaccounts "nope" not found'
    assert status_of(exc)["details"] == {"name": "nope", "kind": "serviceaccounts"}


def test_token_review_and_token_death_with_its_service_account(kube: Kube, ns: str) -> None:
    kube.core.create_namespaced_service_account(ns, {"metadata": {"name": "mortal"}})
    token = kube.core.create_namespaced_service_account_token("mortal", ns, {"spec": {}}).status.token
    review = kube.authn.create_token_review({"spec": {"token": token}})
    assert review.status.authenticated is True
    assert review.status.user.username == f"system:serviceaccount:{ns}:mortal"
    assert f"system:serviceaccounts:{ns}" in review.status.user.groups
    assert kube.raw("GET", "/version", token=token)[0] == 200
    kube.core.delete_namespaced_service_account("mortal", ns)
    wait_for(lambda: not kube.authn.create_token_review({"spec": {"token": token}}).status.authenticated)
    assert kube.raw("GET", "/version", token=token)[0] == 401


def test_legacy_token_controller(kube: Kube, ns: str) -> None:
    kube.core.create_namespaced_service_account(ns, {"metadata": {"name": "old"}})
    kube.core.create_namespaced_secret(
        ns, {"metadata": {"name": "old-token", "annotations": {"kubernetes.io/service-account.name": "old"}},
             "type": "kubernetes.io/service-account-token"},
    )  # fmt: skip
    secret = wait_for(lambda: (s := kube.core.read_namespaced_secret("old-token", ns)).data and "token" in s.data and s)
    assert {"token", "ca.crt", "namespace"} <= set(secret.data)
    assert base64.b64decode(secret.data["namespace"]).decode() == ns
    sa = kube.core.read_namespaced_service_account("old", ns)
    assert secret.metadata.annotations["kubernetes.io/service-account.uid"] == sa.metadata.uid
    assert not sa.secrets
    token = base64.b64decode(secret.data["token"]).decode()
    assert kube.authn.create_token_review({"spec": {"token": token}}).status.authenticated is True
    kube.core.delete_namespaced_secret("old-token", ns)
    wait_for(lambda: not kube.authn.create_token_review({"spec": {"token": token}}).status.authenticated)


def test_oidc_discovery(kube: Kube) -> None:
    code, doc = kube.raw("GET", "/.well-known/openid-configuration")
    assert code == 200 and doc["issuer"] and doc["jwks_uri"]
    assert "RS256" in doc["id_token_signing_alg_values_supported"]
    assert kube.last_content_type == "application/json"
    code, jwks = kube.raw("GET", "/openid/v1/jwks", accept="application/json, */*")
    assert code == 200 and jwks["keys"] and jwks["keys"][0]["kty"] == "RSA"
    assert kube.last_content_type == "application/jwk-set+json"
    # The keys come only as a JWK set: a client asking for application/json alone is refused, and the
    # discovery document only as JSON.
    code, status = kube.raw("GET", "/openid/v1/jwks")
    assert code == 406 and status["reason"] == "NotAcceptable" and "application/jwk-set+json" in status["message"]
    code, _ = kube.raw("GET", "/openid/v1/jwks", accept="application/jwk-set+json")
    assert code == 200
    code, status = kube.raw("GET", "/.well-known/openid-configuration", accept="application/jwk-set+json")
    assert code == 406 and status["reason"] == "NotAcceptable"


# 6. Authentication and RBAC ----------------------------------------------------------------------


def test_garbage_token_is_401(kube: Kube) -> None:
    code, status = kube.raw("GET", "/api/v1/namespaces", token="garbage")
    assert code == 401 and status["reason"] == "Unauthorized" and status["kind"] == "Status"


def test_self_subject_review_names_a_service_account_with_its_groups_and_uid(kube: Kube, ns: str) -> None:
    sa = kube.core.create_namespaced_service_account(ns, {"metadata": {"name": "me"}})
    token = kube.core.create_namespaced_service_account_token("me", ns, {"spec": {}}).status.token
    review = client.AuthenticationV1Api(kube.as_token(token)).create_self_subject_review(
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    )
    user = review.status.user_info
    assert user.username == f"system:serviceaccount:{ns}:me" and user.uid == sa.metadata.uid
    assert {"system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated"} <= set(user.groups)


def test_rbac_for_service_account_tokens(kube: Kube, ns: str) -> None:
    kube.core.create_namespaced_service_account(ns, {"metadata": {"name": "limited"}})
    token = kube.core.create_namespaced_service_account_token("limited", ns, {"spec": {}}).status.token
    as_sa = client.CoreV1Api(kube.as_token(token))
    user = f"system:serviceaccount:{ns}:limited"
    with pytest.raises(ApiException) as exc:
        as_sa.list_namespaced_secret(ns)
    assert exc.value.status == 403 and status_of(exc)["reason"] == "Forbidden"
    assert status_of(exc)["message"] == (
        f'secrets is forbidden: User "{user}" cannot list resource "secrets" in API group "" in the namespace "{ns}"'
    )
    kube.core.create_namespaced_secret(ns, {"metadata": {"name": "allowed"}})
    kube.core.create_namespaced_secret(ns, {"metadata": {"name": "other"}})
    kube.rbac.create_namespaced_role(ns, {"metadata": {"name": "one-secret"}, "rules": [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["allowed"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]}]})  # fmt: skip
    kube.rbac.create_namespaced_role_binding(ns, {
        "metadata": {"name": "one-secret"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "one-secret"},
        "subjects": [{"kind": "ServiceAccount", "name": "limited", "namespace": ns}]})  # fmt: skip
    assert wait_for(lambda: _allowed(lambda: as_sa.read_namespaced_secret("allowed", ns)))
    with pytest.raises(ApiException) as exc:
        as_sa.read_namespaced_secret("other", ns)
    assert exc.value.status == 403
    assert as_sa.create_namespaced_service_account_token("limited", ns, {"spec": {}}).status.token
    with pytest.raises(ApiException) as exc:
        as_sa.read_namespaced_service_account("limited", ns)  # the subresource grants nothing on the parent
    assert exc.value.status == 403
    kube.rbac.create_namespaced_role_binding(ns, {
        "metadata": {"name": "view"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
        "subjects": [{"kind": "ServiceAccount", "name": "limited", "namespace": ns}]})  # fmt: skip
    assert wait_for(lambda: _allowed(lambda: as_sa.list_namespaced_config_map(ns)))
    with pytest.raises(ApiException) as exc:
        as_sa.list_namespaced_config_map("default")  # a RoleBinding grants in its namespace only
    assert exc.value.status == 403


def test_token_requests_limited_by_resource_names(kube: Kube, ns: str) -> None:
    """The facts file's "RBAC on token requests": resourceNames on serviceaccounts/token is enforced."""
    for name in ("consumer", "allowed", "other"):
        kube.core.create_namespaced_service_account(ns, {"metadata": {"name": name}})
    token = kube.core.create_namespaced_service_account_token("consumer", ns, {"spec": {}}).status.token
    as_consumer = client.CoreV1Api(kube.as_token(token))
    kube.rbac.create_namespaced_role(ns, {"metadata": {"name": "mint-allowed"}, "rules": [
        {"apiGroups": [""], "resources": ["serviceaccounts/token"], "resourceNames": ["allowed"],
         "verbs": ["create"]}]})  # fmt: skip
    kube.rbac.create_namespaced_role_binding(ns, {
        "metadata": {"name": "mint-allowed"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "mint-allowed"},
        "subjects": [{"kind": "ServiceAccount", "name": "consumer", "namespace": ns}]})  # fmt: skip
    assert wait_for(lambda: _allowed(lambda: as_consumer.create_namespaced_service_account_token("allowed", ns, {})))
    with pytest.raises(ApiException) as exc:
        as_consumer.create_namespaced_service_account_token("other", ns, {"spec": {}})
    user = f"system:serviceaccount:{ns}:consumer"
    assert exc.value.status == 403 and status_of(exc)["reason"] == "Forbidden"
    assert status_of(exc)["message"] == (
        f'serviceaccounts "other" is forbidden: User "{user}" cannot create resource "serviceaccounts/token" '
        f'in API group "" in the namespace "{ns}"'
    )
    with pytest.raises(ApiException) as exc:
        as_consumer.list_service_account_for_all_namespaces()
    assert exc.value.status == 403
    assert status_of(exc)["message"] == (
        f'serviceaccounts is forbidden: User "{user}" cannot list resource "serviceaccounts" in API group "" '
        "at the cluster scope"
    )


def _allowed(call: Callable[[], Any]) -> bool:
    try:
        call()
    except ApiException as exc:
        if exc.status == 403:
            return False
        raise
    return True


# Several clusters --------------------------------------------------------------------------------


def test_two_clusters_are_independent(cluster1, cluster2) -> None:
    one, two = cluster1, cluster2
    a, b = client.CoreV1Api(one.admin_client()), client.CoreV1Api(two.admin_client())
    a.create_namespace({"metadata": {"name": "only-one"}})
    token = one.issue_token("default", "default")
    assert gone(lambda: b.read_namespace("only-one"))
    with pytest.raises(ApiException) as exc:
        client.CoreV1Api(two.client_for_token(token)).list_namespaced_config_map("default")
    assert exc.value.status == 401  # a token from one cluster means nothing to the other


# 8. kubectl --------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_get_create_apply_label_annotate_wait_delete(kube: Kube, ns: str, tmp_path: Any) -> None:
    env = {**os.environ, "KUBECONFIG": kube.kubeconfig, "HOME": str(tmp_path)}

    def kubectl(*args: str, stdin: str | None = None) -> str:
        done = subprocess.run(["kubectl", "-n", ns, *args], input=stdin, capture_output=True, text=True, env=env,
                              timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    manifest = json.dumps({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "k"}, "data": {"a": "b"}})
    kubectl("create", "-f", "-", stdin=manifest)
    kubectl("apply", "-f", "-", stdin=manifest.replace('"b"', '"c"'))
    kubectl("label", "configmap", "k", "x=y")
    kubectl("annotate", "configmap", "k", "z=w")
    got = json.loads(kubectl("get", "configmap", "k", "-o", "json"))
    assert got["data"] == {"a": "c"} and got["metadata"]["labels"] == {"x": "y"}
    assert got["metadata"]["annotations"]["z"] == "w"
    assert "kubectl.kubernetes.io/last-applied-configuration" in got["metadata"]["annotations"]
    assert "configmap/k" in kubectl("get", "configmaps", "-o", "name")
    waiter = subprocess.Popen(["kubectl", "-n", ns, "wait", "--for=delete", "configmap/k", "--timeout=60s"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    kubectl("delete", "configmap", "k")
    _, err = waiter.communicate(timeout=90)
    assert waiter.returncode == 0, err
