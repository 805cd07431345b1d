"""What `kubemcsa bootstrap` creates in each cluster, decided from names and flags alone (pure): the source's
namespace, service account and least RBAC, the target's import and its first Secret (kubemcsa/cli/bootstrap.py
applies it).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from kubemcsa.client.apply import (
    JSON,
    MANAGED_BY_LABEL,
    MANAGED_BY_VALUE,
)
from kubemcsa.client.apply import ApplyError as BootstrapError
from kubemcsa.contract import api, imports
from kubemcsa.contract.spec import parse_spec

# On source-side RBAC objects: which target cluster they were made for, to find stale ones on a later run.
TARGET_LABEL = "multicluster.admiralty.io/bootstrap-target"


RBAC_API_VERSION = "rbac.authorization.k8s.io/v1"


_MAX_NAME = 253


# The lifetime of the controller's own credential for the source: longer than the imports it serves, so that a
# source outage of less than (1 - REFRESH_FRACTION) of it heals by itself. The controller rotates it at 80 %.
DEFAULT_CREDENTIAL_SECONDS = 30 * 86400


@dataclass(frozen=True)
class Plan:
    """The objects bootstrap wants in each cluster (the import's Secret is built later: it needs a token)."""

    target_name: str
    source_name: str
    source: list[JSON]
    target: list[JSON]
    rbac_name: str
    target_label: str  # the value of TARGET_LABEL on the source RBAC objects
    legacy_tokens: bool
    source_namespaces: tuple[str, ...] | None
    credential_seconds: int = DEFAULT_CREDENTIAL_SECONDS
    allow_all_service_accounts: bool = False

    @property
    def service_account(self) -> str:
        return api.consumer_service_account(self.target_name)

    @property
    def import_name(self) -> str:
        return self.source_name


def suggest_name(value: str) -> str:
    """A valid Kubernetes name close to `value` (kubeconfig cluster names like `gke_p_z_c` or ARNs are not)."""
    labels = (re.sub(r"[^a-z0-9-]+", "-", part).strip("-") for part in value.lower().split("."))
    cleaned = ".".join(label for label in labels if label)[:63].strip("-.")
    return cleaned.replace(".-", ".").replace("-.", ".") or "cluster"


def check_cluster_name(name: str, role: str, flag: str) -> None:
    """BootstrapError unless `name` can name a ServiceAccount and a ServiceAccountImport (a DNS subdomain)."""
    if not api.is_dns_subdomain(name):
        raise BootstrapError(
            f"the {role} cluster name {name!r} is not a valid Kubernetes name; pass {flag} {suggest_name(name)}."
        )


def rbac_name_for_target(target_name: str, suffix: str = "") -> str:
    """The name of the ClusterRole and bindings granted to a target cluster in the source (with `suffix`, of the
    Role and RoleBinding for its own token)."""
    name = f"{api.SYSTEM_NAMESPACE}-{target_name}{suffix}"
    if len(name) <= _MAX_NAME:
        return name
    digest = hashlib.sha256(target_name.encode()).hexdigest()[:8]
    return f"{name[: _MAX_NAME - 9 - len(suffix)].rstrip('-.')}-{digest}{suffix}"


OWN_TOKEN_SUFFIX = "-own-token"


def controller_rules(legacy_tokens: bool, allow_all_service_accounts: bool = False) -> list[JSON]:
    """What the target's controller may do in the source's watched namespaces: see which accounts are exported.

    Tokens for those accounts are granted by their owners (kubemcsa allow). `allow_all_service_accounts` is the
    original's open model: tokens for every account. Legacy long-lived tokens live in Secrets the controller
    creates and reads back (RBAC cannot limit creating Secrets by name, so that is open too); while one stays
    empty, the controller reads the service account to tell a missing account from a slow token controller.
    """
    rules: list[JSON] = [{"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["list", "watch"]}]
    if allow_all_service_accounts:
        rules.append({"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]})
    if legacy_tokens:
        rules.append({"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get"]})
        rules.append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "get"]})
    return rules


def own_token_rules(target_name: str) -> list[JSON]:
    """The controller may request tokens for its own account in the source, to keep its credential rotated."""
    return [
        {
            "apiGroups": [""],
            "resources": ["serviceaccounts/token"],
            "resourceNames": [api.consumer_service_account(target_name)],
            "verbs": ["create"],
        }
    ]


def allow_all_warning(the_plan: Plan) -> str:
    """What --allow-all-service-accounts gives away, said loudly."""
    where = (
        f"namespaces {', '.join(the_plan.source_namespaces)}"
        if the_plan.source_namespaces
        else "every namespace, kube-system included"
    )
    return (
        f"WARNING: --allow-all-service-accounts lets the controller of cluster {the_plan.target_name!r} (and anyone "
        f"who can create an import there) get a token for ANY service account of cluster {the_plan.source_name!r} "
        f"in {where}, without its owner's consent; prefer owners exporting theirs with `kubemcsa allow`."
    )


def plan(
    target_name: str,
    source_name: str,
    *,
    source_namespaces: list[str] | None = None,
    legacy_tokens: bool = False,
    credential_seconds: int = DEFAULT_CREDENTIAL_SECONDS,
    allow_all_service_accounts: bool = False,
) -> Plan:
    """The desired objects in each cluster; BootstrapError if a name is invalid."""
    check_cluster_name(target_name, "target", "--target-name")
    check_cluster_name(source_name, "source", "--source-name")
    if legacy_tokens and not allow_all_service_accounts:
        raise BootstrapError(
            "--legacy-tokens lets the controller make long-lived tokens for any service account (RBAC cannot limit "
            "creating token Secrets by name); add --allow-all-service-accounts to accept that."
        )
    namespaces = None
    if source_namespaces is not None:
        namespaces = tuple(dict.fromkeys(ns.strip() for ns in source_namespaces if ns.strip()))
        if not namespaces:
            raise BootstrapError("--source-namespaces is empty; list namespaces like a,b or drop the flag.")
        for ns in namespaces:
            if not api.is_dns_label(ns):
                raise BootstrapError(f"{ns!r} in --source-namespaces is not a valid namespace name; fix the list.")
    system = api.SYSTEM_NAMESPACE
    rbac_name = rbac_name_for_target(target_name)
    labels = {MANAGED_BY_LABEL: MANAGED_BY_VALUE}
    # Label values stop at 63 characters; a longer target name is identified by its hash.
    target_label = target_name if len(target_name) <= 63 else _hash(target_name)
    rbac_labels = {**labels, TARGET_LABEL: target_label}
    subject = {"kind": "ServiceAccount", "name": api.consumer_service_account(target_name), "namespace": system}
    role_ref = {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": rbac_name}
    own_token_name = rbac_name_for_target(target_name, OWN_TOKEN_SUFFIX)

    source: list[JSON] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": system}},
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": api.consumer_service_account(target_name), "namespace": system, "labels": labels},
        },
        {
            "apiVersion": RBAC_API_VERSION,
            "kind": "Role",
            "metadata": {"name": own_token_name, "namespace": system, "labels": rbac_labels},
            "rules": own_token_rules(target_name),
        },
        {
            "apiVersion": RBAC_API_VERSION,
            "kind": "RoleBinding",
            "metadata": {"name": own_token_name, "namespace": system, "labels": rbac_labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": own_token_name},
            "subjects": [subject],
        },
        {
            "apiVersion": RBAC_API_VERSION,
            "kind": "ClusterRole",
            "metadata": {"name": rbac_name, "labels": rbac_labels},
            "rules": controller_rules(legacy_tokens, allow_all_service_accounts),
        },
    ]
    if namespaces is None:
        source.append(
            {
                "apiVersion": RBAC_API_VERSION,
                "kind": "ClusterRoleBinding",
                "metadata": {"name": rbac_name, "labels": rbac_labels},
                "roleRef": role_ref,
                "subjects": [subject],
            }
        )
    else:
        source.extend(
            {
                "apiVersion": RBAC_API_VERSION,
                "kind": "RoleBinding",
                "metadata": {"name": rbac_name, "namespace": ns, "labels": rbac_labels},
                "roleRef": role_ref,
                "subjects": [subject],
            }
            for ns in namespaces
        )
    target: list[JSON] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": system}},
        {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "metadata": {"name": source_name, "namespace": system, "labels": labels},
            "spec": {
                "clusterName": source_name,
                "namespace": system,
                "name": api.consumer_service_account(target_name),
                "expirationSeconds": credential_seconds,
            },
        },
    ]
    return Plan(
        target_name=target_name,
        source_name=source_name,
        source=source,
        target=target,
        rbac_name=rbac_name,
        target_label=target_label,
        legacy_tokens=legacy_tokens,
        source_namespaces=namespaces,
        credential_seconds=credential_seconds,
        allow_all_service_accounts=allow_all_service_accounts,
    )


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:16]


def wanted_inputs(import_obj: JSON, server: str, ca_pem: bytes) -> str:
    """What the controller will expect the bootstrap import's token to be issued for (kubemcsa.contract.imports)."""
    return imports.inputs_hash(parse_spec(import_obj), server, ca_pem)


def secret_is_current(existing: JSON, import_obj: JSON, *, server: str, ca_pem: bytes, now: float) -> bool:
    """True if the import Secret is one the controller would keep as it is (then a re-run leaves it alone).

    The same test as the controller's: owned by this import, pinned in its status by the controller or an earlier
    bootstrap (so written by one of them), unedited, issued for this spec, server and CA, and not yet due for
    refresh. A Secret the controller refreshed since passes too. One that matches no pin (written before pins
    existed, or by someone else) is replaced: bootstrap vouches only for what it writes.
    """
    meta = existing.get("metadata") or {}
    if (meta.get("labels") or {}).get(api.IMPORT_LABEL) != import_obj["metadata"]["name"]:
        return False
    if not imports.is_controlled_by(existing, import_obj["metadata"].get("uid", "")):
        return False
    if not imports.is_pinned(existing, import_obj):
        return False
    return imports.secret_is_current(existing, wanted_inputs(import_obj, server, ca_pem), now)
