"""`kubemcsa export`: a Secret manifest with a service account's credentials, for `kubectl apply -f -` elsewhere.

The pure part (durations, the manifest) is separate from the API calls at the edge, which kubemcsa.client.tokens makes
(the same code the controller uses).
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import urllib3
import yaml
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from kubemcsa import config
from kubemcsa.cli.common import EXIT_OK, CommandError, examples
from kubemcsa.client import kube, tokens
from kubemcsa.contract import api
from kubemcsa.contract import imports as imports_contract
from kubemcsa.contract.credentials import Credentials, to_secret_data

# Where the exported Secret says what it holds; the token's expiry lets a reader see when to export again.
EXPIRATION_ANNOTATION = "multicluster.admiralty.io/token-expiration-timestamp"
EXPORTED_FROM_ANNOTATION = "multicluster.admiralty.io/exported-from"
# How long `--legacy` waits for the token controller to fill the token Secret.
LEGACY_WAIT_SECONDS = 30

_DURATION_PART = re.compile(r"(\d+)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class ExportError(Exception):
    """Export failed; the message says what went wrong and what to do, and never holds a token."""


def parse_duration(text: str) -> int:
    """Seconds in a duration such as `3600`, `3600s`, `90m`, `24h`, `1h30m` or `7d`; ValueError otherwise."""
    value = text.strip().lower()
    if value.isdigit():
        seconds = int(value)
    else:
        parts = _DURATION_PART.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            raise ValueError(f"{text!r} is not a duration; write it like 3600s, 90m, 24h or 1h30m.")
        seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in parts)
    if seconds < api.MIN_EXPIRATION_SECONDS:
        raise ValueError(
            f"{text!r} is shorter than the API server's minimum of {api.MIN_EXPIRATION_SECONDS}s; ask for at least 10m."
        )
    return seconds


def default_export_name(name: str) -> str:
    """The exported Secret's name when --as is not given: `<service account>-token`."""
    return api.secret_name_for_import(name)


def export_manifest(
    creds: Credentials,
    *,
    cluster_name: str,
    export_name: str,
    service_account: str,
    expiration_timestamp: str | None = None,
    namespace: str | None = None,
) -> dict[str, Any]:
    """The Secret manifest holding `creds` under the five keys, named `export_name`.

    `namespace` is where the Secret goes in the other cluster (omitted: kubectl's current namespace there).
    """
    annotations = {EXPORTED_FROM_ANNOTATION: f"{cluster_name}/{creds.namespace}/{service_account}"}
    if expiration_timestamp:
        annotations[EXPIRATION_ANNOTATION] = expiration_timestamp
    metadata: dict[str, Any] = {"name": export_name, "annotations": annotations}
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata,
        "type": "Opaque",
        "data": to_secret_data(creds, cluster_name),
    }


def render_yaml(manifest: dict[str, Any]) -> str:
    return yaml.safe_dump(manifest, sort_keys=False)


# --- the edge: API calls ---------------------------------------------------------------------------------------


def issue_token(
    client: ApiClient,
    service_account: str,
    namespace: str,
    *,
    audiences: list[str] | None = None,
    expiration_seconds: int | None = None,
    legacy: bool = False,
    where: str = "the cluster",
) -> imports_contract.IssuedToken:
    """A token of `namespace/service_account` (TokenRequest, or a legacy token Secret); ExportError on failure."""
    what = f"service account {namespace}/{service_account}"
    try:
        if legacy:
            return tokens.legacy_token(client, namespace, service_account, wait_seconds=LEGACY_WAIT_SECONDS)
        return tokens.request_token(
            client, namespace, service_account, audiences=audiences, expiration_seconds=expiration_seconds
        )
    except ApiException as exc:
        raise ExportError(_explain(exc, what, where)) from None
    except tokens.TokenAnswerError:
        raise ExportError(
            "the API server answered the TokenRequest without a token; check its version (1.22+)."
        ) from None
    except tokens.LegacyTokenPending as exc:
        raise ExportError(
            f"the token controller of {where} did not fill Secret {namespace}/{exc} within {LEGACY_WAIT_SECONDS}s; "
            "check that kube-controller-manager runs, or export without --legacy."
        ) from None
    except tokens.LegacySecretConflict as exc:
        raise ExportError(
            f"Secret {namespace}/{exc} in {where} is not a token Secret of {what}; "
            "delete it or export without --legacy."
        ) from None


def _explain(exc: ApiException, what: str, where: str) -> str:
    reason = kube.error_reason(exc)
    if reason == "NotFound" or exc.status == 404:
        return f"{what} was not found in {where}; check its name and namespace (-n)."
    if reason == "Forbidden" or exc.status == 403:
        return f"you may not do this with {what} in {where}; use a context with more rights."
    if exc.status == 401:
        return f"{where} did not accept your credentials; log in again or pick another context."
    return f"{where} refused the request for {what}: {kube.error_message(exc)}."


def export(
    name: str,
    *,
    kubeconfig: str | None = None,
    context: str | None = None,
    namespace: str | None = None,
    export_name: str | None = None,
    audiences: list[str] | None = None,
    expiration_seconds: int | None = None,
    legacy: bool = False,
) -> dict[str, Any]:
    """The Secret manifest for service account `name` of the kubeconfig context's cluster (see export_manifest)."""
    info = config.context_cluster_info(context, kubeconfig)
    ns = namespace or info.namespace
    where = f"cluster {info.cluster_name!r} (context {info.context!r})"
    client = config.context_config_and_namespace(info.context, kubeconfig).api_client()
    try:
        issued = issue_token(
            client, name, ns, audiences=audiences, expiration_seconds=expiration_seconds, legacy=legacy, where=where
        )
    except (urllib3.exceptions.HTTPError, OSError):
        raise ExportError(f"cannot reach {where} at {info.server}; check the context and the network.") from None
    finally:
        client.close()
    creds = Credentials(server=info.server, ca_crt=info.ca_pem, token=issued.token, namespace=ns)
    return export_manifest(
        creds,
        cluster_name=info.cluster_name,
        export_name=export_name or default_export_name(name),
        service_account=name,
        expiration_timestamp=issued.expiration_timestamp,
    )


# --- the command ------------------------------------------------------------------------------------------------


def register(commands: argparse._SubParsersAction, prog: str) -> None:
    exp = commands.add_parser(
        "export",
        help="print a Secret with a service account's credentials, for kubectl apply in another cluster",
        description=(
            "Print a Secret manifest (YAML) with the keys ca.crt, namespace, token, server and config for service "
            "account NAME, ready for `kubectl apply -f -` in another cluster. The token comes from the TokenRequest "
            "API (its real expiry is in an annotation); --legacy makes a long-lived token Secret instead. The output "
            "contains a token: pipe it, do not paste it into tickets."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=examples(
            f"""
            {prog} export pod-lister -n default --context cluster2 | kubectl --context cluster1 apply -f -
            {prog} export ci-bot -n ci --as cluster2-ci-bot --duration 24h --audience https://kubernetes.default.svc
            {prog} export old-bot --legacy --context cluster-1-21 > old-bot-secret.yaml
            """
        ),
    )
    exp.add_argument("name", metavar="NAME", help="the service account to export")
    exp.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config)")
    exp.add_argument("--context", help="kubeconfig context of the cluster that has the service account")
    exp.add_argument("-n", "--namespace", help="namespace of the service account (default: the context's)")
    exp.add_argument("--as", dest="export_name", metavar="EXPORT_NAME", help="name of the Secret (default: NAME-token)")
    exp.add_argument(
        "--audience",
        dest="audiences",
        action="append",
        metavar="AUDIENCE",
        help="audience of the token (repeatable; default: the API server's own)",
    )
    exp.add_argument(
        "--duration",
        metavar="DURATION",
        help="how long the token is valid, e.g. 3600s, 90m, 24h (default: the API server's; it may cap it)",
    )
    exp.add_argument("--legacy", action="store_true", help="export a long-lived token from a token Secret instead")
    exp.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:

    if args.export_name is not None and not api.is_dns_subdomain(args.export_name):
        raise CommandError(
            f"--as {args.export_name!r} is not a valid Secret name; use lowercase letters, digits and -."
        )
    try:
        seconds = parse_duration(args.duration) if args.duration else None
    except ValueError as exc:
        raise CommandError(f"--duration {exc}") from None
    manifest = export(
        args.name,
        kubeconfig=args.kubeconfig,
        context=args.context,
        namespace=args.namespace,
        export_name=args.export_name,
        audiences=args.audiences,
        expiration_seconds=seconds,
        legacy=args.legacy,
    )
    sys.stdout.write(render_yaml(manifest))  # the intended output: the only place a token is printed
    return EXIT_OK
