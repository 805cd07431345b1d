"""RBAC of the in-memory API server: kube's rule matching, binding scopes, bootstrap policy and 403 wording."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubemcsa_testing import rbac
from kubemcsa_testing.errors import StatusError
from kubemcsa_testing.rbac import RequestAttributes, UserInfo, authorize, forbidden_message

SA_USER = UserInfo(
    "system:serviceaccount:default:pod-lister",
    ("system:serviceaccounts", "system:serviceaccounts:default", "system:authenticated"),
)


def role(name: str, namespace: str, *rules: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "Role", "metadata": {"name": name, "namespace": namespace}, "rules": list(rules)}


def cluster_role(name: str, *rules: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "ClusterRole", "metadata": {"name": name}, "rules": list(rules)}


def binding(name: str, namespace: str, ref_kind: str, ref_name: str, *subjects: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": ref_kind, "name": ref_name},
        "subjects": list(subjects),
    }


def cluster_binding(name: str, ref_name: str, *subjects: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": ref_name},
        "subjects": list(subjects),
    }


def sa_subject(name: str = "pod-lister", namespace: str | None = "default") -> dict[str, Any]:
    subject = {"kind": "ServiceAccount", "name": name}
    if namespace is not None:
        subject["namespace"] = namespace
    return subject


def rule(verbs: list[str], resources: list[str], groups: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"verbs": verbs, "apiGroups": groups if groups is not None else [""], "resources": resources, **extra}


def allowed(
    attrs: RequestAttributes,
    *,
    user: UserInfo = SA_USER,
    roles: list[dict[str, Any]] = (),  # type: ignore[assignment]
    cluster_roles: list[dict[str, Any]] = (),  # type: ignore[assignment]
    role_bindings: list[dict[str, Any]] = (),  # type: ignore[assignment]
    cluster_role_bindings: list[dict[str, Any]] = (),  # type: ignore[assignment]
) -> bool:
    return authorize(
        user,
        attrs,
        roles=roles,
        cluster_roles=cluster_roles,
        role_bindings=role_bindings,
        cluster_role_bindings=cluster_role_bindings,
    )


def in_default(**policy: Any) -> dict[str, Any]:
    """A Role `r` in default bound to the pod-lister service account."""
    return {
        "roles": [role("r", "default", *policy.pop("rules"))],
        "role_bindings": [binding("b", "default", "Role", "r", sa_subject())],
    }


LIST_PODS = RequestAttributes("list", resource="pods", namespace="default")


def test_masters_may_do_anything_without_any_binding() -> None:
    admin = UserInfo("admin", ("system:masters", "system:authenticated"))
    assert allowed(RequestAttributes("delete", resource="nodes", name="n1"), user=admin)
    assert allowed(RequestAttributes("get", path="/anything", resource_request=False), user=admin)


def test_nothing_is_allowed_without_bindings() -> None:
    assert not allowed(LIST_PODS)


def test_role_grants_its_verbs_on_its_resources_in_its_namespace_only() -> None:
    policy = in_default(rules=[rule(["get", "list", "watch"], ["pods"])])
    assert allowed(LIST_PODS, **policy)
    assert allowed(RequestAttributes("get", resource="pods", namespace="default", name="p"), **policy)
    assert not allowed(RequestAttributes("delete", resource="pods", namespace="default", name="p"), **policy)
    assert not allowed(RequestAttributes("list", resource="secrets", namespace="default"), **policy)
    assert not allowed(RequestAttributes("list", resource="pods", namespace="other"), **policy)
    assert not allowed(RequestAttributes("list", resource="pods"), **policy)  # cluster scope


def test_api_group_must_match() -> None:
    policy = in_default(rules=[rule(["list"], ["deployments"], ["apps"])])
    assert allowed(RequestAttributes("list", api_group="apps", resource="deployments", namespace="default"), **policy)
    assert not allowed(RequestAttributes("list", resource="deployments", namespace="default"), **policy)
    star = in_default(rules=[rule(["list"], ["deployments"], ["*"])])
    assert allowed(
        RequestAttributes("list", api_group="extensions", resource="deployments", namespace="default"), **star
    )


def test_wildcard_verbs_and_resources() -> None:
    policy = in_default(rules=[rule(["*"], ["*"])])
    assert allowed(RequestAttributes("deletecollection", resource="secrets", namespace="default"), **policy)
    assert allowed(
        RequestAttributes("create", resource="serviceaccounts", subresource="token", namespace="default", name="x"),
        **policy,
    )
    assert not allowed(
        RequestAttributes("list", api_group="apps", resource="deployments", namespace="default"), **policy
    )


def test_subresources_need_their_own_rule() -> None:
    token = RequestAttributes("create", resource="serviceaccounts", subresource="token", namespace="default", name="sa")
    parent_only = in_default(rules=[rule(["create", "get"], ["serviceaccounts"])])
    assert not allowed(token, **parent_only)
    explicit = in_default(rules=[rule(["create"], ["serviceaccounts/token"])])
    assert allowed(token, **explicit)
    assert not allowed(RequestAttributes("create", resource="serviceaccounts", namespace="default"), **explicit)


def test_star_slash_subresource_matches_that_subresource_of_every_resource() -> None:
    policy = in_default(rules=[rule(["update"], ["*/status"])])
    assert allowed(
        RequestAttributes("update", resource="pods", subresource="status", namespace="default", name="p"), **policy
    )
    assert not allowed(RequestAttributes("update", resource="pods", namespace="default", name="p"), **policy)
    assert not allowed(
        RequestAttributes("update", resource="pods", subresource="statusx", namespace="default", name="p"), **policy
    )
    pods_star = in_default(rules=[rule(["get"], ["pods/*"])])
    # kube's RBAC has no "resource/*" wildcard: it is only an exact string.
    assert not allowed(
        RequestAttributes("get", resource="pods", subresource="log", namespace="default", name="p"), **pods_star
    )


def test_resource_names_only_match_requests_that_name_an_object() -> None:
    policy = in_default(rules=[rule(["get", "list", "watch", "create", "update"], ["secrets"], resourceNames=["s1"])])
    assert allowed(RequestAttributes("get", resource="secrets", namespace="default", name="s1"), **policy)
    assert allowed(RequestAttributes("update", resource="secrets", namespace="default", name="s1"), **policy)
    assert not allowed(RequestAttributes("get", resource="secrets", namespace="default", name="s2"), **policy)
    assert not allowed(RequestAttributes("list", resource="secrets", namespace="default"), **policy)
    assert not allowed(RequestAttributes("watch", resource="secrets", namespace="default"), **policy)
    assert not allowed(RequestAttributes("create", resource="secrets", namespace="default"), **policy)


def test_role_binding_to_cluster_role_grants_only_in_the_binding_namespace() -> None:
    policy = {
        "cluster_roles": [cluster_role("pod-reader", rule(["list"], ["pods"]))],
        "role_bindings": [binding("b", "default", "ClusterRole", "pod-reader", sa_subject())],
    }
    assert allowed(LIST_PODS, **policy)
    assert not allowed(RequestAttributes("list", resource="pods", namespace="kube-system"), **policy)
    assert not allowed(RequestAttributes("list", resource="pods"), **policy)


def test_role_binding_to_a_role_of_another_namespace_grants_nothing() -> None:
    policy = {
        "roles": [role("r", "other", rule(["list"], ["pods"]))],
        "role_bindings": [binding("b", "default", "Role", "r", sa_subject())],
    }
    assert not allowed(LIST_PODS, **policy)


def test_cluster_role_binding_grants_everywhere_and_non_resource_urls() -> None:
    policy = {
        "cluster_roles": [
            cluster_role(
                "reader", rule(["list"], ["pods"]), {"verbs": ["get"], "nonResourceURLs": ["/metrics", "/logs/*"]}
            )
        ],
        "cluster_role_bindings": [cluster_binding("crb", "reader", sa_subject())],
    }
    assert allowed(LIST_PODS, **policy)
    assert allowed(RequestAttributes("list", resource="pods"), **policy)
    assert allowed(RequestAttributes("list", resource="pods", namespace="kube-system"), **policy)
    assert allowed(RequestAttributes("get", path="/metrics", resource_request=False), **policy)
    assert allowed(RequestAttributes("get", path="/logs/kube.log", resource_request=False), **policy)
    assert not allowed(RequestAttributes("get", path="/metricsx", resource_request=False), **policy)
    assert not allowed(RequestAttributes("post", path="/metrics", resource_request=False), **policy)


def test_non_resource_rules_through_a_role_binding_grant_nothing() -> None:
    policy = {
        "cluster_roles": [cluster_role("urls", {"verbs": ["get"], "nonResourceURLs": ["*"]})],
        "role_bindings": [binding("b", "default", "ClusterRole", "urls", sa_subject())],
    }
    assert not allowed(RequestAttributes("get", path="/healthz", resource_request=False), **policy)


def test_subjects_user_group_and_service_account() -> None:
    rules = [rule(["list"], ["pods"])]
    alice = UserInfo("alice", ("devs", "system:authenticated"))
    by_user = in_default(rules=rules)
    by_user["role_bindings"] = [binding("b", "default", "Role", "r", {"kind": "User", "name": "alice"})]
    assert allowed(LIST_PODS, user=alice, **by_user)
    assert not allowed(LIST_PODS, **by_user)
    by_group = in_default(rules=rules)
    by_group["role_bindings"] = [binding("b", "default", "Role", "r", {"kind": "Group", "name": "devs"})]
    assert allowed(LIST_PODS, user=alice, **by_group)
    all_sas = in_default(rules=rules)
    all_sas["role_bindings"] = [
        binding("b", "default", "Role", "r", {"kind": "Group", "name": "system:serviceaccounts"})
    ]
    assert allowed(LIST_PODS, **all_sas)
    assert not allowed(LIST_PODS, user=alice, **all_sas)


def test_service_account_subject_namespace_defaults_to_the_binding_namespace() -> None:
    rules = [rule(["list"], ["pods"])]
    policy = in_default(rules=rules)
    policy["role_bindings"] = [binding("b", "default", "Role", "r", sa_subject(namespace=None))]
    assert allowed(LIST_PODS, **policy)
    other_ns = in_default(rules=rules)
    other_ns["role_bindings"] = [binding("b", "default", "Role", "r", sa_subject(namespace="other"))]
    assert not allowed(LIST_PODS, **other_ns)
    # In a ClusterRoleBinding there is no namespace to default to: the subject matches nobody.
    cluster = {
        "cluster_roles": [cluster_role("c", *rules)],
        "cluster_role_bindings": [cluster_binding("crb", "c", sa_subject(namespace=None))],
    }
    assert not allowed(LIST_PODS, **cluster)


def test_missing_role_grants_nothing_and_is_named_in_the_reason() -> None:
    policy = {"role_bindings": [binding("b", "default", "Role", "ghost", sa_subject())]}
    assert not allowed(LIST_PODS, **policy)
    reason = rbac.missing_role_reasons(
        SA_USER, LIST_PODS, roles=[], cluster_roles=[], role_bindings=policy["role_bindings"], cluster_role_bindings=[]
    )
    assert reason == 'RBAC: role.rbac.authorization.k8s.io "ghost" not found'


def test_forbidden_messages_are_kube_apiserver_s() -> None:
    assert forbidden_message(SA_USER, RequestAttributes("list", resource="secrets", namespace="default")) == (
        'secrets is forbidden: User "system:serviceaccount:default:pod-lister" cannot list resource "secrets" '
        'in API group "" in the namespace "default"'
    )
    assert forbidden_message(SA_USER, RequestAttributes("list", resource="namespaces")) == (
        'namespaces is forbidden: User "system:serviceaccount:default:pod-lister" cannot list resource "namespaces" '
        'in API group "" at the cluster scope'
    )
    token = RequestAttributes(
        "create", resource="serviceaccounts", subresource="token", namespace="default", name="demo"
    )
    assert forbidden_message(SA_USER, token) == (
        'serviceaccounts "demo" is forbidden: User "system:serviceaccount:default:pod-lister" cannot create resource '
        '"serviceaccounts/token" in API group "" in the namespace "default"'
    )
    get_secret = RequestAttributes("get", resource="secrets", namespace="default", name="foo")
    assert forbidden_message(SA_USER, get_secret).startswith('secrets "foo" is forbidden: User ')
    leases = RequestAttributes("get", api_group="coordination.k8s.io", resource="leases", namespace="ns", name="l")
    assert forbidden_message(UserInfo("x"), leases) == (
        'leases.coordination.k8s.io "l" is forbidden: User "x" cannot get resource "leases" '
        'in API group "coordination.k8s.io" in the namespace "ns"'
    )
    path = RequestAttributes("get", path="/foo", resource_request=False)
    assert forbidden_message(UserInfo("x"), path) == 'forbidden: User "x" cannot get path "/foo"'
    assert forbidden_message(UserInfo("x"), path, reason="RBAC: boom").endswith('path "/foo": RBAC: boom')
    assert rbac.forbidden_details(token) == {"kind": "serviceaccounts", "name": "demo"}
    assert rbac.forbidden_details(path) is None


def default_policy(**extra: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "roles": extra.get("roles", []),
        "cluster_roles": rbac.default_cluster_roles() + extra.get("cluster_roles", []),
        "role_bindings": extra.get("role_bindings", []),
        "cluster_role_bindings": rbac.default_cluster_role_bindings() + extra.get("cluster_role_bindings", []),
    }


def test_bootstrap_policy_lets_everyone_authenticated_discover_but_not_read() -> None:
    policy = default_policy()
    for path in ("/api", "/api/v1", "/apis", "/apis/apps/v1", "/version", "/healthz", "/readyz"):
        assert allowed(RequestAttributes("get", path=path, resource_request=False), **policy), path
    for path in ("/.well-known/openid-configuration", "/openid/v1/jwks"):
        assert allowed(RequestAttributes("get", path=path, resource_request=False), **policy), path
    assert not allowed(LIST_PODS, **policy)
    assert not allowed(
        RequestAttributes("create", api_group="authentication.k8s.io", resource="tokenreviews"), **policy
    )
    anonymous = UserInfo("system:anonymous", ("system:unauthenticated",))
    assert allowed(RequestAttributes("get", path="/version", resource_request=False), user=anonymous, **policy)
    assert not allowed(RequestAttributes("get", path="/api", resource_request=False), user=anonymous, **policy)
    assert not allowed(
        RequestAttributes("get", path="/openid/v1/jwks", resource_request=False), user=anonymous, **policy
    )


def test_auth_delegator_allows_token_reviews() -> None:
    review = RequestAttributes("create", api_group="authentication.k8s.io", resource="tokenreviews")
    policy = default_policy(cluster_role_bindings=[cluster_binding("d", "system:auth-delegator", sa_subject())])
    assert allowed(review, **policy)
    assert allowed(
        RequestAttributes("create", api_group="authorization.k8s.io", resource="subjectaccessreviews"), **policy
    )


def test_view_edit_admin_are_aggregated_as_in_kube() -> None:
    def grants(role_name: str, attrs: RequestAttributes) -> bool:
        policy = default_policy(role_bindings=[binding("b", "default", "ClusterRole", role_name, sa_subject())])
        return allowed(attrs, **policy)

    read_secret = RequestAttributes("get", resource="secrets", namespace="default", name="s")
    token = RequestAttributes("create", resource="serviceaccounts", subresource="token", namespace="default", name="x")
    make_role = RequestAttributes(
        "create", api_group="rbac.authorization.k8s.io", resource="roles", namespace="default"
    )
    assert grants("view", LIST_PODS)
    assert not grants("view", read_secret)
    assert grants("edit", LIST_PODS) and grants("edit", read_secret) and grants("edit", token)
    assert not grants("edit", make_role)
    assert grants("admin", make_role) and grants("admin", LIST_PODS) and grants("admin", read_secret)
    names = {r["metadata"]["name"] for r in rbac.default_cluster_roles()}
    assert {"cluster-admin", "admin", "edit", "view", "system:auth-delegator"} <= names


def test_aggregation_picks_up_labelled_cluster_roles() -> None:
    extra = cluster_role("sai-view", rule(["list"], ["serviceaccountimports"], ["multicluster.admiralty.io"]))
    extra["metadata"]["labels"] = {"rbac.authorization.k8s.io/aggregate-to-view": "true"}
    roles = rbac.aggregate_cluster_roles([*rbac.default_cluster_roles(), extra])
    by_name = {r["metadata"]["name"]: r for r in roles}
    for name in ("view", "edit", "admin"):
        assert extra["rules"][0] in by_name[name]["rules"], name
    assert rbac.aggregated_rules(extra, roles) is None


def test_garbage_policy_objects_never_crash_and_grant_nothing() -> None:
    junk: list[Any] = [
        {},
        {"metadata": None, "rules": "all"},
        {"metadata": {"name": "r", "namespace": "default"}, "rules": [None, 1, {"verbs": "*"}]},
    ]
    junk_bindings: list[Any] = [
        {},
        {"roleRef": None, "subjects": None},
        {"metadata": {"namespace": "default"}, "roleRef": {"kind": "Role", "name": "r"}, "subjects": [None, 3]},
    ]
    assert not allowed(
        LIST_PODS, roles=junk, cluster_roles=junk, role_bindings=junk_bindings, cluster_role_bindings=junk_bindings
    )


@given(
    verb=st.sampled_from(["get", "list", "create", "update", "delete", "watch"]),
    resource=st.text(min_size=1, max_size=10),
    namespace=st.text(max_size=10),
    name=st.text(max_size=10),
)
def test_a_user_without_bindings_is_always_denied_and_described(
    verb: str, resource: str, namespace: str, name: str
) -> None:
    attrs = RequestAttributes(verb, resource=resource, namespace=namespace, name=name)
    assert not allowed(attrs, **default_policy())
    message = forbidden_message(SA_USER, attrs)
    assert "is forbidden: User" in message and f"cannot {verb} resource" in message


# --- privilege escalation prevention ------------------------------------------------------------------------


def check(obj: dict[str, Any], **policy: Any) -> None:
    full = {"roles": [], "cluster_roles": [], "role_bindings": [], "cluster_role_bindings": [], **policy}
    rbac.check_escalation(SA_USER, obj, **full)


def forbidden_text(obj: dict[str, Any], **policy: Any) -> str:
    with pytest.raises(StatusError) as caught:
        check(obj, **policy)
    assert caught.value.code == 403 and caught.value.reason == "Forbidden"
    return caught.value.message


def test_a_role_within_the_writers_own_permissions_may_be_created() -> None:
    policy = in_default(rules=[rule(["get", "list", "create"], ["pods", "roles"], ["", "rbac.authorization.k8s.io"])])
    check(role("new", "default", rule(["get", "list"], ["pods"])), **policy)


def test_a_role_granting_more_is_refused_with_kube_s_message() -> None:
    policy = in_default(rules=[rule(["list"], ["pods"])])
    message = forbidden_text(
        role("new", "default", rule(["list", "delete"], ["pods"]), rule(["get"], ["secrets"])), **policy
    )
    assert message == (
        'roles.rbac.authorization.k8s.io "new" is forbidden: user "system:serviceaccount:default:pod-lister" '
        '(groups=["system:serviceaccounts" "system:serviceaccounts:default" "system:authenticated"]) is attempting '
        "to grant RBAC permissions not currently held:\n"
        '{APIGroups:[""], Resources:["pods"], Verbs:["delete"]}\n'
        '{APIGroups:[""], Resources:["secrets"], Verbs:["get"]}'
    )


def test_wildcards_are_only_covered_by_wildcards() -> None:
    policy = in_default(rules=[rule(["get", "list", "watch", "create", "update", "patch", "delete"], ["pods"])])
    assert 'Verbs:["*"]' in forbidden_text(role("new", "default", rule(["*"], ["pods"])), **policy)
    star = in_default(rules=[rule(["*"], ["*"], ["*"])])
    check(role("new", "default", rule(["*"], ["pods", "pods/status"], ["", "apps"])), **star)
    named = in_default(rules=[rule(["get"], ["secrets"], resourceNames=["a"])])
    check(role("new", "default", rule(["get"], ["secrets"], resourceNames=["a"])), **named)
    assert "ResourceNames" in forbidden_text(
        role("new", "default", rule(["get"], ["secrets"], resourceNames=["b"])), **named
    )
    forbidden_text(role("new", "default", rule(["get"], ["secrets"])), **named)


def test_escalate_and_bind_verbs_allow_granting_more() -> None:
    escalate = in_default(rules=[rule(["escalate"], ["roles"], ["rbac.authorization.k8s.io"])])
    check(role("new", "default", rule(["*"], ["*"], ["*"])), **escalate)
    bind = in_default(rules=[rule(["bind"], ["clusterroles"], ["rbac.authorization.k8s.io"], resourceNames=["admin"])])
    bind["cluster_roles"] = rbac.default_cluster_roles()
    check(binding("b2", "default", "ClusterRole", "admin", {"kind": "User", "name": "x"}), **bind)
    forbidden_text(binding("b2", "default", "ClusterRole", "cluster-admin", {"kind": "User", "name": "x"}), **bind)


def test_bindings_are_checked_against_the_referenced_role_in_the_binding_namespace() -> None:
    policy = in_default(rules=[rule(["get", "list", "watch"], ["pods"])])
    policy["cluster_roles"] = rbac.default_cluster_roles()
    policy["roles"].append(role("reader", "default", rule(["list"], ["pods"])))
    check(binding("b2", "default", "Role", "reader", {"kind": "User", "name": "x"}), **policy)
    message = forbidden_text(binding("b2", "default", "ClusterRole", "edit", {"kind": "User", "name": "x"}), **policy)
    assert message.startswith('rolebindings.rbac.authorization.k8s.io "b2" is forbidden: user ')
    crb = cluster_binding("c2", "view", {"kind": "User", "name": "x"})
    assert forbidden_text(crb, **policy).startswith('clusterrolebindings.rbac.authorization.k8s.io "c2" is forbidden')
    with pytest.raises(StatusError) as caught:
        check(binding("b3", "default", "Role", "ghost", {"kind": "User", "name": "x"}), **policy)
    assert caught.value.code == 404


def test_masters_and_other_kinds_are_never_checked() -> None:
    admin = UserInfo("admin", ("system:masters",))
    rbac.check_escalation(
        admin,
        cluster_role("all", rule(["*"], ["*"], ["*"])),
        roles=[],
        cluster_roles=[],
        role_bindings=[],
        cluster_role_bindings=[],
    )
    check({"kind": "Secret", "metadata": {"name": "s"}})
    check(None)  # type: ignore[arg-type]


def test_authorize_aggregates_labelled_cluster_roles_created_later() -> None:
    extra = cluster_role("sai-view", rule(["list"], ["serviceaccountimports"], ["multicluster.admiralty.io"]))
    extra["metadata"]["labels"] = {"rbac.authorization.k8s.io/aggregate-to-view": "true"}
    policy = default_policy(
        cluster_roles=[extra], role_bindings=[binding("b", "default", "ClusterRole", "edit", sa_subject())]
    )
    attrs = RequestAttributes(
        "list", api_group="multicluster.admiralty.io", resource="serviceaccountimports", namespace="default"
    )
    assert allowed(attrs, **policy)
    assert not allowed(attrs, **default_policy(cluster_roles=[extra]))
