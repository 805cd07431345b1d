"""`kubemcsa allow` / `disallow`: the owner's export, pure plans and against two in-memory clusters with RBAC.

The source cluster's RBAC is the lock that does not depend on the consumer: these tests call the source with the
consumer controller's own credential, as a compromised controller would, and expect a 403 for anything not
exported to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from kubemcsa import cli
from kubemcsa.cli import allow
from kubemcsa.client import kube
from kubemcsa.contract import api
from kubemcsa.contract.credentials import from_secret_data
from kubemcsa.contract.export_policy import MAX_EXPORT_TO_ENTRIES, parse_export_to, parse_pattern
from kubemcsa_testing.wait import wait_for

CRD = Path(__file__).resolve().parents[1] / "manifests" / "crd" / "serviceaccountimports.yaml"
SYSTEM = api.SYSTEM_NAMESPACE
RBAC = "rbac.authorization.k8s.io"


def account(export_to: str | None = None, exported: bool = True) -> dict:
    meta: dict[str, Any] = {"name": "bot", "namespace": "team-x", "labels": {}, "annotations": {}}
    if exported:
        meta["labels"][api.EXPORTED_LABEL] = "true"
    if export_to is not None:
        meta["annotations"][api.EXPORT_TO_ANNOTATION] = export_to
    return {"metadata": meta}


def targets(*items: str) -> tuple:
    return allow.parse_targets(items)


# --- pure ----------------------------------------------------------------------------------------------------------


def test_allow_adds_to_what_the_owner_allowed_and_binds_each_named_cluster() -> None:
    plan = allow.plan_allow(account("cluster1/team-a, prod-*/ci"), targets("cluster3/*,cluster1/team-a"))
    assert [str(p) for p in plan.export_to] == ["cluster1/team-a", "prod-*/ci", "cluster3/*"]
    assert plan.consumers == ("cluster1", "cluster3")
    assert plan.service_account_patch == {
        "metadata": {"annotations": {api.EXPORT_TO_ANNOTATION: "cluster1/team-a, prod-*/ci, cluster3/*"}}
    }
    assert plan.role["rules"] == [
        {"apiGroups": [""], "resources": ["serviceaccounts/token"], "resourceNames": ["bot"], "verbs": ["create"]}
    ]
    assert plan.role["metadata"]["namespace"] == "team-x"
    assert [s["name"] for s in plan.binding["subjects"]] == ["cluster1", "cluster3"]
    assert {s["namespace"] for s in plan.binding["subjects"]} == {SYSTEM}


def test_allow_again_changes_nothing_on_the_account() -> None:
    first = allow.plan_allow(account(exported=False), targets("cluster1/team-a"))
    assert first.service_account_patch == {
        "metadata": {
            "labels": {api.EXPORTED_LABEL: "true"},
            "annotations": {api.EXPORT_TO_ANNOTATION: "cluster1/team-a"},
        }
    }
    assert allow.plan_allow(account("cluster1/team-a"), targets("cluster1/team-a")).service_account_patch is None


def test_disallow_removes_what_the_patterns_cover_and_says_what_still_allows() -> None:
    plan = allow.plan_disallow(account("cluster1/team-a, cluster1/ci-*, cluster3/*"), targets("cluster1/*"))
    assert [str(p) for p in plan.export_to] == ["cluster3/*"]
    assert plan.consumers == ("cluster3",)

    plan = allow.plan_disallow(account("cluster1/*"), targets("cluster1/team-a"))
    assert [str(p) for p in plan.export_to] == ["cluster1/*"]
    assert [(str(a), str(b)) for a, b in plan.still_allowed] == [("cluster1/team-a", "cluster1/*")]

    everything = allow.plan_disallow(account("cluster1/team-a"), None)
    assert everything.export_to == () and everything.role is None and everything.binding is None
    assert everything.service_account_patch == {
        "metadata": {"labels": {api.EXPORTED_LABEL: None}, "annotations": {api.EXPORT_TO_ANNOTATION: None}}
    }


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("prod-*/ci", "cluster part of 'prod-\\*/ci' is a pattern"),
        ("cluster1", "is not CLUSTER/NAMESPACE"),
        ("cluster1/Team_A", "namespace part"),
        (" , ", "--to is empty"),
    ],
)
def test_targets_on_the_command_line_are_strict(value: str, message: str) -> None:
    with pytest.raises(allow.AllowError, match=message):
        allow.parse_targets([value])


def test_long_names_stay_valid() -> None:
    name = "a" * 253
    assert len(allow.export_rbac_name(name)) <= 253
    assert allow.export_rbac_name(name) != allow.export_rbac_name("a" * 252 + "b")
    labels = allow.export_role("ns", name)["metadata"]["labels"]
    assert len(labels[allow.EXPORT_OF_LABEL]) <= 63


def test_the_written_annotation_parses_back() -> None:
    plan = allow.plan_allow(account(exported=False), targets("cluster1/team-a,cluster1/ci-*"))
    written = plan.service_account_patch["metadata"]["annotations"][api.EXPORT_TO_ANNOTATION]
    assert parse_export_to(written).patterns == (parse_pattern("cluster1/team-a"), parse_pattern("cluster1/ci-*"))


def test_an_annotation_over_the_cap_is_never_rewritten_without_what_it_says() -> None:
    over = ", ".join(f"cluster1/team-{i}" for i in range(MAX_EXPORT_TO_ENTRIES + 1))
    for plan in (
        lambda: allow.plan_allow(account(over), targets("cluster3/ci")),
        lambda: allow.plan_disallow(account(over), targets("cluster1/team-1")),
    ):
        with pytest.raises(allow.AllowError, match="left as it is rather than rewritten") as info:
            plan()
        assert str(info.value).count(". ") == 0 and "--all" in str(info.value)
    # Withdrawing everything needs nothing of what it says.
    assert allow.plan_disallow(account(over), None).export_to == ()


def test_allow_never_writes_what_consumers_would_not_read() -> None:
    at_cap = ", ".join(f"cluster1/team-{i}" for i in range(MAX_EXPORT_TO_ENTRIES))
    with pytest.raises(allow.AllowError, match="cover many namespaces with one pattern such as cluster1/team-"):
        allow.plan_allow(account(at_cap), targets("cluster3/ci"))
    assert len(allow.plan_allow(account(at_cap), targets("cluster1/team-0")).export_to) == MAX_EXPORT_TO_ENTRIES


def test_items_that_allowed_nobody_are_said_when_left_out() -> None:
    plan = allow.plan_allow(account("cluster1/team-a, oops, cluster1/Team_B"), targets("cluster3/ci"))
    assert [str(p) for p in plan.export_to] == ["cluster1/team-a", "cluster3/ci"]
    assert plan.dropped == ("oops", "cluster1/Team_B")  # as the owner wrote them


# --- against two clusters --------------------------------------------------------------------------------------------


@pytest.fixture
def clusters(cluster1, cluster2, kubeconfig_paths: dict[str, Path], tmp_path: Path, capsys) -> dict[str, Any]:
    """cluster1 (consumer) bootstrapped to import from cluster2 (source); in cluster2, namespace team-x with the
    service accounts bot and other, and a kubeconfig for team-x's admin (not a cluster admin)."""
    kube.Resource(cluster1.admin_client(), kube.CRDS).create(yaml.safe_load(CRD.read_text()))
    paths = kubeconfig_paths
    argv = ["bootstrap", "--target-context", "cluster1", "--target-kubeconfig", str(paths["cluster1"])]
    argv += ["--source-context", "cluster2", "--source-kubeconfig", str(paths["cluster2"])]
    assert cli.main(argv) == 0
    admin2 = cluster2.admin_client()
    kube.Resource(admin2, kube.NAMESPACES).create({"metadata": {"name": "team-x"}})
    for name in ("bot", "other", "owner"):
        kube.Resource(admin2, kube.SERVICE_ACCOUNTS).create({"metadata": {"name": name}}, "team-x")
    kube.Resource(admin2, kube.ROLE_BINDINGS).create(
        {
            "metadata": {"name": "owner-is-admin"},
            "roleRef": {"apiGroup": RBAC, "kind": "ClusterRole", "name": "admin"},
            "subjects": [{"kind": "ServiceAccount", "name": "owner", "namespace": "team-x"}],
        },
        "team-x",
    )
    owner_kubeconfig = tmp_path / "owner.yaml"
    cluster2.write_kubeconfig(str(owner_kubeconfig), context="cluster2", token=cluster2.issue_token("team-x", "owner"))
    secret = kube.Resource(cluster1.admin_client(), kube.SECRETS).get(api.secret_name_for_import("cluster2"), SYSTEM)
    controller_token = from_secret_data(secret["data"]).token
    capsys.readouterr()
    return {
        "cluster1": cluster1,
        "cluster2": cluster2,
        "owner": str(owner_kubeconfig),
        "as_controller": kube.Resource(cluster2.client_for_token(controller_token), kube.SERVICE_ACCOUNTS),
    }


def run(clusters: dict, verb: str, *args: str) -> int:
    return cli.main([verb, "bot", "-n", "team-x", "--context", "cluster2", "--kubeconfig", clusters["owner"], *args])


def mint(clusters: dict, name: str) -> dict:
    return clusters["as_controller"].create_subresource(name, "token", {"spec": {}}, "team-x")


def forbidden(clusters: dict, name: str) -> ApiException:
    with pytest.raises(ApiException) as info:
        mint(clusters, name)
    return info.value


def test_before_allow_the_source_refuses_the_controller_any_token(clusters) -> None:
    refused = forbidden(clusters, "bot")
    assert refused.status == 403
    assert kube.error_message(refused) == (
        'serviceaccounts "bot" is forbidden: User "system:serviceaccount:multicluster-service-account:cluster1" '
        'cannot create resource "serviceaccounts/token" in API group "" in the namespace "team-x"'
    )


def test_the_owner_allows_once_then_again_changes_nothing(clusters, capsys) -> None:
    assert run(clusters, "allow", "--to", "cluster1/team-a") == 0
    out = capsys.readouterr().out
    name = allow.export_rbac_name("bot")
    assert f"Role team-x/{name} created" in out
    assert f"RoleBinding team-x/{name} created" in out
    assert "ServiceAccount team-x/bot updated (export-to: cluster1/team-a)" in out
    assert "is exported to cluster1/team-a (RBAC lets cluster1 request its tokens)." in out
    admin2 = clusters["cluster2"].admin_client()
    bot = kube.Resource(admin2, kube.SERVICE_ACCOUNTS).get("bot", "team-x")
    assert bot["metadata"]["labels"][api.EXPORTED_LABEL] == "true"
    assert bot["metadata"]["annotations"][api.EXPORT_TO_ANNOTATION] == "cluster1/team-a"

    # The source's RBAC now lets cluster1's identity mint bot's tokens, and still no other account's.
    assert wait_for(lambda: _minted(clusters, "bot"), what="the RoleBinding to take effect")
    assert forbidden(clusters, "other").status == 403
    assert forbidden(clusters, "owner").status == 403

    versions = {
        kind: kube.Resource(admin2, rtype).get(n, "team-x")["metadata"]["resourceVersion"]
        for kind, rtype, n in (("sa", kube.SERVICE_ACCOUNTS, "bot"), ("role", kube.ROLES, name))
    }
    assert run(clusters, "allow", "--to", "cluster1/team-a") == 0
    out = capsys.readouterr().out
    assert "created" not in out and "updated" not in out
    assert {
        kind: kube.Resource(admin2, rtype).get(n, "team-x")["metadata"]["resourceVersion"]
        for kind, rtype, n in (("sa", kube.SERVICE_ACCOUNTS, "bot"), ("role", kube.ROLES, name))
    } == versions


def test_disallow_withdraws_the_label_and_the_rbac(clusters, capsys) -> None:
    assert run(clusters, "allow", "--to", "cluster1/team-a,cluster1/ci-*") == 0
    assert wait_for(lambda: _minted(clusters, "bot"), what="the RoleBinding to take effect")
    capsys.readouterr()

    assert run(clusters, "disallow", "--to", "cluster1/team-a") == 0
    out = capsys.readouterr().out
    assert "ServiceAccount team-x/bot updated (export-to: cluster1/ci-*)" in out
    assert _minted(clusters, "bot")  # cluster1 still has a namespace allowed: its RBAC stays

    assert run(clusters, "disallow", "--all") == 0
    out = capsys.readouterr().out
    name = allow.export_rbac_name("bot")
    assert "ServiceAccount team-x/bot updated (export-to: nobody)" in out
    assert f"RoleBinding team-x/{name} deleted" in out and f"Role team-x/{name} deleted" in out
    assert "Tokens already issued stay valid until they expire" in out
    bot = kube.Resource(clusters["cluster2"].admin_client(), kube.SERVICE_ACCOUNTS).get("bot", "team-x")
    assert api.EXPORTED_LABEL not in (bot["metadata"].get("labels") or {})
    assert api.EXPORT_TO_ANNOTATION not in (bot["metadata"].get("annotations") or {})
    assert wait_for(lambda: not _minted(clusters, "bot"), what="the RBAC to be withdrawn")

    assert run(clusters, "disallow", "--all") == 0
    assert "ServiceAccount team-x/bot unchanged" in capsys.readouterr().out


def test_errors_are_one_sentence(clusters, capsys) -> None:
    assert cli.main(["allow", "nope", "-n", "team-x", "--context", "cluster2", "--kubeconfig", clusters["owner"],
                     "--to", "cluster1/team-a"]) == cli.EXIT_ERROR  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "service account team-x/nope in cluster 'cluster2' does not exist" in err

    # team-x's admin may not export an account of another namespace.
    assert cli.main(["allow", "cluster1", "-n", SYSTEM, "--context", "cluster2", "--kubeconfig", clusters["owner"],
                     "--to", "cluster1/team-a"]) == cli.EXIT_ERROR  # fmt: skip
    assert "you may not read service account multicluster-service-account/cluster1" in capsys.readouterr().err

    assert run(clusters, "allow", "--to", "prod-*/ci") == cli.EXIT_ERROR
    assert "is a pattern; name each consumer cluster" in capsys.readouterr().err


def test_allow_leaves_an_annotation_it_cannot_read_as_it_is(clusters, capsys) -> None:
    accounts = kube.Resource(clusters["cluster2"].admin_client(), kube.SERVICE_ACCOUNTS)
    over = "cluster1/team-a " * (MAX_EXPORT_TO_ENTRIES + 1)
    accounts.patch("bot", {"metadata": {"annotations": {api.EXPORT_TO_ANNOTATION: over}}}, "team-x")
    before = accounts.get("bot", "team-x")["metadata"]["resourceVersion"]
    assert run(clusters, "allow", "--to", "cluster1/ci") == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "shorten it with kubectl annotate" in err
    assert accounts.get("bot", "team-x")["metadata"]["resourceVersion"] == before
    assert forbidden(clusters, "bot").status == 403  # nothing was granted either

    assert run(clusters, "disallow", "--all") == 0
    assert api.EXPORT_TO_ANNOTATION not in (accounts.get("bot", "team-x")["metadata"].get("annotations") or {})
    capsys.readouterr()

    accounts.patch("bot", {"metadata": {"annotations": {api.EXPORT_TO_ANNOTATION: "cluster1/team-a, oops"}}}, "team-x")
    assert run(clusters, "allow", "--to", "cluster1/ci") == 0
    assert "Note: export-to no longer lists 'oops', which is not CLUSTER/NAMESPACE" in capsys.readouterr().out
    exported = accounts.get("bot", "team-x")["metadata"]["annotations"][api.EXPORT_TO_ANNOTATION]
    assert exported == "cluster1/team-a, cluster1/ci"


def _minted(clusters: dict, name: str) -> bool:
    try:
        return bool(mint(clusters, name)["status"]["token"])
    except ApiException as exc:
        if exc.status == 403:
            return False
        raise
