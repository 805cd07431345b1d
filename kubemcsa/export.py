"""`kubemcsa export`: a Secret manifest with a service account's credentials, for `kubectl apply -f -` elsewhere.

The pure part (durations, TokenRequest bodies, the manifest) is separate from the two API calls at the edge
(`issue_token`, `legacy_token`).
"""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass
from typing import Any

import urllib3
import yaml
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from kubemcsa import api, config, kube
from kubemcsa.credentials import Credentials, to_secret_data

# Where the exported Secret says what it holds; the token's expiry lets a reader see when to export again.
EXPIRATION_ANNOTATION = "multicluster.admiralty.io/token-expiration-timestamp"
EXPORTED_FROM_ANNOTATION = "multicluster.admiralty.io/exported-from"
LEGACY_TOKEN_TYPE = "kubernetes.io/service-account-token"
SERVICE_ACCOUNT_NAME_ANNOTATION = "kubernetes.io/service-account.name"
LEGACY_SECRET_SUFFIX = "-kubemcsa-token"

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


def token_request_body(audiences: list[str] | None, expiration_seconds: int | None) -> dict[str, Any]:
    """The body of a TokenRequest; empty fields let the API server pick its own audiences and expiration."""
    spec: dict[str, Any] = {}
    if audiences:
        spec["audiences"] = list(audiences)
    if expiration_seconds:
        spec["expirationSeconds"] = int(expiration_seconds)
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expiration_timestamp: str | None  # RFC 3339, as the API server answered; None for a legacy token

    def __repr__(self) -> str:
        return f"IssuedToken(token=<redacted>, expiration_timestamp={self.expiration_timestamp!r})"


def token_from_response(response: dict[str, Any]) -> IssuedToken:
    """The token and its real expiry from a TokenRequest response; ExportError if it has no token."""
    status = response.get("status") or {}
    token = status.get("token")
    if not isinstance(token, str) or not token:
        raise ExportError("the API server answered the TokenRequest without a token; check its version (1.22+).")
    return IssuedToken(token=token, expiration_timestamp=status.get("expirationTimestamp"))


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


def legacy_secret_manifest(service_account: str, namespace: str) -> dict[str, Any]:
    """A `kubernetes.io/service-account-token` Secret that the token controller fills with a long-lived token."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": service_account + LEGACY_SECRET_SUFFIX,
            "namespace": namespace,
            "annotations": {SERVICE_ACCOUNT_NAME_ANNOTATION: service_account},
        },
        "type": LEGACY_TOKEN_TYPE,
    }


def legacy_token_of(secret: dict[str, Any]) -> str | None:
    """The token the token controller wrote into a legacy token Secret, or None while it is still empty."""
    encoded = (secret.get("data") or {}).get(api.KEY_TOKEN)
    if not encoded:
        return None
    try:
        return base64.b64decode(encoded, validate=True).decode().strip() or None
    except (ValueError, UnicodeDecodeError):
        return None


# --- the edge: API calls ---------------------------------------------------------------------------------------


def issue_token(
    client: ApiClient,
    service_account: str,
    namespace: str,
    *,
    audiences: list[str] | None = None,
    expiration_seconds: int | None = None,
    where: str = "the cluster",
) -> IssuedToken:
    """A TokenRequest for `namespace/service_account`; ExportError naming the object and the fix on failure."""
    body = token_request_body(audiences, expiration_seconds)
    try:
        response = kube.Resource(client, kube.SERVICE_ACCOUNTS).create_subresource(
            service_account, "token", body, namespace=namespace
        )
    except ApiException as exc:
        raise ExportError(_explain(exc, f"service account {namespace}/{service_account}", where)) from None
    return token_from_response(response)


def legacy_token(
    client: ApiClient, service_account: str, namespace: str, *, timeout: float = 30, where: str = "the cluster"
) -> IssuedToken:
    """A long-lived token from a `kubernetes.io/service-account-token` Secret, created if needed."""
    secrets = kube.Resource(client, kube.SECRETS)
    manifest = legacy_secret_manifest(service_account, namespace)
    name = manifest["metadata"]["name"]
    what = f"Secret {namespace}/{name}"
    try:
        kube.Resource(client, kube.SERVICE_ACCOUNTS).get(service_account, namespace=namespace)
        try:
            secret = secrets.create(manifest, namespace=namespace)
        except ApiException as exc:
            if kube.error_reason(exc) != "AlreadyExists":
                raise
            secret = secrets.get(name, namespace=namespace)
        deadline = time.monotonic() + timeout
        while (token := legacy_token_of(secret)) is None:
            if time.monotonic() > deadline:
                raise ExportError(
                    f"the token controller of {where} did not fill {what} within {timeout:.0f}s; "
                    "check that kube-controller-manager runs, or export without --legacy."
                )
            time.sleep(0.2)  # polling the token controller, which has no event to wait on here
            secret = secrets.get(name, namespace=namespace)
    except ApiException as exc:
        raise ExportError(_explain(exc, what, where)) from None
    return IssuedToken(token=token, expiration_timestamp=None)


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
        if legacy:
            issued = legacy_token(client, name, ns, where=where)
        else:
            issued = issue_token(
                client, name, ns, audiences=audiences, expiration_seconds=expiration_seconds, where=where
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
