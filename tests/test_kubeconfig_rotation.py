"""The Secret's `config` follows token rotation in client-go: checked with a real kubectl against the in-memory server.

The kubeconfig carries the token inline and as `tokenFile: token`, relative to itself. Mounted in a pod, that is the
sibling file the kubelet rewrites on each rotation; kubectl (client-go) must read it rather than the inline token.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from kubemcsa.client import kube
from kubemcsa.contract.credentials import Credentials, build_kubeconfig

KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (pip install -e '.[test]')")


def _reader(cluster) -> None:
    admin = cluster.admin_client()
    kube.Resource(admin, kube.SERVICE_ACCOUNTS).create({"metadata": {"name": "reader"}}, "default")
    kube.Resource(admin, kube.ROLE_BINDINGS).create(
        {
            "metadata": {"name": "reader", "namespace": "default"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": "default"}],
        }
    )


def _kubectl(config) -> subprocess.CompletedProcess:
    return subprocess.run(
        [KUBECTL, "--kubeconfig", str(config), "get", "configmaps", "-o", "name"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_kubectl_reads_the_mounted_token_file_next_to_the_config(cluster1, tmp_path):
    _reader(cluster1)
    rotated = cluster1.issue_token("default", "reader")
    stale = Credentials(server=cluster1.url, ca_crt=cluster1.ca_pem, token="revoked.token.value", namespace="default")
    (tmp_path / "config").write_text(build_kubeconfig(stale, "cluster1"))
    (tmp_path / "token").write_text(rotated)
    result = _kubectl(tmp_path / "config")
    assert result.returncode == 0, result.stderr
    assert "configmap/kube-root-ca.crt" in result.stdout


def test_kubectl_falls_back_to_the_inline_token_outside_a_pod(cluster1, tmp_path):
    _reader(cluster1)
    creds = Credentials(
        server=cluster1.url,
        ca_crt=cluster1.ca_pem,
        token=cluster1.issue_token("default", "reader"),
        namespace="default",
    )
    (tmp_path / "config").write_text(build_kubeconfig(creds, "cluster1"))  # no sibling token file
    result = _kubectl(tmp_path / "config")
    assert result.returncode == 0, result.stderr
    assert "configmap/kube-root-ca.crt" in result.stdout
