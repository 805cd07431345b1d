"""`kubemcsa bootstrap` against two in-memory clusters: from nothing, idempotent, least privilege, end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from kubemcsa import cli
from kubemcsa.cli import bootstrap_plan
from kubemcsa.client import kube
from kubemcsa.contract import api
from kubemcsa.contract.credentials import from_secret_data
from kubemcsa_testing.wait import wait_for

CRD = Path(__file__).resolve().parents[1] / "manifests" / "crd" / "serviceaccountimports.yaml"
SYSTEM = api.SYSTEM_NAMESPACE


@pytest.fixture
def clusters(cluster1, cluster2, kubeconfig_paths: dict[str, Path]) -> dict[str, Any]:
    """cluster1 (target, with the CRD installed) and cluster2 (source), each with its own kubeconfig file."""
    kube.Resource(cluster1.admin_client(), kube.CRDS).create(yaml.safe_load(CRD.read_text()))
    return {"cluster1": cluster1, "cluster2": cluster2, "paths": kubeconfig_paths}


def bootstrap_argv(clusters: dict[str, Any], *extra: str) -> list[str]:
    return [
        "bootstrap",
        "--target-context",
        "cluster1",
        "--target-kubeconfig",
        str(clusters["paths"]["cluster1"]),
        "--source-context",
        "cluster2",
        "--source-kubeconfig",
        str(clusters["paths"]["cluster2"]),
        *extra,
    ]


def snapshot(clusters: dict[str, Any]) -> dict[str, str]:
    """The resourceVersion of every object bootstrap manages, in both clusters."""
    c1, c2 = clusters["cluster1"].admin_client(), clusters["cluster2"].admin_client()
    name = bootstrap_plan.rbac_name_for_target("cluster1")
    own = bootstrap_plan.rbac_name_for_target("cluster1", bootstrap_plan.OWN_TOKEN_SUFFIX)
    objects = {
        "src ns": (c2, kube.NAMESPACES, SYSTEM, None),
        "src sa": (c2, kube.SERVICE_ACCOUNTS, "cluster1", SYSTEM),
        "src role": (c2, kube.CLUSTER_ROLES, name, None),
        "src binding": (c2, kube.CLUSTER_ROLE_BINDINGS, name, None),
        "src own role": (c2, kube.ROLES, own, SYSTEM),
        "src own binding": (c2, kube.ROLE_BINDINGS, own, SYSTEM),
        "dst ns": (c1, kube.NAMESPACES, SYSTEM, None),
        "dst sai": (c1, kube.SERVICE_ACCOUNT_IMPORTS, "cluster2", SYSTEM),
        "dst secret": (c1, kube.SECRETS, api.secret_name_for_import("cluster2"), SYSTEM),
    }
    return {
        key: kube.Resource(client, rtype).get(obj_name, ns)["metadata"]["resourceVersion"]
        for key, (client, rtype, obj_name, ns) in objects.items()
    }


def test_bootstrap_from_nothing_then_a_second_run_changes_nothing(clusters, capsys) -> None:
    assert cli.main(bootstrap_argv(clusters)) == 0
    out = capsys.readouterr().out
    assert "source cluster 'cluster2': Namespace multicluster-service-account created" in out
    assert "source cluster 'cluster2': ServiceAccount multicluster-service-account/cluster1 created" in out
    assert "target cluster 'cluster1': ServiceAccountImport multicluster-service-account/cluster2 created" in out
    assert "target cluster 'cluster1': Secret multicluster-service-account/cluster2-token created" in out
    before = snapshot(clusters)

    c1 = clusters["cluster1"].admin_client()
    sai = kube.Resource(c1, kube.SERVICE_ACCOUNT_IMPORTS).get("cluster2", SYSTEM)
    thirty_days = 30 * 86400
    assert sai["spec"] == {
        "clusterName": "cluster2",
        "namespace": SYSTEM,
        "name": "cluster1",
        "expirationSeconds": thirty_days,
    }
    secret = kube.Resource(c1, kube.SECRETS).get("cluster2-token", SYSTEM)
    assert secret["metadata"]["labels"][api.IMPORT_LABEL] == "cluster2"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == sai["metadata"]["uid"]
    creds = from_secret_data(secret["data"])
    assert creds.server == clusters["cluster2"].url
    assert creds.token not in out

    assert cli.main(bootstrap_argv(clusters)) == 0
    out = capsys.readouterr().out
    assert "created" not in out and "updated" not in out
    assert sum(line.endswith(" unchanged") for line in out.splitlines()) == 9
    assert "Nothing to do" in out
    assert snapshot(clusters) == before


def test_the_credential_mints_only_its_own_token_and_sees_which_accounts_exist(clusters, capsys) -> None:
    assert cli.main(bootstrap_argv(clusters)) == 0
    capsys.readouterr()
    c1, cluster2 = clusters["cluster1"].admin_client(), clusters["cluster2"]
    admin2 = cluster2.admin_client()
    kube.Resource(admin2, kube.SERVICE_ACCOUNTS).create({"metadata": {"name": "pod-lister"}}, "default")
    creds = from_secret_data(kube.Resource(c1, kube.SECRETS).get("cluster2-token", SYSTEM)["data"])
    as_controller = cluster2.client_for_token(creds.token)

    accounts = kube.Resource(as_controller, kube.SERVICE_ACCOUNTS)
    issued = accounts.create_subresource("cluster1", "token", {"spec": {"expirationSeconds": 3600}}, SYSTEM)
    assert issued["status"]["token"]
    assert accounts.list(label_selector=api.EXPORTED_SELECTOR)["items"] == []
    assert accounts.watch(label_selector=api.EXPORTED_SELECTOR, timeout_seconds=1) is not None
    # No free minting: not an account of another namespace, nor of kube-system, nor a sibling in its own.
    kube.Resource(admin2, kube.SERVICE_ACCOUNTS).create({"metadata": {"name": "cluster3"}}, SYSTEM)
    for ns, name in (("default", "pod-lister"), ("kube-system", "default"), (SYSTEM, "cluster3")):
        with pytest.raises(ApiException) as info:
            accounts.create_subresource(name, "token", {"spec": {}}, ns)
        assert info.value.status == 403
    for attempt in (
        lambda: accounts.get("pod-lister", "default"),
        lambda: kube.Resource(as_controller, kube.SECRETS).list("default"),
        lambda: kube.Resource(as_controller, kube.SECRETS).get("anything", SYSTEM),
        lambda: kube.Resource(as_controller, kube.SECRETS).create({"metadata": {"name": "x"}}, "default"),
        lambda: kube.Resource(as_controller, kube.SERVICE_ACCOUNTS).create({"metadata": {"name": "y"}}, "default"),
        lambda: kube.Resource(as_controller, kube.PODS).list("default"),
    ):
        with pytest.raises(ApiException) as info:
            attempt()
        assert info.value.status == 403


def test_source_namespaces_narrow_the_grant_and_a_rerun_removes_the_cluster_wide_one(clusters, capsys) -> None:
    assert cli.main(bootstrap_argv(clusters)) == 0
    admin2 = clusters["cluster2"].admin_client()
    for ns in ("team-a", "team-b"):
        kube.Resource(admin2, kube.NAMESPACES).create({"metadata": {"name": ns}})
        kube.Resource(admin2, kube.SERVICE_ACCOUNTS).create({"metadata": {"name": "bot"}}, ns)
    capsys.readouterr()

    assert cli.main(bootstrap_argv(clusters, "--source-namespaces", "team-a")) == 0
    out = capsys.readouterr().out
    name = bootstrap_plan.rbac_name_for_target("cluster1")
    assert f"ClusterRoleBinding {name} deleted" in out
    assert f"RoleBinding team-a/{name} created" in out
    c1 = clusters["cluster1"].admin_client()
    creds = from_secret_data(kube.Resource(c1, kube.SECRETS).get("cluster2-token", SYSTEM)["data"])
    accounts = kube.Resource(clusters["cluster2"].client_for_token(creds.token), kube.SERVICE_ACCOUNTS)
    assert [sa["metadata"]["name"] for sa in accounts.list("team-a")["items"]] == ["bot", "default"]
    for attempt in (lambda: accounts.list("team-b"), lambda: accounts.list()):
        with pytest.raises(ApiException) as info:
            attempt()
        assert info.value.status == 403
    # Its own token still, through the Role in its namespace.
    assert accounts.create_subresource("cluster1", "token", {"spec": {}}, SYSTEM)["status"]["token"]
    with pytest.raises(ApiException) as info:
        accounts.create_subresource("bot", "token", {"spec": {}}, "team-a")
    assert info.value.status == 403


def test_a_missing_source_namespace_and_a_missing_crd_are_one_sentence_each(
    kubeconfig_paths: dict[str, Path], capsys
) -> None:
    clusters = {"paths": kubeconfig_paths}
    assert cli.main(bootstrap_argv(clusters, "--source-namespaces", "nope")) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "source cluster 'cluster2' has no namespace 'nope'" in err

    assert cli.main(bootstrap_argv(clusters)) == cli.EXIT_ERROR  # no CRD in cluster1
    captured = capsys.readouterr()
    assert "target cluster 'cluster1' does not serve ServiceAccountImport" in captured.err
    assert captured.err.strip().count("\n") == 0


def test_a_cluster_name_that_is_not_a_kubernetes_name_gets_a_suggestion(clusters, capsys) -> None:
    argv = bootstrap_argv(clusters, "--source-name", "gke_my-project_europe-west1_prod")
    assert cli.main(argv) == cli.EXIT_ERROR
    assert "pass --source-name gke-my-project-europe-west1-prod" in capsys.readouterr().err


def test_bootstrap_then_an_import_works_through_the_running_controller(clusters, capsys) -> None:
    controller_run = pytest.importorskip("controller.run")
    assert cli.main(bootstrap_argv(clusters)) == 0
    capsys.readouterr()
    admin1, admin2 = clusters["cluster1"].admin_client(), clusters["cluster2"].admin_client()
    kube.Resource(admin2, kube.SERVICE_ACCOUNTS).create({"metadata": {"name": "pod-lister"}}, "default")
    kube.Resource(admin2, kube.ROLES).create(
        {"metadata": {"name": "pod-lister"}, "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]},
        "default",
    )
    kube.Resource(admin2, kube.ROLE_BINDINGS).create(
        {
            "metadata": {"name": "pod-lister"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-lister"},
            "subjects": [{"kind": "ServiceAccount", "name": "pod-lister", "namespace": "default"}],
        },
        "default",
    )
    secret_version = kube.Resource(admin1, kube.SECRETS).get("cluster2-token", SYSTEM)["metadata"]["resourceVersion"]
    # The owner exports it to namespace default of cluster1.
    allow_argv = ["allow", "pod-lister", "-n", "default", "--context", "cluster2", "--to", "cluster1/default"]
    assert cli.main([*allow_argv, "--kubeconfig", str(clusters["paths"]["cluster2"])]) == 0
    controller = controller_run.Controller(
        clusters["cluster1"].admin_client(), controller_run.Options(leader_election=False)
    )
    controller.start()
    try:
        assert controller.wait_until_ready(20)
        kube.Resource(admin1, kube.SERVICE_ACCOUNT_IMPORTS).create(
            {
                "apiVersion": api.API_VERSION,
                "kind": api.KIND,
                "metadata": {"name": "cluster2-default-pod-lister"},
                "spec": {"clusterName": "cluster2", "namespace": "default", "name": "pod-lister"},
            },
            "default",
        )
        secrets = kube.Resource(admin1, kube.SECRETS)

        def imported() -> dict | None:
            try:
                return secrets.get(api.secret_name_for_import("cluster2-default-pod-lister"), "default")
            except ApiException:
                return None

        secret = wait_for(imported, what="the import's Secret")
        creds = from_secret_data(secret["data"])
        as_pod_lister = clusters["cluster2"].client_for_token(creds.token)
        assert kube.Resource(as_pod_lister, kube.PODS).list("default")["items"] == []
        # The bootstrap import itself is refreshed by the controller and reported Ready.
        sai = wait_for(
            lambda: next(
                (
                    c
                    for c in (
                        kube.Resource(admin1, kube.SERVICE_ACCOUNT_IMPORTS).get("cluster2", SYSTEM).get("status") or {}
                    ).get("conditions")
                    or []
                    if c.get("type") == "Ready" and c.get("status") == "True"
                ),
                None,
            ),
            what="the bootstrap import to be Ready",
        )
        assert sai["reason"] == api.REASON_TOKEN_ISSUED
        # The controller adopted bootstrap's Secret as it was: no token request for its own credential.
        own = [r for r in clusters["cluster2"].requests if r.subresource == "token" and r.name == "cluster1"]
        assert len(own) == 1  # bootstrap's, made with the admin's credentials
        assert kube.Resource(admin1, kube.SECRETS).get("cluster2-token", SYSTEM)["metadata"]["resourceVersion"] == (
            secret_version
        )
        # A second bootstrap after the controller refreshed the Secret still changes nothing, and --wait sees Ready.
        assert cli.main(bootstrap_argv(clusters, "--wait", "20")) == 0
        out = capsys.readouterr().out
        assert "Nothing to do" in out
        assert "Import multicluster-service-account/cluster2 is Ready" in out
    finally:
        controller.stop()


def test_wait_without_a_controller_fails_with_the_reason(clusters, capsys) -> None:
    assert cli.main(bootstrap_argv(clusters, "--wait", "0.3")) == cli.EXIT_ERROR
    captured = capsys.readouterr()
    assert "Bootstrap complete" in captured.out
    assert "has not reported import multicluster-service-account/cluster2 Ready within 0.3s (NotReconciled" in (
        captured.err
    )


def test_a_tampered_or_changed_object_is_updated_and_said(clusters, capsys) -> None:
    assert cli.main(bootstrap_argv(clusters)) == 0
    capsys.readouterr()
    admin1, admin2 = clusters["cluster1"].admin_client(), clusters["cluster2"].admin_client()
    name = bootstrap_plan.rbac_name_for_target("cluster1")
    roles = kube.Resource(admin2, kube.CLUSTER_ROLES)
    role = roles.get(name)
    role["rules"] = role["rules"][:1]
    roles.replace(role)
    kube.Resource(admin1, kube.SERVICE_ACCOUNT_IMPORTS).patch("cluster2", {"spec": {"name": "someone-else"}}, SYSTEM)
    secret_before = kube.Resource(admin1, kube.SECRETS).get("cluster2-token", SYSTEM)

    assert cli.main(bootstrap_argv(clusters, "--legacy-tokens", "--allow-all-service-accounts")) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert captured.err.startswith("WARNING: --allow-all-service-accounts lets the controller of cluster 'cluster1'")
    assert f"ClusterRole {name} updated" in out
    assert "ServiceAccountImport multicluster-service-account/cluster2 updated" in out
    assert "Secret multicluster-service-account/cluster2-token unchanged" in out
    assert "Bootstrap complete: 0 created, 2 updated, 0 deleted, 7 unchanged." in out
    assert kube.Resource(admin1, kube.SERVICE_ACCOUNT_IMPORTS).get("cluster2", SYSTEM)["spec"]["name"] == "cluster1"
    after = kube.Resource(admin1, kube.SECRETS).get("cluster2-token", SYSTEM)
    assert after["metadata"]["resourceVersion"] == secret_before["metadata"]["resourceVersion"]

    # --legacy-tokens let the controller create and read token Secrets, still not list them.
    creds = from_secret_data(after["data"])
    secrets = kube.Resource(clusters["cluster2"].client_for_token(creds.token), kube.SECRETS)
    body = {
        "metadata": {"name": "x-kubemcsa-token", "annotations": {"kubernetes.io/service-account.name": "cluster1"}},
        "type": "kubernetes.io/service-account-token",
    }
    secrets.create(body, SYSTEM)
    assert secrets.get("x-kubemcsa-token", SYSTEM)["metadata"]["name"] == "x-kubemcsa-token"
    with pytest.raises(ApiException) as info:
        secrets.list(SYSTEM)
    assert info.value.status == 403


def test_a_deleted_secret_or_a_recreated_import_gets_a_fresh_secret(clusters, capsys) -> None:
    assert cli.main(bootstrap_argv(clusters)) == 0
    admin1 = clusters["cluster1"].admin_client()
    kube.Resource(admin1, kube.SECRETS).delete("cluster2-token", SYSTEM)
    capsys.readouterr()
    assert cli.main(bootstrap_argv(clusters)) == 0
    assert "Secret multicluster-service-account/cluster2-token created" in capsys.readouterr().out

    imports = kube.Resource(admin1, kube.SERVICE_ACCOUNT_IMPORTS)
    imports.delete("cluster2", SYSTEM)
    wait_for(lambda: not imports.list(SYSTEM)["items"], what="the import to be gone")
    assert cli.main(bootstrap_argv(clusters)) == 0
    out = capsys.readouterr().out
    assert "ServiceAccountImport multicluster-service-account/cluster2 created" in out
    uid = imports.get("cluster2", SYSTEM)["metadata"]["uid"]
    secret = kube.Resource(admin1, kube.SECRETS).get("cluster2-token", SYSTEM)
    assert [ref["uid"] for ref in secret["metadata"]["ownerReferences"]] == [uid]
