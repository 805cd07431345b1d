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

`plan()` and the comparison functions are pure; `apply()` makes the API calls and reports each step."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from collections.abc import Callable

import urllib3
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from kubemcsa import config
from kubemcsa.cli import status
from kubemcsa.cli.bootstrap_plan import TARGET_LABEL, Plan, allow_all_warning, plan, secret_is_current, wanted_inputs
from kubemcsa.cli.common import EXIT_OK, CommandError, add_cluster_pair_arguments, examples
from kubemcsa.cli.export import ExportError, issue_token, parse_duration
from kubemcsa.client import kube
from kubemcsa.client.apply import (
    JSON,
    MANAGED_BY_LABEL,
    MANAGED_BY_VALUE,
    Applier,
    Cluster,
    Result,
    _advice,
    stale_bindings,
)
from kubemcsa.client.apply import ApplyError as BootstrapError
from kubemcsa.contract import api, imports
from kubemcsa.contract.credentials import Credentials
from kubemcsa.contract.imports import IssuedToken


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


# What `kubemcsa bootstrap --help` says it does.
DESCRIPTION = (
    "In the source cluster, create the namespace multicluster-service-account, a service account named "
    "after the target cluster and the least RBAC the controller needs: request tokens for that account "
    "only, and list and watch service accounts to see which their owners export to it (kubemcsa allow). "
    "In the target cluster, create a ServiceAccountImport named after the source cluster for that "
    "service account, and its first Secret, so that the controller reaches the source at once. Running it "
    "again changes nothing and says so."
)


def register(commands: argparse._SubParsersAction, prog: str) -> None:
    boot = commands.add_parser(
        "bootstrap",
        help="let the controller of a target cluster import service accounts from a source cluster",
        description=DESCRIPTION,
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
