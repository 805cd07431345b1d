"""kubemcsa.config against an in-memory cluster: mounted import, kubeconfig, in-cluster, and token rotation."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from urllib.parse import urlparse

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from kubemcsa import config
from kubemcsa.client import kube
from kubemcsa.contract.credentials import Credentials, build_kubeconfig


def grant_pod_listing(server, name: str, namespace: str = "default") -> None:
    admin = server.admin_client()
    kube.Resource(admin, kube.SERVICE_ACCOUNTS).create({"metadata": {"name": name}}, namespace)
    kube.Resource(admin, kube.ROLES).create(
        {"metadata": {"name": name}, "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]},
        namespace,
    )
    kube.Resource(admin, kube.ROLE_BINDINGS).create(
        {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
        },
        namespace,
    )


def write_atomically(path: Path, content: bytes) -> None:
    """Replace a file the way the kubelet's atomic writer does: the reader never sees a partial file."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(content)
    os.replace(temporary, path)


def mount_import(server, directory: Path, token: str, namespace: str = "default") -> None:
    creds = Credentials(server=server.url, ca_crt=server.ca_pem, token=token, namespace=namespace)
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "ca.crt": creds.ca_crt,
        "namespace": namespace.encode(),
        "token": token.encode(),
        "server": creds.server.encode(),
        "config": build_kubeconfig(creds, server.name).encode(),
    }
    for name, content in files.items():
        write_atomically(directory / name, content)


def list_pods(cfg: config.ConfigAndNamespace) -> list[str]:
    with cfg.api_client() as api_client:
        pods = k8s.CoreV1Api(api_client).list_namespaced_pod(cfg.namespace)
    return [p.metadata.name for p in pods.items]


def test_a_client_from_a_mounted_import_calls_the_remote_cluster(cluster2, tmp_path) -> None:
    grant_pod_listing(cluster2, "pod-lister")
    mount_import(cluster2, tmp_path / "cluster2-default-pod-lister", cluster2.issue_token("default", "pod-lister"))
    cfg = config.import_config_and_namespace(mount_root=tmp_path)
    assert cfg.namespace == "default"
    assert list_pods(cfg) == []
    generic = config.config_and_namespace(
        "cluster2-default-pod-lister", mount_root=tmp_path, kubeconfig=str(tmp_path / "none")
    )
    assert list_pods(generic) == []
    with cfg.api_client() as api_client, pytest.raises(ApiException) as info:
        k8s.CoreV1Api(api_client).list_namespaced_secret("default")
    assert info.value.status == 403


def test_a_client_from_a_kubeconfig_context(cluster1, cluster2, tmp_path, monkeypatch) -> None:
    first, second = tmp_path / "one.yaml", tmp_path / "two.yaml"
    cluster1.write_kubeconfig(str(first), context="cluster1")
    cluster2.write_kubeconfig(str(second), context="cluster2")
    monkeypatch.setenv("KUBECONFIG", f"{first}{os.pathsep}{second}")
    kube.Resource(cluster2.admin_client(), kube.NAMESPACES).create({"metadata": {"name": "only-in-2"}})
    cfg = config.config_and_namespace("cluster2", mount_root=tmp_path / "no-imports")
    with cfg.api_client() as api_client:
        names = [n.metadata.name for n in k8s.CoreV1Api(api_client).list_namespace().items]
    assert "only-in-2" in names
    everything = config.all_named_configs_and_namespaces(mount_root=tmp_path / "no-imports")
    assert sorted(everything) == ["cluster1", "cluster2"]
    assert everything["cluster1"].config.host == cluster1.url
    # no name, no import: the current context of the merged kubeconfig (the first file's)
    assert config.config_and_namespace(mount_root=tmp_path / "no-imports").config.host == cluster1.url


def test_a_client_in_cluster_from_the_standard_variables_and_files(cluster1, tmp_path) -> None:
    kube.Resource(cluster1.admin_client(), kube.NAMESPACES).create({"metadata": {"name": "team-a"}})
    grant_pod_listing(cluster1, "app", namespace="team-a")
    sa_dir = tmp_path / "serviceaccount"
    sa_dir.mkdir()
    (sa_dir / "token").write_text(cluster1.issue_token("team-a", "app"))
    (sa_dir / "ca.crt").write_bytes(cluster1.ca_pem)
    (sa_dir / "namespace").write_text("team-a")
    url = urlparse(cluster1.url)
    environ = {"KUBERNETES_SERVICE_HOST": url.hostname or "", "KUBERNETES_SERVICE_PORT": str(url.port)}
    cfg = config.config_and_namespace(
        mount_root=tmp_path / "no-imports",
        kubeconfig=str(tmp_path / "no-kubeconfig"),
        service_account_dir=sa_dir,
        environ=environ,
    )
    assert cfg.namespace == "team-a"
    assert list_pods(cfg) == []


def test_a_long_lived_client_survives_a_rotation_of_the_mounted_token(cluster2, tmp_path) -> None:
    grant_pod_listing(cluster2, "rotating")
    directory = tmp_path / "imports" / "cluster2-rotating"
    old_token = cluster2.issue_token("default", "rotating")
    mount_import(cluster2, directory, old_token)
    cfg = config.import_config_and_namespace("cluster2-rotating", tmp_path / "imports")
    api_client = cfg.api_client()
    pods = k8s.CoreV1Api(api_client)
    try:
        assert pods.list_namespaced_pod("default").items == []
        # Delete and recreate the service account: the old token names the old uid and stops authenticating.
        accounts = kube.Resource(cluster2.admin_client(), kube.SERVICE_ACCOUNTS)
        accounts.delete("rotating", "default")
        accounts.create({"metadata": {"name": "rotating"}}, "default")
        with cluster2.client_for_token(old_token) as stale, pytest.raises(ApiException) as info:
            k8s.CoreV1Api(stale).list_namespaced_pod("default")
        assert info.value.status == 401
        # The controller refreshes the Secret, the kubelet rewrites the file: the same client keeps working.
        new_token = cluster2.issue_token("default", "rotating")
        assert new_token != old_token
        write_atomically(directory / "token", new_token.encode())
        assert pods.list_namespaced_pod("default").items == []
        assert base64.b64encode(new_token.encode()) not in repr(cfg).encode()
    finally:
        api_client.close()
