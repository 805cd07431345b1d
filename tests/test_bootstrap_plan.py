"""The pure part of bootstrap: names, the plan, comparing and merging objects, the first Secret."""

from __future__ import annotations

import base64
import datetime as dt
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubemcsa.cli import bootstrap, bootstrap_plan
from kubemcsa.client import apply
from kubemcsa.contract import api, imports
from kubemcsa.contract.credentials import Credentials, from_secret_data
from kubemcsa.contract.imports import IssuedToken

NOW_TS = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC).timestamp()
CA = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def test_plan_cluster_wide() -> None:
    plan = bootstrap_plan.plan("cluster1", "cluster2")
    kinds = [o["kind"] for o in plan.source]
    assert kinds == ["Namespace", "ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"]
    sa = by_kind(plan.source, "ServiceAccount")[0]
    assert sa["metadata"] == {
        "name": "cluster1",
        "namespace": api.SYSTEM_NAMESPACE,
        "labels": {bootstrap.MANAGED_BY_LABEL: bootstrap.MANAGED_BY_VALUE},
    }
    # No free minting: tokens for its own account only (to rotate its credential), and seeing which are exported.
    own = by_kind(plan.source, "Role")[0]
    assert own["metadata"]["namespace"] == api.SYSTEM_NAMESPACE
    assert own["rules"] == [
        {"apiGroups": [""], "resources": ["serviceaccounts/token"], "resourceNames": ["cluster1"], "verbs": ["create"]}
    ]
    own_binding = by_kind(plan.source, "RoleBinding")[0]
    assert own_binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": own["metadata"]["name"],
    }
    assert own_binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "cluster1", "namespace": api.SYSTEM_NAMESPACE}
    ]
    rules = by_kind(plan.source, "ClusterRole")[0]["rules"]
    granted = {(r, v) for rule in rules for r in rule["resources"] for v in rule["verbs"]}
    assert granted == {("serviceaccounts", "list"), ("serviceaccounts", "watch")}
    binding = by_kind(plan.source, "ClusterRoleBinding")[0]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "cluster1", "namespace": api.SYSTEM_NAMESPACE}]
    assert binding["roleRef"]["name"] == plan.rbac_name
    sai = by_kind(plan.target, api.KIND)[0]
    assert sai["metadata"]["name"] == "cluster2"
    assert sai["metadata"]["namespace"] == api.SYSTEM_NAMESPACE
    assert sai["spec"] == {
        "clusterName": "cluster2",
        "namespace": api.SYSTEM_NAMESPACE,
        "name": "cluster1",
        "expirationSeconds": bootstrap_plan.DEFAULT_CREDENTIAL_SECONDS,
    }


def test_plan_with_source_namespaces_binds_only_there_and_legacy_adds_secrets() -> None:
    plan = bootstrap_plan.plan(
        "c1",
        "c2",
        source_namespaces=["team-a", " team-b", "team-a", ""],
        legacy_tokens=True,
        allow_all_service_accounts=True,
    )
    assert not by_kind(plan.source, "ClusterRoleBinding")
    bindings = by_kind(plan.source, "RoleBinding")
    assert [o["metadata"]["namespace"] for o in bindings] == [api.SYSTEM_NAMESPACE, "team-a", "team-b"]
    assert bindings[0]["metadata"]["name"] != bindings[1]["metadata"]["name"]
    rules = by_kind(plan.source, "ClusterRole")[0]["rules"]
    assert {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "get"]} in rules
    assert {"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]} in rules


def test_the_open_model_needs_its_loud_flag_and_says_what_it_gives_away() -> None:
    with pytest.raises(bootstrap.BootstrapError, match="add --allow-all-service-accounts"):
        bootstrap_plan.plan("c1", "c2", legacy_tokens=True)
    plan = bootstrap_plan.plan("c1", "c2", allow_all_service_accounts=True)
    rules = by_kind(plan.source, "ClusterRole")[0]["rules"]
    assert {"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]} in rules
    warning = bootstrap_plan.allow_all_warning(plan)
    assert warning.startswith("WARNING:") and "ANY service account" in warning and "kube-system" in warning
    narrowed = bootstrap_plan.plan("c1", "c2", source_namespaces=["a"], allow_all_service_accounts=True)
    assert "in namespaces a" in bootstrap_plan.allow_all_warning(narrowed)


def test_the_own_token_rbac_name_fits_for_long_target_names() -> None:
    target = "c" * 253
    plan = bootstrap_plan.plan(target, "c2")
    names = {o["metadata"]["name"] for o in plan.source if o["kind"] in ("Role", "ClusterRole")}
    assert len(names) == 2 and all(len(n) <= 253 for n in names)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_name": "gke_proj_zone_c1", "source_name": "c2"}, "--target-name gke-proj-zone-c1"),
        (
            {"target_name": "c1", "source_name": "arn:aws:eks:x:1:cluster/c2"},
            "--source-name arn-aws-eks-x-1-cluster-c2",
        ),
        ({"target_name": "c1", "source_name": "c2", "source_namespaces": [" ", ""]}, "is empty"),
        ({"target_name": "c1", "source_name": "c2", "source_namespaces": ["Bad_NS"]}, "not a valid namespace"),
    ],
)
def test_invalid_names_are_refused_with_a_suggestion(kwargs: dict, message: str) -> None:
    with pytest.raises(bootstrap.BootstrapError, match=message):
        bootstrap_plan.plan(**kwargs)


@given(st.text(max_size=300))
def test_suggested_names_are_always_valid(value: str) -> None:
    assert api.is_dns_subdomain(bootstrap_plan.suggest_name(value))


def test_long_target_names_still_give_valid_rbac_names_and_labels() -> None:
    target = ("a" * 60 + ".") * 4
    target = target[:250].rstrip(".")
    plan = bootstrap_plan.plan(target, "c2")
    assert len(plan.rbac_name) <= 253
    assert len(plan.target_label) <= 63


def test_is_subset_tolerates_server_defaults_but_not_differences() -> None:
    desired = {"subjects": [{"kind": "ServiceAccount", "name": "x"}], "spec": {"a": 1}}
    assert apply.is_subset(
        desired, {"subjects": [{"kind": "ServiceAccount", "name": "x", "apiGroup": ""}], "spec": {"a": 1, "b": 2}}
    )
    assert not apply.is_subset(desired, {"subjects": [{"kind": "ServiceAccount", "name": "y"}], "spec": {"a": 1}})
    assert not apply.is_subset({"l": [1, 2]}, {"l": [1]})
    assert apply.is_subset({"l": [], "x": None}, {})


def test_needs_update_merged_and_recreate() -> None:
    desired = bootstrap_plan.plan("c1", "c2").source[3]  # the ClusterRoleBinding
    existing = json.loads(json.dumps(desired))
    existing["metadata"].update(resourceVersion="7", uid="u", labels={**desired["metadata"]["labels"], "extra": "kept"})
    assert not apply.needs_update(existing, desired)
    existing["subjects"] = []
    assert apply.needs_update(existing, desired)
    body = apply.merged(existing, desired)
    assert body["metadata"]["resourceVersion"] == "7"
    assert body["metadata"]["labels"]["extra"] == "kept"
    assert body["subjects"] == desired["subjects"]
    assert not apply.needs_recreate(existing, desired)
    existing["roleRef"] = {**desired["roleRef"], "name": "other"}
    assert apply.needs_recreate(existing, desired)


def test_stale_bindings_are_only_managed_ones_the_plan_dropped() -> None:
    cluster_wide = bootstrap_plan.plan("c1", "c2")
    namespaced = bootstrap_plan.plan("c1", "c2", source_namespaces=["a"])
    existing = [o for o in cluster_wide.source if o["kind"] == "ClusterRoleBinding"]
    unmanaged = {"kind": "RoleBinding", "metadata": {"name": "x", "namespace": "b", "labels": {}}}
    wanted = [o for o in namespaced.source if o["kind"].endswith("Binding")]
    stale = apply.stale_bindings([*existing, unmanaged, *wanted], wanted)
    assert [o["kind"] for o in stale] == ["ClusterRoleBinding"]


def imported(uid: str = "uid-1") -> dict:
    sai = bootstrap_plan.plan("c1", "c2").target[1]
    return {**sai, "metadata": {**sai["metadata"], "uid": uid}}


def secret_with(
    token: str = "tok", uid: str = "uid-1", server: str = "https://c2:6443", issued_at: float = NOW_TS
) -> dict:
    """The bootstrap import's Secret, as bootstrap writes it."""
    imp = imported(uid)
    creds = Credentials(server=server, ca_crt=CA, token=token, namespace=api.SYSTEM_NAMESPACE)
    lifetime = bootstrap_plan.DEFAULT_CREDENTIAL_SECONDS
    issued = IssuedToken(token, issued_at, issued_at + lifetime)
    held = imports.ImportToken(creds, issued, bootstrap_plan.wanted_inputs(imp, server, CA))
    return imports.import_secret(imp, held, "c2")


def test_import_secret_is_labelled_owned_and_holds_the_five_keys() -> None:
    secret = secret_with("tok-1")
    assert secret["metadata"]["name"] == api.secret_name_for_import("c2")
    assert secret["metadata"]["labels"] == {api.IMPORT_LABEL: "c2"}
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert secret["metadata"]["ownerReferences"][0]["controller"] is True
    assert sorted(secret["data"]) == sorted(api.SECRET_KEYS)
    assert from_secret_data(secret["data"]).token == "tok-1"
    assert "cluster: c2" in base64.b64decode(secret["data"]["config"]).decode()


def test_the_plan_asks_for_the_credential_duration() -> None:
    assert imported()["spec"]["expirationSeconds"] == 30 * 86400
    sai = bootstrap_plan.plan("c1", "c2", credential_seconds=3600).target[1]
    assert sai["spec"]["expirationSeconds"] == 3600


def is_current(
    secret: dict, uid: str = "uid-1", server: str = "https://c2:6443", now: float = NOW_TS, pinned: bool = True
) -> bool:
    imp = imported(uid)  # as bootstrap or the controller pinned the Secret it wrote
    imp["status"] = {imports.STATUS_PINS: [imports.credential_pin(secret)] if pinned else []}
    return bootstrap_plan.secret_is_current(secret, imp, server=server, ca_pem=CA, now=now)


def test_a_secret_nobody_pinned_is_replaced_even_if_it_looks_current() -> None:
    good = secret_with()
    assert is_current(good)
    assert not is_current(good, pinned=False)  # written before pins, or by someone else: bootstrap re-issues it


def test_secret_is_current_keeps_a_good_token_and_replaces_a_bad_one() -> None:
    good = secret_with()
    assert is_current(good)
    assert not is_current(good, uid="uid-2")  # import recreated
    assert not is_current(good, server="https://elsewhere:6443")
    lifetime = bootstrap_plan.DEFAULT_CREDENTIAL_SECONDS
    assert not is_current(good, now=NOW_TS + 0.81 * lifetime)  # due for refresh: the controller would refresh it
    broken = secret_with()
    del broken["data"]["token"]
    assert not is_current(broken)
    edited = secret_with()
    edited["data"]["token"] = base64.b64encode(b"other").decode()
    assert not is_current(edited)
    unlabelled = secret_with()
    unlabelled["metadata"]["labels"] = {}
    assert not is_current(unlabelled)
    assert not is_current({"metadata": {"labels": {api.IMPORT_LABEL: "c2"}}})  # made before the annotations


def test_summary_says_nothing_changed_or_counts() -> None:
    result = apply.Result()
    result.steps.append(apply.Step("source", "c2", "Namespace", "x", None, "unchanged"))
    assert "Nothing to do" in result.summary()
    result.steps.append(apply.Step("target", "c1", "Secret", "s", "ns", "created"))
    assert result.summary() == "Bootstrap complete: 1 created, 0 updated, 0 deleted, 1 unchanged."
    assert str(result.steps[1]) == "target cluster 'c1': Secret ns/s created"
