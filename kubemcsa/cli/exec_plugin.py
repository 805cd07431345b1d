"""`kubemcsa credentials`: a client-go exec credential plugin that prints an import's token as an ExecCredential.

For consumers that reach a source through an import without being a pod that mounts it: fleet controllers reading
ClusterProfiles (KEP-5339: their provider file runs this command, with `provideClusterInfo: true`), or a
kubeconfig's `users[].user.exec`. Where the token comes from, in this order:
- `--secret NAMESPACE/NAME` or `--token-file PATH`;
- else the extension of the ClusterProfile's `kubemcsa` access provider, which client-go passes in
  KUBERNETES_EXEC_INFO (spec.cluster.config): {secretName, namespace} or, for a federated import, {tokenFile}.
An import's Secret is read with the consumer's own identity (its in-cluster service account, else --kubeconfig or
$KUBECONFIG): one `get` on that one Secret. A federated import's token is the consumer pod's own projected token,
which the webhook mounts for the import (the pod carries the import annotation).
Output: {"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential", "status": {"token",
"expirationTimestamp"}} on stdout, the only place the token is ever printed; an error is one sentence on stderr
and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubemcsa.client import connect
from kubemcsa.client.tokens import unverified_claims
from kubemcsa.contract import api
from kubemcsa.contract.api import EXT_NAMESPACE, EXT_SECRET_NAME, EXT_TOKEN_FILE
from kubemcsa.contract.timefmt import format_time

EXEC_API_VERSION = "client.authentication.k8s.io/v1"
EXEC_INFO_ENV = "KUBERNETES_EXEC_INFO"
# client-go keeps a credential until its expirationTimestamp: at most this long, so that a rotated Secret (or a
# file the kubelet swapped) is read again soon, and never past the token's own expiry.
CACHE_SECONDS = 300
EXIT_ERROR = 2


class PluginError(Exception):
    """What went wrong, in one sentence that never holds a token."""


@dataclass(frozen=True)
class TokenSource:
    secret: tuple[str, str] | None = None  # (namespace, name) of an import's Secret
    token_file: str | None = None


def register(commands: Any, prog: str) -> None:
    """Register `credentials` on the CLI's subcommands."""
    cmd = commands.add_parser(
        "credentials",
        help="print an import's token as an ExecCredential (a client-go exec credential plugin)",
        description=(
            "Print the token of an import as a client-go ExecCredential on stdout: from the import's Secret (read "
            "with your own credentials) or, for a federated import, from the token file projected into your pod. "
            "Without --secret or --token-file, the ClusterProfile's extension in KUBERNETES_EXEC_INFO says which."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            f"  {prog} credentials --secret team-a/prod-token\n"
            f"  {prog} credentials --token-file /var/run/secrets/admiralty.io/serviceaccountimports/prod/token\n"
            '  provider file: {"providers": [{"name": "kubemcsa", "execConfig": {"apiVersion": '
            '"client.authentication.k8s.io/v1", "command": "kubemcsa", "args": ["credentials"], '
            '"provideClusterInfo": true}}]}'
        ),
    )
    which = cmd.add_mutually_exclusive_group()
    which.add_argument("--secret", metavar="NAMESPACE/NAME", help="an import's Secret (e.g. team-a/prod-token)")
    which.add_argument("--token-file", metavar="PATH", help="a projected token file (federated imports)")
    cmd.add_argument("--kubeconfig", help="your kubeconfig for reading the Secret (default: in-cluster, $KUBECONFIG)")
    cmd.set_defaults(run=run)


def exec_credential(token: str, expires_at: float) -> dict[str, Any]:
    status = {"token": token, "expirationTimestamp": format_time(expires_at)}
    return {"apiVersion": EXEC_API_VERSION, "kind": "ExecCredential", "status": status}


def expiry_for(token: str, now: float) -> float:
    """When client-go should run the plugin again: in CACHE_SECONDS, or at the token's own expiry if sooner."""
    exp = unverified_claims(token).get("exp")
    cap = now + CACHE_SECONDS
    return min(float(exp), cap) if isinstance(exp, int | float) and not isinstance(exp, bool) else cap


def exec_info(environ: Mapping[str, str]) -> dict[str, Any] | None:
    """The ExecCredential client-go passes in KUBERNETES_EXEC_INFO, or None when it passes none."""
    raw = environ.get(EXEC_INFO_ENV)
    if not raw:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        raise PluginError(f"{EXEC_INFO_ENV} is not JSON; run this plugin from client-go or unset it.") from None
    if not isinstance(info, dict):
        raise PluginError(f"{EXEC_INFO_ENV} is not an ExecCredential object.")
    return info


def token_source(secret: str | None, token_file: str | None, info: dict[str, Any] | None) -> TokenSource:
    """Where the token is: the flags, else the ClusterProfile's extension (spec.cluster.config)."""
    if token_file:
        return TokenSource(token_file=token_file)
    if secret:
        namespace, _, name = secret.partition("/")
        if not namespace or not name:
            raise PluginError(f"--secret {secret!r} is not NAMESPACE/NAME; for example team-a/prod-token.")
        return TokenSource(secret=(namespace, name))
    cluster = ((info or {}).get("spec") or {}).get("cluster")
    config = cluster.get("config") if isinstance(cluster, dict) else None
    if not isinstance(config, dict):
        raise PluginError(
            "no token source: pass --secret or --token-file, or set provideClusterInfo: true in the provider's "
            "execConfig so that the ClusterProfile's extension says which."
        )
    path = config.get(EXT_TOKEN_FILE)
    if isinstance(path, str) and path:
        return TokenSource(token_file=path)
    name, namespace = config.get(EXT_SECRET_NAME), config.get(EXT_NAMESPACE)
    if isinstance(name, str) and name and isinstance(namespace, str) and namespace:
        return TokenSource(secret=(namespace, name))
    raise PluginError(
        f"the cluster's exec extension names neither {EXT_TOKEN_FILE} nor {EXT_SECRET_NAME} and {EXT_NAMESPACE}; "
        "is this the ClusterProfile's kubemcsa access provider?"
    )


def read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            token = handle.read().strip()
    except FileNotFoundError:
        raise PluginError(
            f"no token file at {path}; run this in a pod that carries the import's annotation "
            f"({api.IMPORT_ANNOTATION}) so that the webhook mounts it."
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PluginError(f"cannot read the token file {path} ({type(exc).__name__}).") from None
    if not token:
        raise PluginError(f"the token file {path} is empty; wait for the kubelet to write it.")
    return token


def read_secret_token(namespace: str, name: str, kubeconfig: str | None) -> str:
    """The `token` of Secret namespace/name, read as the consumer (one get on that Secret)."""
    from kubernetes.client.exceptions import ApiException

    from kubemcsa.client import kube

    try:
        client = connect.local_api_client(kubeconfig)
    except connect.LOCAL_CLIENT_ERRORS as exc:
        raise PluginError(f"cannot read Secret {namespace}/{name}: {connect.local_client_problem(exc)}.") from None
    try:
        secret = kube.Resource(client, kube.SECRETS, timeout=10).get(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            raise PluginError(f"Secret {namespace}/{name} does not exist; is the import Ready?") from None
        if exc.status in (401, 403):
            raise PluginError(
                f"the API server refused to let this identity get Secret {namespace}/{name} (HTTP {exc.status}); "
                "grant it get on that Secret."
            ) from None
        raise PluginError(f"reading Secret {namespace}/{name} failed: {kube.error_message(exc)}.") from None
    except kube.CONNECTION_ERRORS as exc:
        raise PluginError(
            f"cannot reach the API server to read Secret {namespace}/{name} ({type(exc).__name__})."
        ) from None
    finally:
        client.close()
    value = ((secret.get("data") or {}) if isinstance(secret, dict) else {}).get(api.KEY_TOKEN)
    try:
        token = base64.b64decode(value or "", validate=True).decode().strip()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise PluginError(f"Secret {namespace}/{name} holds a token that is not base64 text; re-create it.") from None
    if not token:
        raise PluginError(
            f"Secret {namespace}/{name} holds no token yet (or its import is federated: use its token file)."
        )
    return token


def run(args: argparse.Namespace) -> int:
    try:
        source = token_source(args.secret, args.token_file, exec_info(os.environ))
        if source.token_file is not None:
            token = read_token_file(source.token_file)
        else:
            assert source.secret is not None
            token = read_secret_token(*source.secret, args.kubeconfig)
    except PluginError as exc:
        print(f"kubemcsa credentials: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    sys.stdout.write(json.dumps(exec_credential(token, expiry_for(token, time.time()))) + "\n")
    return 0
