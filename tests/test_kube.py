"""kubemcsa.client.kube, the dict-based access layer every component uses, against the in-memory API server."""

from __future__ import annotations

import threading

import pytest
from kubernetes.client.exceptions import ApiException

from kubemcsa.client import kube
from kubemcsa.client.informer import Informer
from kubemcsa_testing.wait import wait_for


def _configmap(name: str, **data: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "default"}, "data": data}


def test_crud_and_error_helpers(cluster1):
    maps = kube.Resource(cluster1.admin_client(), kube.CONFIG_MAPS)
    created = maps.create(_configmap("a", k="1"))
    assert maps.get("a", "default")["data"] == {"k": "1"}
    assert maps.patch("a", {"data": {"k": "2"}}, "default")["data"] == {"k": "2"}
    stale = dict(created, data={"k": "3"})
    with pytest.raises(ApiException) as info:
        maps.replace(stale)
    assert info.value.status == 409 and kube.error_reason(info.value) == "Conflict"
    with pytest.raises(ApiException) as info:
        maps.create(_configmap("a"))
    assert kube.error_reason(info.value) == "AlreadyExists"
    assert kube.error_message(info.value) == 'configmaps "a" already exists'
    maps.delete("a", "default")
    with pytest.raises(ApiException) as info:
        maps.get("a", "default")
    assert kube.error_reason(info.value) == "NotFound"


def test_resource_type_of_names_what_it_does_not_know():
    assert kube.resource_type_of({"apiVersion": "v1", "kind": "Secret"}) is kube.SECRETS
    with pytest.raises(ValueError, match="unknown resource example.com/v1 Thing"):
        kube.resource_type_of({"apiVersion": "example.com/v1", "kind": "Thing"})


def test_a_watch_from_a_forgotten_version_ends_with_410(api_server_factory):
    server = api_server_factory(name="small", history_size=5)
    maps = kube.Resource(server.admin_client(), kube.CONFIG_MAPS)
    first = maps.create(_configmap("first"))
    for i in range(20):
        maps.create(_configmap(f"m{i}"))
    events = list(maps.watch("default", resource_version=first["metadata"]["resourceVersion"], timeout_seconds=5))
    assert events[-1]["type"] == "ERROR" and events[-1]["object"]["code"] == 410


def test_informer_follows_changes_and_relists_after_the_api_server_comes_back(cluster1):
    maps = kube.Resource(cluster1.admin_client(), kube.CONFIG_MAPS)
    seen: list[tuple[str, str]] = []
    lock = threading.Lock()

    def record(event_type: str, obj: dict, old: dict | None) -> None:
        with lock:
            seen.append((event_type, obj["metadata"]["name"]))

    maps.create(_configmap("before"))
    informer = Informer(maps, namespace="default", watch_timeout_seconds=2)
    informer.add_handler(record)
    informer.start()
    try:
        assert informer.wait_for_sync(10)
        assert informer.get("before", "default") is not None
        maps.create(_configmap("added"))
        maps.patch("added", {"data": {"x": "y"}}, "default")
        maps.delete("before", "default")
        wait_for(lambda: ("DELETED", "before") in seen, "the deletion to reach the informer")
        assert ("ADDED", "added") in seen and ("MODIFIED", "added") in seen
        assert informer.get("before", "default") is None

        cluster1.stop()
        cluster1.start()
        maps.create(_configmap("after-restart"))
        wait_for(lambda: informer.get("after-restart", "default"), "the informer to recover after a restart")
    finally:
        informer.stop()
    assert {m["metadata"]["name"] for m in informer.list()} >= {"added", "after-restart"}


def test_a_403_names_the_missing_role_a_binding_points_at(cluster1):
    """kube-apiserver appends "RBAC: clusterrole ... not found" when a user's binding references no role."""
    admin = cluster1.admin_client()
    kube.Resource(admin, kube.SERVICE_ACCOUNTS).create({"metadata": {"name": "orphan"}}, "default")
    kube.Resource(admin, kube.ROLE_BINDINGS).create(
        {
            "metadata": {"name": "orphan", "namespace": "default"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "nonexistent"},
            "subjects": [{"kind": "ServiceAccount", "name": "orphan", "namespace": "default"}],
        }
    )
    as_orphan = cluster1.client_for_token(cluster1.issue_token("default", "orphan"))
    with pytest.raises(ApiException) as info:
        kube.Resource(as_orphan, kube.SECRETS).list("default")
    assert info.value.status == 403
    assert kube.error_message(info.value).endswith(
        'in the namespace "default": RBAC: clusterrole.rbac.authorization.k8s.io "nonexistent" not found'
    )


def test_an_informer_index_follows_adds_changes_deletes_and_relists(cluster1):
    maps = kube.Resource(cluster1.admin_client(), kube.CONFIG_MAPS)
    maps.create(_configmap("a", cluster="c1"))
    informer = Informer(maps, namespace="default", watch_timeout_seconds=2)
    informer.add_index("cluster", lambda obj: [obj.get("data", {}).get("cluster")])
    informer.start()

    def names(value: str) -> set[str]:
        return {m["metadata"]["name"] for m in informer.by_index("cluster", value)}

    try:
        assert informer.wait_for_sync(10) and names("c1") == {"a"}
        maps.create(_configmap("b", cluster="c1"))
        maps.create({**_configmap("odd"), "data": None})  # indexed under nothing, and no crash
        wait_for(lambda: names("c1") == {"a", "b"}, "b in the index")
        maps.patch("a", {"data": {"cluster": "c2"}}, "default")
        wait_for(lambda: names("c1") == {"b"} and names("c2") == {"a"}, "a moved to c2")
        maps.delete("b", "default")
        wait_for(lambda: names("c1") == set(), "b gone from the index")
        cluster1.stop()
        cluster1.start()
        maps.create(_configmap("after", cluster="c2"))
        wait_for(lambda: names("c2") == {"a", "after"}, "the index rebuilt by the relist")
    finally:
        informer.stop()
