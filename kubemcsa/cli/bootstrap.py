"""`kubemcsa bootstrap`: let the controller of a target cluster import service accounts from a source cluster.

The chicken-and-egg problem: the target's controller needs a credential for the source before it can import
anything from it. Bootstrap creates, in the source, a service account named after the target with the least RBAC
the controller needs; and in the target's system namespace, a ServiceAccountImport of that service account named
after the source, with its first Secret. The controller reads the import Secrets of its system namespace as
source-cluster credentials (cluster name = import name) and refreshes this one like any other, so it reaches the
source at once and keeps reaching it, without a restart.

That RBAC grants no free minting: the controller may request tokens for its own account (to rotate its
credential) and list and watch service accounts (to see which are exported to it). Tokens for any other account
need its owner's export (kubemcsa/cli/allow.py), unless --allow-all-service-accounts restores the open model.

`plan()` and the comparison functions are pure; `apply()` makes the API calls and reports each step.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import urllib3
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from kubemcsa import config
from kubemcsa.cli import status
from kubemcsa.cli.common import EXIT_OK, CommandError, add_cluster_pair_arguments, examples
from kubemcsa.cli.export import ExportError, issue_token, parse_duration
from kubemcsa.client import kube
from kubemcsa.contract import api, imports
from kubemcsa.contract.credentials import Credentials
from kubemcsa.contract.imports import IssuedToken
from kubemcsa.contract.spec import parse_spec

JSON = dict[str, Any]

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "kubemcsa"
# On source-side RBAC objects: which target cluster they were made for, to find stale ones on a later run.
TARGET_LABEL = "multicluster.admiralty.io/bootstrap-target"
RBAC_API_VERSION = "rbac.authorization.k8s.io/v1"
_MAX_NAME = 253
# The lifetime of the controller's own credential for the source: longer than the imports it serves, so that a
# source outage of less than (1 - REFRESH_FRACTION) of it heals by itself. The controller rotates it at 80 %.
DEFAULT_CREDENTIAL_SECONDS = 30 * 86400


class BootstrapError(Exception):
    """Bootstrap failed: one sentence saying which cluster and object, and what to do. Never holds a token."""


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


@dataclass
class Step:
    """What happened to one object: created, updated, unchanged or deleted."""

    side: str  # "source" or "target"
    cluster: str
    kind: str
    name: str
    namespace: str | None
    action: str

    def __str__(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.side} cluster {self.cluster!r}: {self.kind} {where} {self.action}"


@dataclass
class Result:
    steps: list[Step] = field(default_factory=list)

    def count(self, action: str) -> int:
        return sum(1 for step in self.steps if step.action == action)

    @property
    def changed(self) -> bool:
        return any(step.action != "unchanged" for step in self.steps)

    def summary(self) -> str:
        if not self.changed:
            return "Nothing to do: both clusters were already bootstrapped (every object unchanged)."
        counts = ", ".join(f"{self.count(a)} {a}" for a in ("created", "updated", "deleted", "unchanged"))
        return f"Bootstrap complete: {counts}."


# --- pure: names and the plan ----------------------------------------------------------------------------------


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


# --- pure: comparing and merging -------------------------------------------------------------------------------

_META_KEYS = ("apiVersion", "kind", "metadata", "status")


def is_subset(desired: Any, existing: Any) -> bool:
    """True if `existing` has everything `desired` has (the server may add defaults, e.g. an empty apiGroup).

    Dicts compare key by key (missing or empty desired values are ignored), lists element by element.
    """
    if isinstance(desired, dict):
        if not isinstance(existing, dict):
            return not any(_present(v) for v in desired.values())
        return all(is_subset(v, existing.get(k)) for k, v in desired.items() if _present(v))
    if isinstance(desired, list):
        if not isinstance(existing, list) or len(desired) != len(existing):
            return not desired and not existing
        return all(is_subset(d, e) for d, e in zip(desired, existing, strict=True))
    return desired == existing


def _present(value: Any) -> bool:
    return value is not None and value != "" and value != [] and value != {}


def needs_update(existing: JSON, desired: JSON) -> bool:
    """True if `existing` lacks a label, an annotation or a field of `desired`."""
    meta_d, meta_e = desired.get("metadata") or {}, existing.get("metadata") or {}
    for key in ("labels", "annotations"):
        if not is_subset(meta_d.get(key) or {}, meta_e.get(key) or {}):
            return True
    return any(not is_subset(v, existing.get(k)) for k, v in desired.items() if k not in _META_KEYS)


def needs_recreate(existing: JSON, desired: JSON) -> bool:
    """True if the difference is in a field the API server will not update (a binding's roleRef)."""
    return "roleRef" in desired and not is_subset(desired["roleRef"], existing.get("roleRef"))


def merged(existing: JSON, desired: JSON) -> JSON:
    """`existing` with the labels, annotations and fields of `desired`: what to PUT, keeping everything else."""
    body = copy.deepcopy(existing)
    meta = body.setdefault("metadata", {})
    for key in ("labels", "annotations", "ownerReferences"):
        if key in (desired.get("metadata") or {}):
            if key == "ownerReferences":
                meta[key] = _merge_owner_references(meta.get(key) or [], desired["metadata"][key])
            else:
                meta[key] = {**(meta.get(key) or {}), **desired["metadata"][key]}
    for key, value in desired.items():
        if key not in _META_KEYS:
            body[key] = copy.deepcopy(value)
    return body


def _merge_owner_references(existing: list[JSON], desired: list[JSON]) -> list[JSON]:
    # Replace references to the same kind and name (e.g. to an import that was deleted and recreated).
    keys = {(ref.get("kind"), ref.get("name")) for ref in desired}
    return [ref for ref in existing if (ref.get("kind"), ref.get("name")) not in keys] + copy.deepcopy(desired)


def stale_bindings(existing: list[JSON], desired: list[JSON]) -> list[JSON]:
    """Bindings bootstrap made earlier for this target that the current plan no longer wants."""
    wanted = {(o["kind"], (o["metadata"].get("namespace")), o["metadata"]["name"]) for o in desired}
    return [
        o
        for o in existing
        if (o.get("kind"), o["metadata"].get("namespace"), o["metadata"].get("name")) not in wanted
        and (o["metadata"].get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY_VALUE
    ]


# --- pure: the import's first Secret ---------------------------------------------------------------------------


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


# --- the edge: API calls ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    """One side of the bootstrap: an admin client, the cluster's name, and where others reach it."""

    side: str  # "source" or "target"
    name: str
    client: ApiClient
    server: str = ""
    ca_pem: bytes = b""

    def __repr__(self) -> str:
        return f"Cluster(side={self.side!r}, name={self.name!r}, server={self.server!r})"


def _describe(obj: JSON) -> str:
    meta = obj.get("metadata") or {}
    where = f"{meta['namespace']}/{meta.get('name')}" if meta.get("namespace") else meta.get("name")
    return f"{obj.get('kind')} {where}"


ADMIN_ADVICE = "use a context with cluster-admin rights there"


def _advice(exc: BaseException, cluster: Cluster, obj: JSON, admin_advice: str = ADMIN_ADVICE) -> str:
    what = f"{cluster.side} cluster {cluster.name!r}"
    if isinstance(exc, ApiException):
        reason = kube.error_reason(exc)
        if exc.status == 404 and obj.get("kind") == api.KIND:
            return (
                f"{what} does not serve {api.KIND}: install multicluster-service-account there first "
                "(kubectl apply -k manifests/)."
            )
        if exc.status == 404 and obj.get("kind") == "RoleBinding":
            ns = obj["metadata"]["namespace"]
            return f"{what} has no namespace {ns!r}: create it or remove it from --source-namespaces."
        if exc.status in (401, 403) or reason in ("Forbidden", "Unauthorized"):
            return f"{what} refused to write {_describe(obj)}: {admin_advice}."
        return (
            f"{what} refused to write {_describe(obj)} ({kube.error_message(exc)}); fix that and run bootstrap again."
        )
    return f"cannot reach {what} at {cluster.server or 'its server'}: check the context and the network."


class Applier:
    """Brings objects of one cluster to a desired state, reporting each step (shared by bootstrap and allow)."""

    def __init__(
        self, cluster: Cluster, result: Result, report: Callable[[str], None], admin_advice: str = ADMIN_ADVICE
    ) -> None:
        self.cluster = cluster
        self.result = result
        self.report = report
        self.admin_advice = admin_advice

    def step(self, obj: JSON, action: str) -> None:
        meta = obj.get("metadata") or {}
        step = Step(
            self.cluster.side, self.cluster.name, obj["kind"], meta.get("name", ""), meta.get("namespace"), action
        )
        self.result.steps.append(step)
        self.report(str(step))

    def call(self, obj: JSON, fn: Callable[[], JSON]) -> JSON:
        try:
            return fn()
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise BootstrapError(_advice(exc, self.cluster, obj, self.admin_advice)) from None

    def ensure(self, desired: JSON) -> JSON:
        """Create `desired`, or bring the existing object up to it; report and return the object as stored."""
        resource = kube.Resource(self.cluster.client, kube.resource_type_of(desired))
        meta = desired["metadata"]
        namespace = meta.get("namespace")
        try:
            existing = resource.get(meta["name"], namespace=namespace)
        except ApiException as exc:
            if exc.status != 404 or kube.error_reason(exc) not in ("NotFound", ""):
                raise BootstrapError(_advice(exc, self.cluster, desired, self.admin_advice)) from None
            if desired["kind"] == api.KIND and not kube.error_status(exc).get("details", {}).get("name"):
                # The type itself is missing.
                raise BootstrapError(_advice(exc, self.cluster, desired, self.admin_advice)) from None
            existing = None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise BootstrapError(_advice(exc, self.cluster, desired, self.admin_advice)) from None
        if existing is None:
            stored = self.call(desired, lambda: resource.create(desired, namespace=namespace))
            self.step(desired, "created")
            return stored
        if not needs_update(existing, desired):
            self.step(desired, "unchanged")
            return existing
        if needs_recreate(existing, desired):
            self.call(desired, lambda: resource.delete(meta["name"], namespace=namespace))
            stored = self.call(desired, lambda: resource.create(desired, namespace=namespace))
        else:
            stored = self.call(desired, lambda: resource.replace(merged(existing, desired), namespace=namespace))
        self.step(desired, "updated")
        return stored

    def delete(self, obj: JSON) -> None:
        resource = kube.Resource(self.cluster.client, kube.resource_type_of(obj))
        meta = obj["metadata"]
        try:
            resource.delete(meta["name"], namespace=meta.get("namespace"))
        except ApiException as exc:
            if exc.status != 404:
                raise BootstrapError(_advice(exc, self.cluster, obj, self.admin_advice)) from None
        self.step(obj, "deleted")

    def list_managed(self, resource_type: kube.ResourceType, selector: str) -> list[JSON]:
        resource = kube.Resource(self.cluster.client, resource_type)
        probe = {"kind": resource_type.kind, "metadata": {"name": f"({selector})"}}
        items = self.call(probe, lambda: resource.list(label_selector=selector)).get("items") or []
        for item in items:
            item.setdefault("kind", resource_type.kind)
        return items


def apply(
    the_plan: Plan,
    source: Cluster,
    target: Cluster,
    *,
    report: Callable[[str], None] = print,
    clock: Callable[[], float] = time.time,
) -> Result:
    """Make both clusters match `the_plan`, reporting each object as it is handled; BootstrapError on failure."""
    result = Result()
    src = Applier(source, result, report)
    for obj in the_plan.source:
        src.ensure(obj)
    # Bindings made by an earlier run with other --source-namespaces would grant more than asked: remove them.
    selector = f"{MANAGED_BY_LABEL}={MANAGED_BY_VALUE},{TARGET_LABEL}={the_plan.target_label}"
    bindings = [o for o in the_plan.source if o["kind"] in ("ClusterRoleBinding", "RoleBinding")]
    existing = src.list_managed(kube.CLUSTER_ROLE_BINDINGS, selector) + src.list_managed(kube.ROLE_BINDINGS, selector)
    for obj in stale_bindings(existing, bindings):
        src.delete(obj)

    dst = Applier(target, result, report)
    stored_import: JSON = {}
    for obj in the_plan.target:
        stored = dst.ensure(obj)
        if obj["kind"] == api.KIND:
            stored_import = stored
    _ensure_import_secret(the_plan, stored_import, source, dst, clock)
    return result


def _ensure_import_secret(
    the_plan: Plan, import_obj: JSON, source: Cluster, dst: Applier, clock: Callable[[], float]
) -> None:
    secrets = kube.Resource(dst.cluster.client, kube.SECRETS)
    name = api.secret_name_for_import(the_plan.import_name)
    probe = {"kind": "Secret", "metadata": {"name": name, "namespace": api.SYSTEM_NAMESPACE}}
    try:
        existing: JSON | None = secrets.get(name, namespace=api.SYSTEM_NAMESPACE)
    except ApiException as exc:
        if exc.status != 404:
            raise BootstrapError(_advice(exc, dst.cluster, probe)) from None
        existing = None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise BootstrapError(_advice(exc, dst.cluster, probe)) from None
    if existing is not None and secret_is_current(
        existing, import_obj, server=source.server, ca_pem=source.ca_pem, now=clock()
    ):
        dst.step(probe, "unchanged")
        return
    where = f"source cluster {source.name!r}"
    try:
        issued = issue_token(
            source.client,
            the_plan.service_account,
            api.SYSTEM_NAMESPACE,
            expiration_seconds=the_plan.credential_seconds,
            where=where,
        )
    except ExportError as exc:
        raise BootstrapError(f"cannot get a token for the controller: {exc}") from None
    creds = Credentials(server=source.server, ca_crt=source.ca_pem, token=issued.token, namespace=api.SYSTEM_NAMESPACE)
    if issued.expires_at is None:  # an answer without expiry: the requested one, as the controller assumes
        issued = IssuedToken(issued.token, issued.issued_at, issued.issued_at + the_plan.credential_seconds)
    token = imports.ImportToken(creds, issued, wanted_inputs(import_obj, source.server, source.ca_pem))
    # Built as the controller builds it, so the controller adopts it without a token request of its own.
    desired = imports.import_secret(import_obj, token, the_plan.source_name, existing)
    _pin(dst, import_obj, existing, desired)
    if existing is None:
        dst.call(desired, lambda: secrets.create(desired, namespace=api.SYSTEM_NAMESPACE))
        dst.step(desired, "created")
    else:
        dst.call(desired, lambda: secrets.replace(desired, namespace=api.SYSTEM_NAMESPACE))
        dst.step(desired, "updated")


# How often bootstrap re-reads the import when the controller changed its status between bootstrap's read and its
# pin (each retry means another writer got in between).
_PIN_ATTEMPTS = 5


def _pin(dst: Applier, import_obj: JSON, existing: JSON | None, desired: JSON) -> None:
    """Pin the Secret about to be written in the import's status (kubemcsa.contract.imports), as an admin may: the
    controller
    takes as a credential only a Secret its writer pinned, so that whoever may merely create Secrets in the system
    namespace cannot make one. The pin of the Secret it replaces stays until the write lands."""
    resource = kube.Resource(dst.cluster.client, kube.SERVICE_ACCOUNT_IMPORTS)
    meta = import_obj["metadata"]
    current = import_obj
    for _ in range(_PIN_ATTEMPTS):
        body = imports.pins_patch(current, imports.pins_for_write(current, existing, desired))
        try:
            resource.patch_status(meta["name"], body, namespace=meta["namespace"])
            return
        except ApiException as exc:
            if exc.status != 409:
                raise BootstrapError(_advice(exc, dst.cluster, import_obj)) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise BootstrapError(_advice(exc, dst.cluster, import_obj)) from None
        current = dst.call(import_obj, lambda: resource.get(meta["name"], namespace=meta["namespace"]))
    raise BootstrapError(
        f"target cluster {dst.cluster.name!r}: the status of {api.KIND} {meta['namespace']}/{meta['name']} kept "
        f"changing while bootstrap pinned its credential; run bootstrap again."
    )


# --- the command ------------------------------------------------------------------------------------------------


def register(commands: argparse._SubParsersAction, prog: str) -> None:
    boot = commands.add_parser(
        "bootstrap",
        help="let the controller of a target cluster import service accounts from a source cluster",
        description=(
            "In the source cluster, create the namespace multicluster-service-account, a service account named "
            "after the target cluster and the least RBAC the controller needs: request tokens for that account "
            "only, and list and watch service accounts to see which their owners export to it (kubemcsa allow). "
            "In the target cluster, create a ServiceAccountImport named after the source cluster for that "
            "service account, and its first Secret, so that the controller reaches the source at once. Running it "
            "again changes nothing and says so."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=examples(
            f"""
            {prog} bootstrap --target-context cluster1 --source-context cluster2
            {prog} bootstrap --target-context c1 --source-context c2 --target-kubeconfig c1 --source-kubeconfig c2
            {prog} bootstrap --target-context c1 --source-context c2 --source-namespaces team-a,team-b
            {prog} bootstrap --target-context c1 --source-context c2 --wait 60   # until the controller uses it
            {prog} bootstrap --target-context kind-a --source-context kind-b --source-server https://10.0.0.7:6443
            """
        ),
    )
    add_cluster_pair_arguments(boot)
    boot.add_argument(
        "--source-namespaces",
        metavar="NS[,NS...]",
        help="grant access in these source namespaces only (default: all namespaces)",
    )
    boot.add_argument(
        "--legacy-tokens",
        action="store_true",
        help="also let the controller read service accounts and create and read legacy token Secrets in the source "
        "(clusters before 1.22); needs --allow-all-service-accounts",
    )
    boot.add_argument(
        "--allow-all-service-accounts",
        action="store_true",
        help="DANGEROUS: the original's open model; let the controller get a token for ANY service account of the "
        "source (in --source-namespaces), without its owner's export",
    )
    boot.add_argument(
        "--credential-duration",
        default="30d",
        metavar="DURATION",
        help="lifetime of the controller's own credential for the source, rotated by the controller at 80 %% "
        "(default: 30d; a source outage shorter than a fifth of it heals by itself)",
    )
    boot.add_argument(
        "--wait",
        type=float,
        default=0,
        metavar="SECONDS",
        help="wait up to SECONDS for the target's controller to report the bootstrap import Ready (default: no wait)",
    )
    boot.add_argument(
        "--source-server",
        metavar="URL",
        help="URL the target reaches the source at, if not the one in the source kubeconfig (e.g. kind clusters)",
    )
    boot.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:

    try:
        credential_seconds = parse_duration(args.credential_duration)
    except ValueError as exc:
        raise CommandError(f"--credential-duration {exc}") from None
    source_info = config.context_cluster_info(args.source_context, args.source_kubeconfig)
    target_info = config.context_cluster_info(args.target_context, args.target_kubeconfig)
    the_plan = plan(
        args.target_name or target_info.cluster_name,
        args.source_name or source_info.cluster_name,
        source_namespaces=args.source_namespaces.split(",") if args.source_namespaces is not None else None,
        legacy_tokens=args.legacy_tokens,
        credential_seconds=credential_seconds,
        allow_all_service_accounts=args.allow_all_service_accounts,
    )
    if the_plan.allow_all_service_accounts:
        print(allow_all_warning(the_plan), file=sys.stderr, flush=True)
    source_server = (args.source_server or source_info.server).rstrip("/")
    if not source_server.startswith("https://"):
        raise CommandError(f"--source-server {source_server!r} is not an https:// URL; give the API server's URL.")
    source_client = config.context_config_and_namespace(source_info.context, args.source_kubeconfig).api_client()
    target_client = config.context_config_and_namespace(target_info.context, args.target_kubeconfig).api_client()
    try:
        print(
            f"Bootstrapping target cluster {the_plan.target_name!r} (context {target_info.context!r}) to import from "
            f"source cluster {the_plan.source_name!r} (context {source_info.context!r})",
            flush=True,
        )
        result = apply(
            the_plan,
            Cluster("source", the_plan.source_name, source_client, source_server, source_info.ca_pem),
            Cluster("target", the_plan.target_name, target_client, target_info.server),
            report=lambda line: print(line, flush=True),
        )
        print(result.summary(), flush=True)
        if args.wait > 0:
            _wait_for_bootstrap_import(target_client, the_plan.import_name, the_plan.target_name, args.wait)
        elif result.changed:
            print(
                f"The controller in {the_plan.target_name!r} can now reach {the_plan.source_name!r}; check with: "
                f"kubemcsa status -n {api.SYSTEM_NAMESPACE} --context {target_info.context}"
            )
    finally:
        source_client.close()
        target_client.close()
    return EXIT_OK


def _wait_for_bootstrap_import(client: ApiClient, name: str, target: str, timeout: float) -> None:
    """Poll the bootstrap import until the controller reports it Ready; CommandError with its reason if not."""

    imports = kube.Resource(client, kube.SERVICE_ACCOUNT_IMPORTS)
    print(f"Waiting up to {timeout:g}s for the controller in {target!r} to report import {name} Ready...", flush=True)
    deadline = time.monotonic() + timeout
    while True:
        row = status.import_status(imports.get(name, api.SYSTEM_NAMESPACE), dt.datetime.now(dt.UTC))
        if row.is_ready:
            print(f"Import {api.SYSTEM_NAMESPACE}/{name} is Ready: {row.message}")
            return
        if time.monotonic() > deadline:
            raise CommandError(
                f"the controller in target cluster {target!r} has not reported import {api.SYSTEM_NAMESPACE}/{name} "
                f"Ready within {timeout:g}s ({row.reason}: {row.message}); check that it is installed and running."
            )
        time.sleep(0.2)  # polling the import's status; a watch would need its own thread for a one-off wait
