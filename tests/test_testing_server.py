"""The in-memory API server through the official kubernetes client: CRUD, CRDs, watches, two clusters."""

from __future__ import annotations

import threading

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from kubemcsa_testing import ApiServer


@pytest.fixture
def core(cluster1: ApiServer) -> client.CoreV1Api:
    return client.CoreV1Api(cluster1.admin_client())


CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
    "spec": {
        "group": "example.com",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wg"]},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "properties": {
                                    "size": {"type": "integer", "minimum": 1},
                                    "color": {"type": "string", "enum": ["red", "blue"]},
                                },
                            },
                            "status": {
                                "type": "object",
                                "properties": {"ready": {"type": "boolean"}},
                            },
                        },
                    }
                },
            }
        ],
    },
}


def test_fresh_cluster_has_default_namespaces_service_accounts_and_root_ca(core: client.CoreV1Api) -> None:
    names = {ns.metadata.name for ns in core.list_namespace().items}
    assert {"default", "kube-system", "kube-public", "kube-node-lease"} <= names
    for ns in names:
        assert core.read_namespaced_service_account("default", ns).metadata.uid
        assert "BEGIN CERTIFICATE" in core.read_namespaced_config_map("kube-root-ca.crt", ns).data["ca.crt"]


def test_secret_crud_assigns_metadata_and_conflicts_on_stale_update(core: client.CoreV1Api) -> None:
    created = core.create_namespaced_secret("default", {"metadata": {"name": "s1"}, "stringData": {"k": "v"}})
    assert created.metadata.uid and created.metadata.creation_timestamp
    assert created.data == {"k": "dg=="} and created.type == "Opaque"
    rv = int(created.metadata.resource_version)
    fetched = core.read_namespaced_secret("s1", "default")
    assert fetched.metadata.resource_version == created.metadata.resource_version
    fetched.data["k2"] = "dg=="
    updated = core.replace_namespaced_secret("s1", "default", fetched)
    assert int(updated.metadata.resource_version) > rv
    with pytest.raises(ApiException) as exc:
        core.replace_namespaced_secret("s1", "default", fetched)  # stale resourceVersion
    assert exc.value.status == 409
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_secret("default", {"metadata": {"name": "s1"}})
    assert exc.value.status == 409 and '"AlreadyExists"' in exc.value.body
    core.delete_namespaced_secret("s1", "default")
    with pytest.raises(ApiException) as exc:
        core.read_namespaced_secret("s1", "default")
    assert exc.value.status == 404


def test_generate_name_and_labels(core: client.CoreV1Api) -> None:
    a = core.create_namespaced_config_map("default", {"metadata": {"generateName": "cm-", "labels": {"app": "a"}}})
    core.create_namespaced_config_map("default", {"metadata": {"generateName": "cm-", "labels": {"app": "b"}}})
    assert a.metadata.name.startswith("cm-") and len(a.metadata.name) == 8
    selected = core.list_namespaced_config_map("default", label_selector="app in (a)").items
    assert [c.metadata.name for c in selected] == [a.metadata.name]
    assert len(core.list_namespaced_config_map("default", label_selector="app").items) == 2
    assert len(core.list_namespaced_config_map("default", label_selector="app!=a").items) == 2  # b + root CA


def test_custom_resources_are_served_once_their_crd_exists(cluster1: ApiServer) -> None:
    api = cluster1.admin_client()
    ext = client.ApiextensionsV1Api(api)
    custom = client.CustomObjectsApi(api)
    ext.create_custom_resource_definition(CRD)
    obj = custom.create_namespaced_custom_object(
        "example.com",
        "v1",
        "default",
        "widgets",
        {
            "apiVersion": "example.com/v1",
            "kind": "Widget",
            "metadata": {"name": "w"},
            "spec": {"size": 2, "unknown": 1},
            "status": {"ready": True},
        },
    )
    assert obj["metadata"]["generation"] == 1
    assert "unknown" not in obj["spec"] and "status" not in obj
    with pytest.raises(ApiException) as exc:
        custom.create_namespaced_custom_object(
            "example.com",
            "v1",
            "default",
            "widgets",
            {
                "apiVersion": "example.com/v1",
                "kind": "Widget",
                "metadata": {"name": "bad"},
                "spec": {"size": 0, "color": "green"},
            },
        )
    assert exc.value.status == 422
    status = custom.patch_namespaced_custom_object_status(
        "example.com", "v1", "default", "widgets", "w", {"status": {"ready": True}, "spec": {"size": 9}}
    )
    assert status["status"] == {"ready": True} and status["spec"]["size"] == 2
    assert status["metadata"]["generation"] == 1
    patched = custom.patch_namespaced_custom_object(
        "example.com", "v1", "default", "widgets", "w", {"spec": {"size": 3}}
    )
    assert patched["metadata"]["generation"] == 2 and patched["status"] == {"ready": True}
    ext.delete_custom_resource_definition("widgets.example.com")
    with pytest.raises(ApiException) as exc:
        custom.list_namespaced_custom_object("example.com", "v1", "default", "widgets")
    assert exc.value.status == 404


def test_watch_with_the_official_helper(core: client.CoreV1Api) -> None:
    start = core.list_namespaced_config_map("default").metadata.resource_version
    seen: list[tuple[str, str]] = []

    def run() -> None:
        w = watch.Watch()
        for event in w.stream(core.list_namespaced_config_map, "default", resource_version=start, timeout_seconds=5):
            seen.append((event["type"], event["object"].metadata.name))
            if event["type"] == "DELETED":
                w.stop()

    thread = threading.Thread(target=run)
    thread.start()
    core.create_namespaced_config_map("default", {"metadata": {"name": "w1"}})
    core.patch_namespaced_config_map("w1", "default", {"data": {"a": "b"}})
    core.delete_namespaced_config_map("w1", "default")
    thread.join(timeout=10)
    assert seen == [("ADDED", "w1"), ("MODIFIED", "w1"), ("DELETED", "w1")]


def test_two_servers_side_by_side(cluster1: ApiServer, cluster2: ApiServer) -> None:
    one, two = client.CoreV1Api(cluster1.admin_client()), client.CoreV1Api(cluster2.admin_client())
    one.create_namespace({"metadata": {"name": "only-in-one"}})
    assert "only-in-one" not in {n.metadata.name for n in two.list_namespace().items}
    assert cluster1.url != cluster2.url and cluster1.ca_pem != cluster2.ca_pem


def test_restart_keeps_port_and_data(cluster1: ApiServer) -> None:
    core = client.CoreV1Api(cluster1.admin_client())
    core.create_namespaced_config_map("default", {"metadata": {"name": "kept"}})
    port = cluster1.port
    cluster1.stop()
    cluster1.start()
    assert cluster1.port == port
    core = client.CoreV1Api(cluster1.admin_client())
    assert core.read_namespaced_config_map("kept", "default").metadata.name == "kept"


def test_an_unreachable_server_counts_and_resets_every_connection_then_comes_back() -> None:
    import urllib3
    from kubernetes.client.exceptions import ApiException

    from kubemcsa.client import kube
    from kubemcsa_testing import ApiServer

    with ApiServer(name="dark") as server:
        client = server.admin_client()
        client.configuration.retries = False
        client = type(client)(client.configuration)  # one connection attempt per call
        pods = kube.Resource(client, kube.PODS, timeout=5)
        assert pods.list("default")["items"] == []
        server.make_unreachable()
        before = server.connection_attempts
        for _ in range(3):
            with pytest.raises((urllib3.exceptions.HTTPError, OSError, ApiException)):
                pods.list("default")
        assert server.connection_attempts - before == 3
        server.make_reachable()
        assert pods.list("default")["items"] == []
