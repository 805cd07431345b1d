"""`kubemcsa status`: one line per ServiceAccountImport, so a user sees at a glance what is broken.

`rows()` and `format_table()` are pure; `list_imports()` is the one API call.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from kubemcsa import config
from kubemcsa.cli.common import EXIT_NOT_READY, EXIT_OK, CommandError, examples
from kubemcsa.client import kube
from kubemcsa.contract import api
from kubemcsa.contract.timefmt import parse_time

HEADERS = ("NAMESPACE", "NAME", "CLUSTER", "REMOTE", "READY", "REASON", "EXPIRES IN")


@dataclass(frozen=True)
class ImportStatus:
    namespace: str
    name: str
    cluster: str
    remote: str  # remote namespace/name
    ready: str  # "True", "False" or "Unknown" (no Ready condition yet, or a stale one)
    reason: str
    message: str
    expires_in: str

    @property
    def is_ready(self) -> bool:
        return self.ready == "True"


def humanize_seconds(seconds: float) -> str:
    """A short duration like kubectl prints ages: 45s, 12m, 3h20m, 2d4h."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, _ = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h" if hours else f"{days}d"


def expires_in(expiration: Any, now: dt.datetime) -> str:
    """How long until `expiration` ("expired 5m ago" once past, "-" if unknown or never)."""
    when = parse_time(expiration)
    if when is None:
        return "-"
    delta = when - now.timestamp()
    if delta <= 0:
        return f"expired {humanize_seconds(-delta)} ago"
    return humanize_seconds(delta)


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _ready_condition(obj: dict[str, Any]) -> dict[str, Any] | None:
    conditions = _mapping(obj.get("status")).get("conditions")
    for condition in conditions if isinstance(conditions, list) else []:
        if isinstance(condition, dict) and condition.get("type") == api.CONDITION_READY:
            return condition
    return None


def _remote(spec: dict[str, Any]) -> str:
    """The remote namespace/name; a federated import calls the source as each pod's own service account."""
    if spec.get("tokenType") == "Federated":
        return f"{spec.get('namespace') or '?'}/(each pod's own)"
    return f"{spec.get('namespace') or '?'}/{spec.get('name') or '?'}"


def import_status(obj: dict[str, Any], now: dt.datetime) -> ImportStatus:
    """One import's line; tolerant of imports the controller has not seen yet or that are malformed."""
    metadata, spec, status = (_mapping(obj.get(key)) for key in ("metadata", "spec", "status"))
    condition = _ready_condition(obj)
    if condition is None:
        ready, reason, message = "Unknown", "NotReconciled", "the controller has not reported on this import yet"
    else:
        ready = str(condition.get("status") or "Unknown")
        reason = str(condition.get("reason") or "-")
        message = str(condition.get("message") or "")
        observed = condition.get("observedGeneration", status.get("observedGeneration"))
        generation = metadata.get("generation")
        if isinstance(observed, int) and isinstance(generation, int) and observed < generation:
            # The spec changed since the controller last looked: the condition is about the old spec.
            ready, reason = "Unknown", "SpecChanged"
            message = "the spec changed and the controller has not reconciled it yet"
    return ImportStatus(
        namespace=str(metadata.get("namespace") or ""),
        name=str(metadata.get("name") or ""),
        cluster=str(spec.get("clusterName") or "-"),
        remote=_remote(spec),
        ready=ready,
        reason=reason,
        message=message,
        expires_in=expires_in(status.get("expirationTimestamp"), now),
    )


def rows(imports: list[dict[str, Any]], now: dt.datetime) -> list[ImportStatus]:
    """The status of each import, sorted by namespace then name."""
    return sorted((import_status(obj, now) for obj in imports), key=lambda r: (r.namespace, r.name))


def format_table(statuses: list[ImportStatus], *, show_namespace: bool = True, show_messages: bool = True) -> str:
    """A kubectl-style table; below it, the message of each import that is not ready (what to fix)."""
    if not statuses:
        return "No ServiceAccountImports found.\n"
    headers = HEADERS if show_namespace else HEADERS[1:]
    table = [
        (s.namespace, s.name, s.cluster, s.remote, s.ready, s.reason, s.expires_in)[0 if show_namespace else 1 :]
        for s in statuses
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *table, strict=False)]
    lines = [
        "   ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [headers, *table]
    ]
    if show_messages:
        broken = [s for s in statuses if not s.is_ready and s.message]
        if broken:
            lines.append("")
            lines.extend(f"{s.namespace}/{s.name}: {s.message}" for s in broken)
    return "\n".join(lines) + "\n"


def list_imports(client: ApiClient, namespace: str | None = None) -> list[dict[str, Any]]:
    """The ServiceAccountImports of one namespace, or of all namespaces when `namespace` is None."""
    return kube.Resource(client, kube.SERVICE_ACCOUNT_IMPORTS).list(namespace=namespace).get("items") or []


# --- the command ------------------------------------------------------------------------------------------------


def register(commands: argparse._SubParsersAction, prog: str) -> None:
    stat = commands.add_parser(
        "status",
        help="list ServiceAccountImports with their readiness, reason and token expiry",
        description=(
            "Show each ServiceAccountImport with its source cluster, remote service account, Ready condition, "
            "reason and time to token expiry, then what to fix for each one that is not ready. Exit status 1 if any "
            "import is not ready, so scripts can check."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=examples(
            f"""
            {prog} status
            {prog} status -A
            {prog} status -n multicluster-service-account --context cluster1 || echo "some import is broken"
            """
        ),
    )
    stat.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config)")
    stat.add_argument("--context", help="kubeconfig context (default: the current one)")
    scope = stat.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", help="namespace to list (default: the context's)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="list imports of all namespaces")
    stat.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:

    context = config.context_config_and_namespace(args.context, args.kubeconfig)
    namespace = None if args.all_namespaces else (args.namespace or context.namespace)
    where = f"the cluster of context {args.context or 'current'!r} ({context.config.host})"
    client = context.api_client()
    try:
        imports = list_imports(client, namespace)
    except ApiException as exc:
        if exc.status == 404:
            raise CommandError(
                f"{where} does not serve ServiceAccountImports: install multicluster-service-account there first."
            ) from None
        if exc.status in (401, 403):
            raise CommandError(f"{where} refused to list ServiceAccountImports: use a context allowed to.") from None
        raise
    except (urllib3.exceptions.HTTPError, OSError):
        raise CommandError(f"cannot reach {where}; check the context and the network.") from None
    finally:
        client.close()
    statuses = rows(imports, dt.datetime.now(dt.UTC))
    if not statuses and namespace:
        print(f"No ServiceAccountImports found in namespace {namespace}.")
        return EXIT_OK
    sys.stdout.write(format_table(statuses, show_namespace=namespace is None))
    return EXIT_OK if all(s.is_ready for s in statuses) else EXIT_NOT_READY
