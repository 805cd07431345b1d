"""Kubernetes RBAC authorization as kube-apiserver evaluates it (pure functions over Role/Binding dicts).

Semantics follow plugin/pkg/auth/authorizer/rbac and pkg/apis/rbac/v1/evaluation_helpers.go; the denial
message follows the apiserver's responsewriters.Forbidden. The bootstrap policy is the part of
plugin/pkg/auth/authorizer/rbac/bootstrappolicy a fresh cluster has that this project can observe.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from kubemcsa_testing.errors import StatusError, forbidden, not_found

RBAC_GROUP = "rbac.authorization.k8s.io"
RBAC_API_VERSION = f"{RBAC_GROUP}/v1"
MASTERS_GROUP = "system:masters"
AUTHENTICATED_GROUP = "system:authenticated"
UNAUTHENTICATED_GROUP = "system:unauthenticated"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
ALL = "*"


@dataclass(frozen=True)
class UserInfo:
    """An authenticated (or anonymous) user, as the authorizer sees it."""

    username: str
    groups: tuple[str, ...] = ()
    uid: str = ""


@dataclass(frozen=True)
class RequestAttributes:
    """What a request asks to do; resource requests name a resource, the others a path (e.g. /healthz)."""

    verb: str
    api_group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    path: str = ""
    resource_request: bool = True


# --- rule matching (evaluation_helpers.go) ---------------------------------------------------------------


def _strings(value: Any) -> list[str]:
    """A rule field as a list of strings; anything malformed counts as empty (matches nothing)."""
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, str)]


def verb_matches(rule: Mapping[str, Any], verb: str) -> bool:
    return any(v in (ALL, verb) for v in _strings(rule.get("verbs")))


def api_group_matches(rule: Mapping[str, Any], group: str) -> bool:
    return any(g in (ALL, group) for g in _strings(rule.get("apiGroups")))


def resource_matches(rule: Mapping[str, Any], resource: str, subresource: str) -> bool:
    combined = f"{resource}/{subresource}" if subresource else resource
    for ruled in _strings(rule.get("resources")):
        if ruled in (ALL, combined):
            return True
        # "*/status" grants the status subresource of every resource; a bare "pods" never grants "pods/status".
        if subresource and ruled == f"*/{subresource}":
            return True
    return False


def resource_name_matches(rule: Mapping[str, Any], name: str) -> bool:
    names = _strings(rule.get("resourceNames"))
    if not names:
        return True
    # A request without a name (create, list, watch, deletecollection) never matches a resourceNames rule.
    return bool(name) and name in names


def non_resource_url_matches(rule: Mapping[str, Any], path: str) -> bool:
    for url in _strings(rule.get("nonResourceURLs")):
        if url in (ALL, path):
            return True
        if url.endswith("*") and path.startswith(url.rstrip("*")):
            return True
    return False


def rule_allows(rule: Mapping[str, Any], attrs: RequestAttributes) -> bool:
    if not isinstance(rule, Mapping):
        return False
    if attrs.resource_request:
        return (
            verb_matches(rule, attrs.verb)
            and api_group_matches(rule, attrs.api_group)
            and resource_matches(rule, attrs.resource, attrs.subresource)
            and resource_name_matches(rule, attrs.name)
        )
    return verb_matches(rule, attrs.verb) and non_resource_url_matches(rule, attrs.path)


# --- subjects and bindings (rbac.go, rule.go) -------------------------------------------------------------


def subject_applies(user: UserInfo, subject: Mapping[str, Any], binding_namespace: str) -> bool:
    """Does a binding subject designate this user? `binding_namespace` is "" for ClusterRoleBindings."""
    if not isinstance(subject, Mapping):
        return False
    kind, name = subject.get("kind"), subject.get("name")
    if kind == "User":
        return user.username == name
    if kind == "Group":
        return name in user.groups
    if kind == "ServiceAccount":
        # A namespace-less ServiceAccount subject of a RoleBinding means the binding's own namespace.
        namespace = subject.get("namespace") or binding_namespace
        if not namespace or not name:
            return False
        return user.username == f"{SERVICE_ACCOUNT_PREFIX}{namespace}:{name}"
    return False


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    return meta if isinstance(meta, Mapping) else {}


def _binding_applies(user: UserInfo, binding: Mapping[str, Any], namespace: str) -> bool:
    subjects = binding.get("subjects")
    return isinstance(subjects, list) and any(subject_applies(user, s, namespace) for s in subjects)


def _rules_of(role: Mapping[str, Any] | None) -> list[Any]:
    rules = role.get("rules") if isinstance(role, Mapping) else None
    return rules if isinstance(rules, list) else []


def _role_ref(binding: Mapping[str, Any]) -> tuple[str, str]:
    ref = binding.get("roleRef")
    if not isinstance(ref, Mapping):
        return "", ""
    return str(ref.get("kind", "")), str(ref.get("name", ""))


class _ClusterRoles:
    """ClusterRoles by name; an aggregated role's rules are computed as the aggregation controller would."""

    def __init__(self, cluster_roles: Iterable[Mapping[str, Any]]) -> None:
        self._all = [r for r in cluster_roles if isinstance(r, Mapping)]
        self._by_name = {_meta(r).get("name"): r for r in self._all}
        self._aggregated: dict[Any, dict[str, Any]] | None = None

    def rules(self, name: str) -> list[Any]:
        role = self._by_name.get(name)
        if isinstance(role, Mapping) and isinstance(role.get("aggregationRule"), Mapping):
            if self._aggregated is None:
                self._aggregated = {_meta(r).get("name"): r for r in aggregate_cluster_roles(self._all)}
            role = self._aggregated.get(name, role)
        return _rules_of(role)

    def exists(self, name: str) -> bool:
        return name in self._by_name


def _rules_for(
    user: UserInfo,
    namespace: str,
    *,
    roles: Iterable[Mapping[str, Any]],
    cluster_roles: _ClusterRoles,
    role_bindings: Iterable[Mapping[str, Any]],
    cluster_role_bindings: Iterable[Mapping[str, Any]],
) -> Iterator[Any]:
    """Every rule granted to `user` in `namespace` ("" = cluster-wide only), lazily, as kube's RulesFor."""
    for binding in cluster_role_bindings:
        if not isinstance(binding, Mapping):
            continue
        kind, name = _role_ref(binding)
        if kind == "ClusterRole" and _binding_applies(user, binding, ""):
            yield from cluster_roles.rules(name)
    # RoleBindings grant only inside their namespace.
    if not namespace:
        return
    roles_by_name = {_meta(r).get("name"): r for r in roles if _meta(r).get("namespace") == namespace}
    for binding in role_bindings:
        if not isinstance(binding, Mapping) or _meta(binding).get("namespace") != namespace:
            continue
        if not _binding_applies(user, binding, namespace):
            continue
        kind, name = _role_ref(binding)
        if kind == "Role":
            yield from _rules_of(roles_by_name.get(name))
        elif kind == "ClusterRole":
            yield from cluster_roles.rules(name)


def authorization_namespace(attrs: RequestAttributes) -> str:
    """The namespace whose RoleBindings may grant the request ("": only ClusterRoleBindings can)."""
    # Non-resource requests have no namespace: only ClusterRoleBindings can grant them.
    return attrs.namespace if attrs.resource_request else ""


def rules_for(
    user: UserInfo,
    namespace: str,
    *,
    roles: Iterable[Mapping[str, Any]],
    cluster_roles: Iterable[Mapping[str, Any]],
    role_bindings: Iterable[Mapping[str, Any]],
    cluster_role_bindings: Iterable[Mapping[str, Any]],
) -> tuple[Any, ...]:
    """Every rule granted to `user` in `namespace` ("" = cluster-wide only), as kube's RulesFor."""
    return tuple(
        _rules_for(
            user,
            namespace,
            roles=roles,
            cluster_roles=_ClusterRoles(cluster_roles),
            role_bindings=role_bindings,
            cluster_role_bindings=cluster_role_bindings,
        )
    )


def rules_allow(rules: Iterable[Any], attrs: RequestAttributes) -> bool:
    """True if one of `rules` (a rules_for result for the request's namespace) allows the request."""
    return any(rule_allows(rule, attrs) for rule in rules)


def authorize(
    user: UserInfo,
    attrs: RequestAttributes,
    *,
    roles: Iterable[Mapping[str, Any]],
    cluster_roles: Iterable[Mapping[str, Any]],
    role_bindings: Iterable[Mapping[str, Any]],
    cluster_role_bindings: Iterable[Mapping[str, Any]],
) -> bool:
    """True if RBAC (plus the system:masters superuser group) allows the request."""
    if MASTERS_GROUP in user.groups:
        return True
    rules = _rules_for(
        user,
        authorization_namespace(attrs),
        roles=roles,
        cluster_roles=_ClusterRoles(cluster_roles),
        role_bindings=role_bindings,
        cluster_role_bindings=cluster_role_bindings,
    )
    return any(rule_allows(rule, attrs) for rule in rules)


# --- privilege escalation prevention (pkg/registry/rbac/validation) ---------------------------------------


def _rule_atoms(rule: Any) -> list[dict[str, Any]]:
    """A rule broken down to one verb on one thing each, as kube's BreakdownRule."""
    if not isinstance(rule, Mapping):
        return []
    atoms: list[dict[str, Any]] = []
    verbs = _strings(rule.get("verbs"))
    for group in _strings(rule.get("apiGroups")):
        for resource in _strings(rule.get("resources")):
            for verb in verbs:
                names = _strings(rule.get("resourceNames")) or [""]
                for name in names:
                    atom: dict[str, Any] = {"verbs": [verb], "apiGroups": [group], "resources": [resource]}
                    if name:
                        atom["resourceNames"] = [name]
                    atoms.append(atom)
    for url in _strings(rule.get("nonResourceURLs")):
        atoms.extend({"verbs": [verb], "nonResourceURLs": [url]} for verb in verbs)
    return atoms


def _atom_covered(owner_rules: list[Any], atom: dict[str, Any]) -> bool:
    verb = atom["verbs"][0]
    if "nonResourceURLs" in atom:
        attrs = RequestAttributes(verb, path=atom["nonResourceURLs"][0], resource_request=False)
    else:
        resource, _, subresource = atom["resources"][0].partition("/")
        name = (atom.get("resourceNames") or [""])[0]
        attrs = RequestAttributes(verb, atom["apiGroups"][0], resource, subresource, "", name)
    return any(rule_allows(rule, attrs) for rule in owner_rules)


def uncovered_rules(owner_rules: Iterable[Any], requested_rules: Iterable[Any]) -> list[dict[str, Any]]:
    """The parts of `requested_rules` that `owner_rules` do not grant (a "*" is only covered by a "*")."""
    owner = [r for r in owner_rules if isinstance(r, Mapping)]
    missing: list[dict[str, Any]] = []
    for rule in requested_rules:
        for atom in _rule_atoms(rule):
            if not _atom_covered(owner, atom) and atom not in missing:
                missing.append(atom)
    return missing


def _compact(rule: Mapping[str, Any]) -> str:
    """kube's PolicyRule CompactString: {APIGroups:["" "apps"], Resources:["pods"], Verbs:["get"]}."""
    parts = []
    for key, label in (
        ("apiGroups", "APIGroups"),
        ("resources", "Resources"),
        ("resourceNames", "ResourceNames"),
        ("nonResourceURLs", "NonResourceURLs"),
        ("verbs", "Verbs"),
    ):
        values = _strings(rule.get(key))
        if values:
            parts.append(f"{label}:[{' '.join(_go_quote(v) for v in values)}]")
    return "{" + ", ".join(parts) + "}"


def check_escalation(
    user: UserInfo,
    obj: Mapping[str, Any],
    *,
    roles: Iterable[Mapping[str, Any]],
    cluster_roles: Iterable[Mapping[str, Any]],
    role_bindings: Iterable[Mapping[str, Any]],
    cluster_role_bindings: Iterable[Mapping[str, Any]],
) -> None:
    """Refuse (403, kube's words) a Role/ClusterRole/RoleBinding/ClusterRoleBinding write that grants more than
    the writer holds, unless the writer may `escalate` (roles) or `bind` (bindings), as kube-apiserver does.
    """
    if MASTERS_GROUP in user.groups or not isinstance(obj, Mapping):
        return
    kind = obj.get("kind")
    meta = _meta(obj)
    name = str(meta.get("name") or "")
    namespace = str(meta.get("namespace") or "") if kind in ("Role", "RoleBinding") else ""
    policy = {
        "roles": list(roles),
        "cluster_roles": list(cluster_roles),
        "role_bindings": list(role_bindings),
        "cluster_role_bindings": list(cluster_role_bindings),
    }
    index = _ClusterRoles(policy["cluster_roles"])

    def may(verb: str, plural: str, target: str) -> bool:
        return authorize(user, RequestAttributes(verb, RBAC_GROUP, plural, "", namespace, target), **policy)

    if kind in ("Role", "ClusterRole"):
        plural = "roles" if kind == "Role" else "clusterroles"
        if may("escalate", plural, name):
            return
        if kind == "ClusterRole" and obj.get("aggregationRule"):
            raise forbidden(
                f'{plural}.{RBAC_GROUP} "{name}" is forbidden: must have cluster-admin privileges to use the '
                "aggregationRule",
                plural,
                name,
                RBAC_GROUP,
            )
        requested = _rules_of(obj)
    elif kind in ("RoleBinding", "ClusterRoleBinding"):
        plural = "rolebindings" if kind == "RoleBinding" else "clusterrolebindings"
        ref_kind, ref_name = _role_ref(obj)
        if may("bind", "roles" if ref_kind == "Role" else "clusterroles", ref_name):
            return
        if ref_kind == "Role":
            role = next(
                (
                    r
                    for r in policy["roles"]
                    if _meta(r).get("namespace") == namespace and _meta(r).get("name") == ref_name
                ),
                None,
            )
            if role is None:
                raise not_found("roles", ref_name, RBAC_GROUP)
            requested = _rules_of(role)
        elif ref_kind == "ClusterRole":
            if not index.exists(ref_name):
                raise not_found("clusterroles", ref_name, RBAC_GROUP)
            requested = index.rules(ref_name)
        else:
            return  # the object's own validation refuses an unknown roleRef kind
    else:
        return
    owner = list(
        _rules_for(user, namespace, cluster_roles=index, **{k: v for k, v in policy.items() if k != "cluster_roles"})
    )
    missing = uncovered_rules(owner, requested)
    if missing:
        groups = "[" + " ".join(_go_quote(g) for g in user.groups) + "]"
        message = (
            f'{plural}.{RBAC_GROUP} "{name}" is forbidden: user {_go_quote(user.username)} (groups={groups}) is '
            "attempting to grant RBAC permissions not currently held:\n" + "\n".join(_compact(m) for m in missing)
        )
        raise StatusError(403, "Forbidden", message, {"name": name, "group": RBAC_GROUP, "kind": plural})


def forbidden_message(user: UserInfo, attrs: RequestAttributes, reason: str = "") -> str:
    """The message of kube-apiserver's 403 for this request (responsewriters.Forbidden + errors.NewForbidden)."""
    if not attrs.resource_request:
        text = f"User {_go_quote(user.username)} cannot {attrs.verb} path {_go_quote(attrs.path)}"
    else:
        resource = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
        text = (
            f"User {_go_quote(user.username)} cannot {attrs.verb} resource {_go_quote(resource)} "
            f"in API group {_go_quote(attrs.api_group)}"
        )
        text += f" in the namespace {_go_quote(attrs.namespace)}" if attrs.namespace else " at the cluster scope"
    if reason:
        text = f"{text}: {reason}"
    if not attrs.resource_request or not attrs.resource:
        return f"forbidden: {text}"
    qualified = f"{attrs.resource}.{attrs.api_group}" if attrs.api_group else attrs.resource
    if attrs.name:
        return f"{qualified} {_go_quote(attrs.name)} is forbidden: {text}"
    return f"{qualified} is forbidden: {text}"


def forbidden_details(attrs: RequestAttributes) -> dict[str, Any] | None:
    """The `details` of that 403 Status (None for non-resource requests, as kube omits them)."""
    if not attrs.resource_request or not attrs.resource:
        return None
    details: dict[str, Any] = {"kind": attrs.resource}
    if attrs.name:
        details["name"] = attrs.name
    if attrs.api_group:
        details["group"] = attrs.api_group
    return details


def _go_quote(text: str) -> str:
    """Go's %q for the plain strings that appear here (names, paths)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def missing_role_reasons(
    user: UserInfo,
    attrs: RequestAttributes,
    *,
    roles: Iterable[Mapping[str, Any]],
    cluster_roles: Iterable[Mapping[str, Any]],
    role_bindings: Iterable[Mapping[str, Any]],
    cluster_role_bindings: Iterable[Mapping[str, Any]],
) -> str:
    """kube's "RBAC: ..." suffix naming roles that the user's bindings reference but that do not exist."""
    cluster_role_names = {_meta(r).get("name") for r in cluster_roles}
    role_names = {(_meta(r).get("namespace"), _meta(r).get("name")) for r in roles}
    errors: list[str] = []
    for binding in cluster_role_bindings:
        kind, name = _role_ref(binding)
        if _binding_applies(user, binding, "") and kind == "ClusterRole" and name not in cluster_role_names:
            errors.append(f'clusterrole.{RBAC_GROUP} "{name}" not found')
    if attrs.resource_request and attrs.namespace:
        for binding in role_bindings:
            if _meta(binding).get("namespace") != attrs.namespace or not _binding_applies(
                user, binding, attrs.namespace
            ):
                continue
            kind, name = _role_ref(binding)
            if kind == "ClusterRole" and name not in cluster_role_names:
                errors.append(f'clusterrole.{RBAC_GROUP} "{name}" not found')
            elif kind == "Role" and (attrs.namespace, name) not in role_names:
                errors.append(f'role.{RBAC_GROUP} "{name}" not found')
    if not errors:
        return ""
    return "RBAC: " + (errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]")


# --- bootstrap policy (bootstrappolicy/policy.go) -------------------------------------------------------

_READ = ["get", "list", "watch"]
_WRITE = ["create", "delete", "deletecollection", "patch", "update"]
_BOOTSTRAP_LABELS = {"kubernetes.io/bootstrapping": "rbac-defaults"}
_AGGREGATE_TO = "rbac.authorization.k8s.io/aggregate-to-"
_AUTOUPDATE = {"rbac.authorization.kubernetes.io/autoupdate": "true"}


def _rule(verbs: list[str], groups: list[str], resources: list[str]) -> dict[str, Any]:
    return {"verbs": list(verbs), "apiGroups": list(groups), "resources": list(resources)}


def _url_rule(verbs: list[str], urls: list[str]) -> dict[str, Any]:
    return {"verbs": list(verbs), "nonResourceURLs": list(urls)}


def _cluster_role(
    name: str, rules: list[dict[str, Any]], labels: dict[str, str] | None = None, aggregate_to: list[str] | None = None
) -> dict[str, Any]:
    role: dict[str, Any] = {
        "apiVersion": RBAC_API_VERSION,
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": {**_BOOTSTRAP_LABELS, **(labels or {})}, "annotations": dict(_AUTOUPDATE)},
        "rules": rules,
    }
    if aggregate_to:
        role["aggregationRule"] = {
            "clusterRoleSelectors": [{"matchLabels": {f"{_AGGREGATE_TO}{target}": "true"}} for target in aggregate_to]
        }
    return role


def _view_rules() -> list[dict[str, Any]]:
    return [
        _rule(
            _READ,
            [""],
            [
                "configmaps",
                "endpoints",
                "persistentvolumeclaims",
                "persistentvolumeclaims/status",
                "pods",
                "replicationcontrollers",
                "replicationcontrollers/scale",
                "serviceaccounts",
                "services",
                "services/status",
            ],
        ),
        _rule(
            _READ,
            [""],
            [
                "bindings",
                "events",
                "limitranges",
                "namespaces/status",
                "pods/log",
                "pods/status",
                "replicationcontrollers/status",
                "resourcequotas",
                "resourcequotas/status",
            ],
        ),
        _rule(_READ, [""], ["namespaces"]),
        _rule(_READ, ["discovery.k8s.io"], ["endpointslices"]),
        _rule(
            _READ,
            ["apps"],
            [
                "controllerrevisions",
                "daemonsets",
                "daemonsets/status",
                "deployments",
                "deployments/scale",
                "deployments/status",
                "replicasets",
                "replicasets/scale",
                "replicasets/status",
                "statefulsets",
                "statefulsets/scale",
                "statefulsets/status",
            ],
        ),
        _rule(_READ, ["autoscaling"], ["horizontalpodautoscalers", "horizontalpodautoscalers/status"]),
        _rule(_READ, ["batch"], ["cronjobs", "cronjobs/status", "jobs", "jobs/status"]),
        _rule(_READ, ["policy"], ["poddisruptionbudgets", "poddisruptionbudgets/status"]),
        _rule(_READ, ["networking.k8s.io"], ["ingresses", "ingresses/status", "networkpolicies"]),
    ]


def _edit_only_rules() -> list[dict[str, Any]]:
    return [
        _rule(["impersonate"], [""], ["serviceaccounts"]),
        _rule(_WRITE, [""], ["pods", "pods/attach", "pods/exec", "pods/portforward", "pods/proxy"]),
        _rule(["create"], [""], ["pods/eviction"]),
        _rule(
            _WRITE,
            [""],
            [
                "configmaps",
                "endpoints",
                "persistentvolumeclaims",
                "replicationcontrollers",
                "replicationcontrollers/scale",
                "secrets",
                "serviceaccounts",
                "services",
                "services/proxy",
            ],
        ),
        _rule(["create"], [""], ["serviceaccounts/token"]),
        _rule(
            _WRITE,
            ["apps"],
            [
                "daemonsets",
                "deployments",
                "deployments/rollback",
                "deployments/scale",
                "replicasets",
                "replicasets/scale",
                "statefulsets",
                "statefulsets/scale",
            ],
        ),
        _rule(_WRITE, ["autoscaling"], ["horizontalpodautoscalers"]),
        _rule(_WRITE, ["batch"], ["cronjobs", "jobs"]),
        _rule(_WRITE, ["policy"], ["poddisruptionbudgets"]),
        _rule(_WRITE, ["networking.k8s.io"], ["ingresses", "networkpolicies"]),
        # edit can read secrets (view cannot: reading a token Secret would escalate to its service account).
        _rule(_READ, [""], ["secrets"]),
    ]


def _admin_only_rules() -> list[dict[str, Any]]:
    return [
        _rule(["create"], ["authorization.k8s.io"], ["localsubjectaccessreviews"]),
        _rule(_READ + _WRITE, [RBAC_GROUP], ["rolebindings", "roles"]),
    ]


def default_cluster_roles() -> list[dict[str, Any]]:
    """The bootstrap ClusterRoles of a fresh cluster that matter here, aggregated as the controller leaves them."""
    return aggregate_cluster_roles(_bootstrap_cluster_roles())


def _bootstrap_cluster_roles() -> list[dict[str, Any]]:
    return [
        _cluster_role(
            "cluster-admin",
            [_rule([ALL], [ALL], [ALL]), _url_rule([ALL], [ALL])],
        ),
        _cluster_role(
            "system:discovery",
            [
                _url_rule(
                    ["get"],
                    [
                        "/api",
                        "/api/*",
                        "/apis",
                        "/apis/*",
                        "/healthz",
                        "/livez",
                        "/openapi",
                        "/openapi/*",
                        "/readyz",
                        "/version",
                        "/version/",
                    ],
                )
            ],
        ),
        _cluster_role(
            "system:basic-user",
            [
                _rule(["create"], ["authorization.k8s.io"], ["selfsubjectaccessreviews", "selfsubjectrulesreviews"]),
                _rule(["create"], ["authentication.k8s.io"], ["selfsubjectreviews"]),
            ],
        ),
        _cluster_role(
            "system:public-info-viewer",
            [_url_rule(["get"], ["/healthz", "/livez", "/readyz", "/version", "/version/"])],
        ),
        _cluster_role(
            "system:auth-delegator",
            [
                _rule(["create"], ["authentication.k8s.io"], ["tokenreviews"]),
                _rule(["create"], ["authorization.k8s.io"], ["subjectaccessreviews"]),
            ],
        ),
        _cluster_role(
            "system:service-account-issuer-discovery",
            [
                _url_rule(
                    ["get"],
                    [
                        "/.well-known/openid-configuration",
                        "/.well-known/openid-configuration/",
                        "/openid/v1/jwks",
                        "/openid/v1/jwks/",
                    ],
                )
            ],
        ),
        # admin, edit and view are aggregated (as in kube): their rules are the union of the rules of the
        # ClusterRoles labelled aggregate-to-*, which aggregate_cluster_roles() computes.
        _cluster_role("system:aggregate-to-admin", _admin_only_rules(), labels={_AGGREGATE_TO + "admin": "true"}),
        _cluster_role("system:aggregate-to-edit", _edit_only_rules(), labels={_AGGREGATE_TO + "edit": "true"}),
        _cluster_role("system:aggregate-to-view", _view_rules(), labels={_AGGREGATE_TO + "view": "true"}),
        _cluster_role("admin", [], aggregate_to=["admin"]),
        _cluster_role("edit", [], labels={_AGGREGATE_TO + "admin": "true"}, aggregate_to=["edit"]),
        _cluster_role("view", [], labels={_AGGREGATE_TO + "edit": "true"}, aggregate_to=["view"]),
    ]


def _cluster_role_binding(name: str, role: str, groups: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": RBAC_API_VERSION,
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name, "labels": dict(_BOOTSTRAP_LABELS), "annotations": dict(_AUTOUPDATE)},
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": RBAC_GROUP, "kind": "Group", "name": group} for group in groups],
    }


def default_cluster_role_bindings() -> list[dict[str, Any]]:
    """The bootstrap ClusterRoleBindings for default_cluster_roles(), bound as kube binds them."""
    return [
        _cluster_role_binding("cluster-admin", "cluster-admin", [MASTERS_GROUP]),
        _cluster_role_binding("system:discovery", "system:discovery", [AUTHENTICATED_GROUP]),
        _cluster_role_binding("system:basic-user", "system:basic-user", [AUTHENTICATED_GROUP]),
        _cluster_role_binding(
            "system:public-info-viewer", "system:public-info-viewer", [AUTHENTICATED_GROUP, UNAUTHENTICATED_GROUP]
        ),
        _cluster_role_binding(
            "system:service-account-issuer-discovery",
            "system:service-account-issuer-discovery",
            ["system:serviceaccounts"],
        ),
    ]


def aggregated_rules(cluster_role: Mapping[str, Any], cluster_roles: Iterable[Mapping[str, Any]]) -> list[Any] | None:
    """The rules the clusterrole-aggregation controller would write into an aggregated ClusterRole, else None.

    Union (without duplicates, in name order) of the rules of every other ClusterRole whose labels match one
    of the aggregationRule's clusterRoleSelectors.
    """
    from kubemcsa_testing.selectors import label_selector_from_dict

    rule_spec = cluster_role.get("aggregationRule") if isinstance(cluster_role, Mapping) else None
    if not isinstance(rule_spec, Mapping):
        return None
    selectors = [
        label_selector_from_dict(s) for s in rule_spec.get("clusterRoleSelectors") or [] if isinstance(s, Mapping) and s
    ]
    own_name = _meta(cluster_role).get("name")
    rules: list[Any] = []
    for other in sorted(cluster_roles, key=lambda r: str(_meta(r).get("name", ""))):
        if _meta(other).get("name") == own_name:
            continue
        labels = _meta(other).get("labels") or {}
        if any(matches(labels) for matches in selectors):
            for rule in _rules_of(other):
                if rule not in rules:
                    rules.append(rule)
    return rules


def aggregate_cluster_roles(cluster_roles: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of `cluster_roles` with every aggregated role's rules filled in, repeated until stable.

    This is what the clusterrole-aggregation controller converges to (edit includes view, admin includes edit).
    """
    result = [dict(role) for role in cluster_roles if isinstance(role, Mapping)]
    for _ in range(len(result) + 1):
        changed = False
        for index, role in enumerate(result):
            rules = aggregated_rules(role, result)
            if rules is not None and rules != role.get("rules"):
                result[index] = {**role, "rules": rules}
                changed = True
        if not changed:
            break
    return result
