"""`kubemcsa export | kubectl apply -f -` across two in-memory clusters."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from kubemcsa import cli
from kubemcsa.cli import export
from kubemcsa.client import kube
from kubemcsa.contract.credentials import from_secret_data


def pod_lister(server) -> None:
    """The Getting Started service account: may list pods in default, nothing else."""
    admin = server.admin_client()
    kube.Resource(admin, kube.SERVICE_ACCOUNTS).create({"metadata": {"name": "pod-lister"}}, "default")
    kube.Resource(admin, kube.ROLES).create(
        {"metadata": {"name": "pod-lister"}, "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]},
        "default",
    )
    kube.Resource(admin, kube.ROLE_BINDINGS).create(
        {
            "metadata": {"name": "pod-lister"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-lister"},
            "subjects": [{"kind": "ServiceAccount", "name": "pod-lister", "namespace": "default"}],
        },
        "default",
    )


def kubeconfig(server, tmp_path: Path) -> str:
    path = tmp_path / f"{server.name}.yaml"
    server.write_kubeconfig(str(path), context=server.name)
    return str(path)


def kubectl() -> str | None:
    bin_dir = str(Path(sys.executable).parent)
    return shutil.which("kubectl", path=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")


def test_export_then_apply_gives_a_secret_that_acts_as_the_service_account_and_nothing_more(
    cluster1, cluster2, tmp_path, capsys
) -> None:
    pod_lister(cluster2)
    argv = ["export", "pod-lister", "-n", "default", "--kubeconfig", kubeconfig(cluster2, tmp_path)]
    assert cli.main([*argv, "--as", "cluster2-pod-lister", "--duration", "2h"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    manifest = yaml.safe_load(captured.out)
    assert manifest["metadata"]["name"] == "cluster2-pod-lister"
    expiry = dt.datetime.fromisoformat(manifest["metadata"]["annotations"][export.EXPIRATION_ANNOTATION])
    assert dt.timedelta(hours=1) < expiry - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=2, minutes=1)

    binary = kubectl()
    # --validate=false: the in-memory server does not serve OpenAPI documents, which kubectl validates against.
    if binary is None:  # the API call kubectl would make
        kube.Resource(cluster1.admin_client(), kube.SECRETS).create(manifest, "default")
    else:
        done = subprocess.run(
            [
                binary,
                "--kubeconfig",
                kubeconfig(cluster1, tmp_path),
                "apply",
                "--validate=false",
                "-n",
                "default",
                "-f",
                "-",
            ],
            input=captured.out,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "secret/cluster2-pod-lister" in done.stdout

    applied = kube.Resource(cluster1.admin_client(), kube.SECRETS).get("cluster2-pod-lister", "default")
    creds = from_secret_data(applied["data"])
    assert creds.server == cluster2.url
    assert creds.namespace == "default"
    as_sa = cluster2.client_for_token(creds.token)
    assert kube.Resource(as_sa, kube.PODS).list("default")["kind"] == "PodList"
    for attempt in (
        lambda: kube.Resource(as_sa, kube.PODS).list("kube-system"),
        lambda: kube.Resource(as_sa, kube.SECRETS).list("default"),
        lambda: kube.Resource(as_sa, kube.PODS).create(
            {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}, "default"
        ),
    ):
        with pytest.raises(ApiException) as info:
            attempt()
        assert info.value.status == 403


def test_the_annotation_shows_the_servers_real_expiration_when_it_caps_the_duration(
    api_server_factory, tmp_path, capsys
) -> None:
    capped = api_server_factory(name="capped", max_token_expiration_seconds=900)
    pod_lister(capped)
    assert cli.main(["export", "pod-lister", "--kubeconfig", kubeconfig(capped, tmp_path), "--duration", "24h"]) == 0
    manifest = yaml.safe_load(capsys.readouterr().out)
    expiry = dt.datetime.fromisoformat(manifest["metadata"]["annotations"][export.EXPIRATION_ANNOTATION])
    assert expiry - dt.datetime.now(dt.UTC) <= dt.timedelta(seconds=901)
    assert manifest["metadata"]["name"] == "pod-lister-token"


def test_legacy_export_gives_a_long_lived_token(cluster2, tmp_path, capsys) -> None:
    pod_lister(cluster2)
    assert cli.main(["export", "pod-lister", "--legacy", "--kubeconfig", kubeconfig(cluster2, tmp_path)]) == 0
    manifest = yaml.safe_load(capsys.readouterr().out)
    assert export.EXPIRATION_ANNOTATION not in manifest["metadata"]["annotations"]
    creds = from_secret_data(manifest["data"])
    assert kube.Resource(cluster2.client_for_token(creds.token), kube.PODS).list("default")["kind"] == "PodList"


def test_a_missing_service_account_is_one_sentence_naming_it(cluster2, tmp_path, capsys) -> None:
    code = cli.main(["export", "ghost", "-n", "default", "--kubeconfig", kubeconfig(cluster2, tmp_path)])
    assert code == cli.EXIT_ERROR
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == (
        "kubemcsa export: error: service account default/ghost was not found in cluster 'cluster2' "
        "(context 'cluster2'); check its name and namespace (-n)."
    )


def test_export_without_the_right_to_request_tokens_says_so(cluster2, tmp_path, capsys) -> None:
    pod_lister(cluster2)
    token = cluster2.issue_token("default", "pod-lister")
    path = tmp_path / "weak.yaml"
    cluster2.write_kubeconfig(str(path), context="weak", token=token)
    assert cli.main(["export", "pod-lister", "--kubeconfig", str(path)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "you may not do this with service account default/pod-lister" in err
    assert token not in err
