"""`kubemcsa status` against an in-memory cluster: the table, the exit status, and its errors."""

from __future__ import annotations

from pathlib import Path

import yaml

from kubemcsa import cli
from kubemcsa.client import kube
from kubemcsa.contract import api

CRD = Path(__file__).resolve().parents[1] / "manifests" / "crd" / "serviceaccountimports.yaml"


def make_import(admin, namespace: str, name: str, ready: str | None, reason: str = "", message: str = "") -> None:
    imports = kube.Resource(admin, kube.SERVICE_ACCOUNT_IMPORTS)
    created = imports.create(
        {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "metadata": {"name": name},
            "spec": {"clusterName": "cluster2", "namespace": "default", "name": "pod-lister"},
        },
        namespace,
    )
    if ready is not None:  # what the controller would write
        condition = {
            "type": "Ready",
            "status": ready,
            "reason": reason,
            "message": message,
            "lastTransitionTime": "2026-01-01T00:00:00Z",
            "observedGeneration": created["metadata"].get("generation", 1),
        }
        status = {"conditions": [condition], "expirationTimestamp": "2099-01-01T00:00:00Z"}
        imports.patch_status(name, {"status": status}, namespace)


def test_status_lists_imports_and_exits_1_when_one_is_broken(cluster1, tmp_path, capsys) -> None:
    admin = cluster1.admin_client()
    kube.Resource(admin, kube.CRDS).create(yaml.safe_load(CRD.read_text()))
    kube.Resource(admin, kube.NAMESPACES).create({"metadata": {"name": "team-a"}})
    make_import(admin, "default", "good", "True", api.REASON_TOKEN_ISSUED, "fine")
    make_import(
        admin, "team-a", "broken", "False", api.REASON_REMOTE_SERVICE_ACCOUNT_NOT_FOUND, "create pod-lister in cluster2"
    )
    kubeconfig = tmp_path / "kc"
    cluster1.write_kubeconfig(str(kubeconfig), context="cluster1")

    assert cli.main(["status", "--kubeconfig", str(kubeconfig)]) == cli.EXIT_OK  # default namespace: all good
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["NAME", "CLUSTER"]
    assert "good" in out and "broken" not in out

    assert cli.main(["status", "-A", "--kubeconfig", str(kubeconfig)]) == cli.EXIT_NOT_READY
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "NAMESPACE"
    assert lines[1].split()[:7] == [
        "default",
        "good",
        "cluster2",
        "default/pod-lister",
        "True",
        "TokenIssued",
        lines[1].split()[6],
    ]
    assert lines[2].split()[:6] == [
        "team-a",
        "broken",
        "cluster2",
        "default/pod-lister",
        "False",
        "RemoteServiceAccountNotFound",
    ]
    assert lines[-1] == "team-a/broken: create pod-lister in cluster2"

    assert cli.main(["status", "-n", "empty", "--kubeconfig", str(kubeconfig)]) == cli.EXIT_OK
    assert capsys.readouterr().out == "No ServiceAccountImports found in namespace empty.\n"


def test_status_on_a_cluster_without_the_crd_says_to_install_it(cluster2, tmp_path, capsys) -> None:
    kubeconfig = tmp_path / "kc"
    cluster2.write_kubeconfig(str(kubeconfig), context="cluster2")
    assert cli.main(["status", "-A", "--kubeconfig", str(kubeconfig)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "does not serve ServiceAccountImports: install multicluster-service-account there first." in err
    assert err.count("\n") == 1
