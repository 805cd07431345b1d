"""`kubemcsa allow` and `kubemcsa disallow`: the owner of a service account decides who may import it.

An export is two things in the source cluster, both next to the service account:
- RBAC, which the source's API server enforces: a Role granting `create` on `serviceaccounts/token` for this one
  account (`resourceNames`) and a RoleBinding of it to each consumer cluster's identity there
  (`system:serviceaccount:multicluster-service-account:<consumer cluster>`, made by `kubemcsa bootstrap`);
- the label `multicluster.admiralty.io/exported: "true"` and the annotation `multicluster.admiralty.io/export-to`,
  which consumer controllers watch, to enforce the namespace part (kubemcsa/contract/export_policy.py).

`plan_allow` and `plan_disallow` are pure; `apply` makes the calls, idempotently, and reports each step.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from kubemcsa import config
from kubemcsa.cli.bootstrap_plan import RBAC_API_VERSION
from kubemcsa.cli.common import EXIT_OK, examples
from kubemcsa.client import kube
from kubemcsa.client.apply import MANAGED_BY_LABEL, MANAGED_BY_VALUE, Applier, Cluster, Result
from kubemcsa.client.apply import ApplyError as BootstrapError
from kubemcsa.contract import api
from kubemcsa.contract.export_policy import (
    MAX_EXPORT_TO_ENTRIES,
    MAX_EXPORT_TO_LENGTH,
    ExportPattern,
    ExportTo,
    export_to_of,
    format_export_to,
    glob_match,
    parse_pattern,
)

JSON = dict[str, Any]
# On the Role and RoleBinding: the service account they export (hashed when too long for a label value).
EXPORT_OF_LABEL = "multicluster.admiralty.io/export-of"
_RBAC_PREFIX = "multicluster-service-account-export-"
_MAX_NAME = 253


class AllowError(Exception):
    """allow/disallow failed: one sentence saying what and what to do. Never holds a token."""


@dataclass(frozen=True)
class ExportPlan:
    """What a service account's export should become: its export-to patterns and the objects that grant them."""

    namespace: str
    name: str
    export_to: tuple[ExportPattern, ...]
    service_account_patch: JSON | None  # a merge patch of the account's label and annotation; None: unchanged
    role: JSON | None  # None: there should be none
    binding: JSON | None
    still_allowed: tuple[tuple[ExportPattern, ExportPattern], ...] = ()  # (asked to disallow, still matched by)
    # Items of the annotation that are not patterns (they allowed nobody): the rewritten annotation leaves them out.
    dropped: tuple[str, ...] = ()

    @property
    def consumers(self) -> tuple[str, ...]:
        """The consumer clusters whose identity RBAC lets request this account's tokens."""
        return granted_clusters(self.export_to)


def _short(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    return f"{value[: limit - 9].rstrip('-.')}-{hashlib.sha256(value.encode()).hexdigest()[:8]}"


def export_rbac_name(service_account: str) -> str:
    """The name of the Role and RoleBinding that export `service_account` (in its namespace)."""
    return _short(_RBAC_PREFIX + service_account, _MAX_NAME)


def parse_targets(values: Iterable[str], *, flag: str = "--to") -> tuple[ExportPattern, ...]:
    """The CONSUMER_CLUSTER/NAMESPACE patterns given on the command line (comma-separated, repeatable), strictly.

    The cluster part must name one cluster: RBAC grants to an identity, not to a pattern.
    """
    patterns: list[ExportPattern] = []
    for value in values:
        for item in value.split(","):
            if not item.strip():
                continue
            try:
                pattern = parse_pattern(item)
            except ValueError as exc:
                raise AllowError(f"{flag}: {exc}") from None
            if not pattern.cluster_is_literal:
                raise AllowError(
                    f"{flag}: the cluster part of {item.strip()!r} is a pattern; name each consumer cluster, as RBAC "
                    "grants tokens to one cluster's identity at a time."
                )
            if not api.is_dns_subdomain(pattern.cluster):
                raise AllowError(f"{flag}: {pattern.cluster!r} is not a cluster name; use the name bootstrap gave it.")
            if pattern not in patterns:
                patterns.append(pattern)
    if not patterns:
        raise AllowError(f"{flag} is empty; list CLUSTER/NAMESPACE patterns like cluster1/team-a,cluster1/ci-*.")
    return tuple(patterns)


def granted_clusters(patterns: Iterable[ExportPattern]) -> tuple[str, ...]:
    """The clusters named literally by `patterns`: those the RoleBinding binds."""
    return tuple(sorted({p.cluster for p in patterns if p.cluster_is_literal}))


def export_role(namespace: str, name: str) -> JSON:
    return {
        "apiVersion": RBAC_API_VERSION,
        "kind": "Role",
        "metadata": {"name": export_rbac_name(name), "namespace": namespace, "labels": _labels(name)},
        "rules": [
            {"apiGroups": [""], "resources": ["serviceaccounts/token"], "resourceNames": [name], "verbs": ["create"]}
        ],
    }


def export_binding(namespace: str, name: str, clusters: Iterable[str]) -> JSON:
    return {
        "apiVersion": RBAC_API_VERSION,
        "kind": "RoleBinding",
        "metadata": {"name": export_rbac_name(name), "namespace": namespace, "labels": _labels(name)},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": export_rbac_name(name)},
        "subjects": [
            {"kind": "ServiceAccount", "name": api.consumer_service_account(c), "namespace": api.SYSTEM_NAMESPACE}
            for c in clusters
        ],
    }


def _labels(name: str) -> dict[str, str]:
    return {MANAGED_BY_LABEL: MANAGED_BY_VALUE, EXPORT_OF_LABEL: _short(name, 63).strip("-.")}


def _plan(service_account: JSON, export_to: tuple[ExportPattern, ...]) -> ExportPlan:
    meta = service_account.get("metadata") or {}
    namespace, name = meta.get("namespace", ""), meta.get("name", "")
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    value = format_export_to(export_to)
    if len(export_to) > MAX_EXPORT_TO_ENTRIES or len(value) > MAX_EXPORT_TO_LENGTH:
        # Written, it would export to nobody: consumer controllers do not read an annotation over their caps.
        raise AllowError(
            f"service account {namespace}/{name} would be exported to {len(export_to)} patterns "
            f"({len(value)} characters), more than the {MAX_EXPORT_TO_ENTRIES} patterns or {MAX_EXPORT_TO_LENGTH} "
            "characters consumer controllers read; cover many namespaces with one pattern such as cluster1/team-*."
        )
    if export_to:
        wanted_label, wanted_annotation = api.EXPORTED_LABEL_VALUE, value
    else:
        wanted_label = wanted_annotation = None
    patch: JSON = {}
    if labels.get(api.EXPORTED_LABEL) != wanted_label:
        patch.setdefault("metadata", {})["labels"] = {api.EXPORTED_LABEL: wanted_label}
    if annotations.get(api.EXPORT_TO_ANNOTATION) != wanted_annotation:
        patch.setdefault("metadata", {})["annotations"] = {api.EXPORT_TO_ANNOTATION: wanted_annotation}
    clusters = granted_clusters(export_to)
    return ExportPlan(
        namespace=namespace,
        name=name,
        export_to=export_to,
        service_account_patch=patch or None,
        role=export_role(namespace, name) if clusters else None,
        binding=export_binding(namespace, name, clusters) if clusters else None,
    )


def _readable_export_to(service_account: JSON) -> ExportTo:
    """What its owner allowed so far, to build on; AllowError if the annotation is over a cap: it cannot be read, so
    rewriting it would lose what it says."""
    current = export_to_of(service_account)
    if current.too_large:
        meta = service_account.get("metadata") or {}
        namespace, name = meta.get("namespace", ""), meta.get("name", "")
        raise AllowError(
            f"the {api.EXPORT_TO_ANNOTATION} annotation of service account {namespace}/{name} {current.too_large}, "
            "so it is left as it is rather than rewritten without what it says; shorten it with kubectl annotate, "
            f"or withdraw it all with `kubemcsa disallow {name} -n {namespace} --all`, then run this again."
        )
    return current


def plan_allow(service_account: JSON, targets: Iterable[ExportPattern]) -> ExportPlan:
    """The export of `service_account` with `targets` added to what its owner already allowed."""
    current = _readable_export_to(service_account)
    plan = _plan(service_account, tuple(dict.fromkeys((*current.patterns, *targets))))
    return dataclasses.replace(plan, dropped=current.rejected)


def plan_disallow(service_account: JSON, targets: Iterable[ExportPattern] | None) -> ExportPlan:
    """The export of `service_account` without the patterns `targets` cover (None: without any, whatever its
    annotation says)."""
    if targets is None:
        return _plan(service_account, ())
    current = _readable_export_to(service_account)
    targets = tuple(targets)

    def covered(p: ExportPattern) -> bool:
        return any(glob_match(t.cluster, p.cluster) and glob_match(t.namespace, p.namespace) for t in targets)

    kept = tuple(p for p in current.patterns if not covered(p))
    still = tuple(
        (t, p)
        for t in targets
        for p in kept
        if t.cluster_is_literal and "*" not in t.namespace and p.matches(t.cluster, t.namespace)
    )
    return dataclasses.replace(_plan(service_account, kept), still_allowed=still, dropped=current.rejected)


def summary(plan: ExportPlan, source: str) -> str:
    """One line for the end of the command: to whom the account is exported now."""
    what = f"Service account {plan.namespace}/{plan.name} of cluster {source!r}"
    if not plan.export_to:
        return f"{what} is not exported: no consumer cluster may import it."
    line = f"{what} is exported to {format_export_to(plan.export_to)}"
    if plan.consumers:
        line += f" (RBAC lets {', '.join(plan.consumers)} request its tokens)"
    return line + "."


# --- the edge: API calls ---------------------------------------------------------------------------------------


def apply(
    client: ApiClient,
    source: str,
    namespace: str,
    name: str,
    decide: Callable[[JSON], ExportPlan],
    *,
    report: Callable[[str], None] = print,
) -> ExportPlan:
    """Read the service account, decide its export with `decide` (plan_allow or plan_disallow), make it so.

    Allowing grants RBAC before labelling the account (consumers see it only once its tokens can be had);
    disallowing unlabels it before revoking RBAC (consumers drop it before their requests start failing).
    """
    cluster = Cluster("source", source, client)
    accounts = kube.Resource(client, kube.SERVICE_ACCOUNTS)
    what = f"service account {namespace}/{name} in cluster {source!r}"
    try:
        service_account = accounts.get(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            raise AllowError(f"{what} does not exist; create it first, or fix the name and -n.") from None
        if exc.status in (401, 403):
            raise AllowError(f"you may not read {what}; use a context of its namespace's admin.") from None
        raise AllowError(f"cluster {source!r} refused to read {what}: {kube.error_message(exc)}.") from None
    except (urllib3.exceptions.HTTPError, OSError):
        raise AllowError(f"cannot reach cluster {source!r}; check the context and the network.") from None
    plan = decide(service_account)
    applier = Applier(cluster, Result(), report, admin_advice=_ADMIN_ADVICE)
    try:
        if plan.export_to:
            for obj in (plan.role, plan.binding):
                if obj is not None:
                    applier.ensure(obj)
            _update_service_account(applier, accounts, plan)
            if plan.binding is None:
                _remove_rbac(applier, namespace, name)
        else:
            _update_service_account(applier, accounts, plan)
            _remove_rbac(applier, namespace, name)
    except BootstrapError as exc:
        raise AllowError(str(exc)) from None
    return plan


_ADMIN_ADVICE = "use a context of the namespace's admin there"


def _update_service_account(applier: Applier, accounts: kube.Resource, plan: ExportPlan) -> None:
    obj = {"kind": "ServiceAccount", "metadata": {"name": plan.name, "namespace": plan.namespace}}
    if plan.service_account_patch is None:
        applier.step(obj, "unchanged")
        return
    applier.call(obj, lambda: accounts.patch(plan.name, plan.service_account_patch, plan.namespace))
    value = format_export_to(plan.export_to) or "nobody"
    applier.step(obj, f"updated (export-to: {value})")


def _remove_rbac(applier: Applier, namespace: str, name: str) -> None:
    for rtype in (kube.ROLE_BINDINGS, kube.ROLES):
        obj = {"kind": rtype.kind, "apiVersion": rtype.api_version}
        obj["metadata"] = {"name": export_rbac_name(name), "namespace": namespace}
        resource = kube.Resource(applier.cluster.client, rtype)
        try:
            resource.get(export_rbac_name(name), namespace)
        except ApiException as exc:
            if exc.status == 404:
                continue
            raise AllowError(
                f"cluster {applier.cluster.name!r} refused to read {rtype.kind} {namespace}/{export_rbac_name(name)}; "
                f"{_ADMIN_ADVICE}."
            ) from None
        applier.delete(obj)


# --- the command ------------------------------------------------------------------------------------------------


def register(commands: argparse._SubParsersAction, prog: str) -> None:
    for verb in ("allow", "disallow"):
        _register(commands, prog, verb)


def _register(commands: argparse._SubParsersAction, prog: str, verb: str) -> None:
    allow = verb == "allow"
    cmd = commands.add_parser(
        verb,
        help=(
            "export a service account to consumer clusters and namespaces (as its owner, in its cluster)"
            if allow
            else "withdraw a service account's export from consumer clusters and namespaces"
        ),
        description=(
            "As the owner of service account NAME, let namespaces of consumer clusters import it: in its namespace, "
            "a Role and RoleBinding let each consumer cluster's controller request its tokens (the cluster's RBAC "
            "enforces that), and its label multicluster.admiralty.io/exported and annotation "
            "multicluster.admiralty.io/export-to say which namespaces of those clusters may (their controllers "
            "enforce that). Running it again changes nothing."
            if allow
            else "Withdraw the export of service account NAME from the CLUSTER/NAMESPACE patterns given (--to), or "
            "from everyone (--all): its annotation loses them, and consumer clusters no longer named lose the RBAC to "
            "request its tokens. Imports of it turn NotExported and lose their token within seconds; tokens "
            "already issued stay valid until they expire."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=examples(
            f"""
            {prog} allow pod-lister -n default --context cluster2 --to cluster1/team-a
            {prog} allow deployer -n ci --context cluster2 --to 'cluster1/ci-*,cluster3/*'
            """
            if allow
            else f"""
            {prog} disallow pod-lister -n default --context cluster2 --to cluster1/team-a
            {prog} disallow deployer -n ci --context cluster2 --all
            """
        ),
    )
    cmd.add_argument("name", metavar="NAME", help="the service account")
    cmd.add_argument("-n", "--namespace", help="namespace of the service account (default: the context's)")
    cmd.add_argument("--context", help="kubeconfig context of the service account's (source) cluster")
    cmd.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config)")
    to_help = (
        "consumer CLUSTER/NAMESPACE, comma-separated or repeated; '*' globs the namespace (cluster1/ci-*); "
        "CLUSTER is the name bootstrap gave the consumer cluster"
    )
    if allow:
        cmd.add_argument("--to", action="append", required=True, metavar="CLUSTER/NAMESPACE[,...]", help=to_help)
    else:
        which = cmd.add_mutually_exclusive_group(required=True)
        which.add_argument("--to", action="append", metavar="CLUSTER/NAMESPACE[,...]", help=to_help)
        which.add_argument("--all", action="store_true", help="withdraw the export from every consumer")
    cmd.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:

    targets = parse_targets(args.to) if args.to else None
    info = config.context_cluster_info(args.context, args.kubeconfig)
    namespace = args.namespace or info.namespace
    if args.command == "allow":
        assert targets is not None  # --to is required

        def decide(sa: dict) -> ExportPlan:
            return plan_allow(sa, targets)
    else:

        def decide(sa: dict) -> ExportPlan:
            return plan_disallow(sa, targets)

    client = config.context_config_and_namespace(info.context, args.kubeconfig).api_client()
    try:
        report = lambda line: print(line, flush=True)  # noqa: E731
        plan = apply(client, info.cluster_name, namespace, args.name, decide, report=report)
    finally:
        client.close()
    if plan.dropped and plan.service_account_patch is not None:
        left_out = ", ".join(repr(item) for item in plan.dropped)
        print(f"Note: export-to no longer lists {left_out}, which is not CLUSTER/NAMESPACE and allowed nobody.")
    for asked, still in plan.still_allowed:
        print(f"Note: {asked} may still import it, as {still} still allows it; disallow {still} too if you mean it.")
    print(summary(plan, info.cluster_name))
    if args.command == "disallow":
        print("Tokens already issued stay valid until they expire (spec.expirationSeconds of each import).")
    return EXIT_OK
