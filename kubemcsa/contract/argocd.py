"""Argo CD's declarative cluster Secret, built from an import's credentials (pure: data in, data out).

Argo CD finds the clusters it deploys to in Secrets of its namespace labelled
`argocd.argoproj.io/secret-type: cluster` (operator manual, "Declarative Setup", section "Clusters"). Their data:

- `name`: the cluster's display name in Argo CD; `server`: the API server URL;
- `config`: a JSON object: `bearerToken`, or `execProviderConfig` (a client-go exec credential plugin), and
  `tlsClientConfig` whose `caData` is the base64 of the PEM CA bundle (Go marshals a []byte as base64);
- optional `namespaces` (comma-separated: Argo CD then manages only those namespaces, and cluster-scoped
  resources only if `clusterResources` is `"true"`) and `project` (a project-scoped cluster).

The controller writes such a Secret next to an import's own Secret and rewrites it on every token refresh.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

SECRET_TYPE_LABEL = "argocd.argoproj.io/secret-type"
SECRET_TYPE_CLUSTER = "cluster"
CLUSTER_LABELS = {SECRET_TYPE_LABEL: SECRET_TYPE_CLUSTER}

KEY_NAME = "name"
KEY_SERVER = "server"
KEY_CONFIG = "config"
KEY_NAMESPACES = "namespaces"
KEY_CLUSTER_RESOURCES = "clusterResources"
KEY_PROJECT = "project"
REQUIRED_KEYS = (KEY_NAME, KEY_SERVER, KEY_CONFIG)
OPTIONAL_KEYS = (KEY_NAMESPACES, KEY_CLUSTER_RESOURCES, KEY_PROJECT)

# The ExecCredential version Argo CD's client-go understands (and the seed's hand-written Secrets use).
EXEC_API_VERSION = "client.authentication.k8s.io/v1"
# How long client-go may keep a credential from the plugin before running it again (and reading the file anew).
EXEC_CACHE_SECONDS = 60
# The token file path is passed as $1, never spliced into the script, so no path can inject shell code. Without
# an expirationTimestamp client-go would keep the first token until a request fails with 401; GNU and busybox
# `date` compute one, and a `date` that cannot just leaves it out.
_EXEC_SCRIPT = f"""token=$(cat "$1") || exit 1
expiry=$(date -u -d "@$(( $(date +%s) + {EXEC_CACHE_SECONDS} ))" +%Y-%m-%dT%H:%M:%SZ 2>/dev/null)
if [ -n "$expiry" ]; then
  printf '{{"apiVersion":"%s","kind":"ExecCredential","status":{{"token":"%s","expirationTimestamp":"%s"}}}}' \\
    "$0" "$token" "$expiry"
else
  printf '{{"apiVersion":"%s","kind":"ExecCredential","status":{{"token":"%s"}}}}' "$0" "$token"
fi"""


class ArgoCDSecretError(ValueError):
    """A Secret is not a readable Argo CD cluster Secret; the message names the key, never a value."""


@dataclass(frozen=True)
class ArgoCDCluster:
    """How an import appears in Argo CD: display name, managed namespaces, project."""

    name: str
    namespaces: tuple[str, ...] = ()
    cluster_resources: bool | None = None  # only meaningful with namespaces; None: leave Argo CD's default
    project: str | None = None


@dataclass(frozen=True)
class ArgoCDClusterSecret:
    """An Argo CD cluster Secret's data, decoded."""

    name: str
    server: str
    config: dict[str, Any] = field(repr=False)
    namespaces: tuple[str, ...] = ()
    cluster_resources: bool | None = None
    project: str | None = None

    @property
    def bearer_token(self) -> str | None:
        token = self.config.get("bearerToken")
        return token if isinstance(token, str) and token else None

    @property
    def ca_pem(self) -> bytes:
        """The CA bundle of `tlsClientConfig.caData` (b"" if absent)."""
        tls = self.config.get("tlsClientConfig")
        ca_data = tls.get("caData") if isinstance(tls, dict) else None
        if not ca_data:
            return b""
        try:
            return base64.b64decode(ca_data, validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise ArgoCDSecretError("config.tlsClientConfig.caData is not valid base64.") from None


def bearer_token_config(token: str, ca_pem: bytes) -> dict[str, Any]:
    """Argo CD's cluster `config` for a bearer token, verifying the server against `ca_pem`."""
    return {"bearerToken": token, "tlsClientConfig": _tls_client_config(ca_pem)}


def token_file_config(token_path: str, ca_pem: bytes) -> dict[str, Any]:
    """Argo CD's cluster `config` whose token is read, at each use, from a file in Argo CD's own pods.

    For tokens the kubelet rotates (a projected service-account token): an exec credential plugin prints the
    file's current content as an ExecCredential, with the shell every Argo CD image has.
    """
    return {
        "execProviderConfig": {
            "command": "sh",
            "args": ["-c", _EXEC_SCRIPT, EXEC_API_VERSION, token_path],
            "apiVersion": EXEC_API_VERSION,
        },
        "tlsClientConfig": _tls_client_config(ca_pem),
    }


def _tls_client_config(ca_pem: bytes) -> dict[str, Any]:
    return {"insecure": False, "caData": base64.b64encode(ca_pem).decode()}


def cluster_secret_data(cluster: ArgoCDCluster, server: str, config: dict[str, Any]) -> dict[str, str]:
    """The base64 `data` of Argo CD's cluster Secret: its three keys, and the optional ones that are set."""
    plain = {
        KEY_NAME: cluster.name,
        KEY_SERVER: server,
        KEY_CONFIG: json.dumps(config, sort_keys=True, separators=(",", ":")),
    }
    if cluster.namespaces:
        plain[KEY_NAMESPACES] = ",".join(cluster.namespaces)
        if cluster.cluster_resources is not None:
            plain[KEY_CLUSTER_RESOURCES] = "true" if cluster.cluster_resources else "false"
    if cluster.project:
        plain[KEY_PROJECT] = cluster.project
    return {key: base64.b64encode(value.encode()).decode() for key, value in plain.items()}


def read_cluster_secret_data(data: dict[str, str] | None) -> ArgoCDClusterSecret:
    """Decode an Argo CD cluster Secret's base64 `data` as Argo CD reads it; raise ArgoCDSecretError if unusable."""
    data = data or {}
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise ArgoCDSecretError(f"the Argo CD cluster Secret lacks the key(s) {', '.join(missing)}.")
    plain: dict[str, str] = {}
    for key, value in data.items():
        try:
            plain[key] = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
            message = f"the key {key!r} of the Argo CD cluster Secret is not base64 UTF-8 text."
            raise ArgoCDSecretError(message) from None
    try:
        config = json.loads(plain[KEY_CONFIG])
    except ValueError:
        raise ArgoCDSecretError("the key 'config' of the Argo CD cluster Secret is not JSON.") from None
    if not isinstance(config, dict):
        raise ArgoCDSecretError("the key 'config' of the Argo CD cluster Secret is not a JSON object.")
    namespaces = tuple(n.strip() for n in plain.get(KEY_NAMESPACES, "").split(",") if n.strip())
    resources = plain.get(KEY_CLUSTER_RESOURCES)
    return ArgoCDClusterSecret(
        name=plain[KEY_NAME],
        server=plain[KEY_SERVER],
        config=config,
        namespaces=namespaces,
        cluster_resources=None if resources is None else resources == "true",
        project=plain.get(KEY_PROJECT) or None,
    )
