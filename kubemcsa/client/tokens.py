"""Getting a service account's token from an API server: TokenRequest, or a legacy token Secret.

The one home of both ways, used by the controller (for every import) and by `kubemcsa export` and
`kubemcsa bootstrap`. Pure parts (request bodies, reading answers, refresh times) are separate from the two
calls at the edge (`request_token`, `legacy_token`), which raise the client's ApiException, its connection
errors, or the errors below; callers turn those into their own one-sentence messages.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from kubemcsa import jsonwire
from kubemcsa.client import kube
from kubemcsa.contract import api
from kubemcsa.contract.imports import IssuedToken
from kubemcsa.contract.timefmt import parse_time

LEGACY_SECRET_TYPE = "kubernetes.io/service-account-token"
SERVICE_ACCOUNT_NAME_ANNOTATION = "kubernetes.io/service-account.name"
LEGACY_SECRET_SUFFIX = "-kubemcsa-token"


class TokenAnswerError(ValueError):
    """The API server answered without a usable token."""


class LegacyTokenPending(Exception):
    """The legacy token Secret exists but the token controller has not filled it yet."""


class LegacySecretConflict(Exception):
    """A Secret with the legacy token Secret's name exists and is not a token Secret of that service account."""


def token_request_body(audiences: list[str] | tuple[str, ...] | None, expiration_seconds: int | None) -> dict[str, Any]:
    """The body of a TokenRequest; empty fields let the API server pick its own audiences and expiration."""
    spec: dict[str, Any] = {}
    if audiences:
        spec["audiences"] = list(audiences)
    if expiration_seconds:
        spec["expirationSeconds"] = int(expiration_seconds)
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}


def token_from_response(response: Any, issued_at: float) -> IssuedToken:
    """The token and its real expiry (the server may cap the duration) from a TokenRequest answer."""
    status = response.get("status") if isinstance(response, dict) else None
    token = (status or {}).get("token") if isinstance(status, dict) else None
    if not isinstance(token, str) or not token:
        raise TokenAnswerError("the API server answered the TokenRequest without a token")
    return IssuedToken(token=token, issued_at=issued_at, expires_at=parse_time(status.get("expirationTimestamp")))


def unverified_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, without verifying it ({} if it is not one): what a credential says of itself.

    Only ever used to describe the controller's own credentials (when they expire, whose they are); the API server
    that receives them verifies them.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        claims = jsonwire.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


def subject_mismatch(token: str, namespace: str, name: str) -> str | None:
    """None if `token` says it is service account namespace/name's (its JWT `sub`); else what it says instead, in
    words for a message (never the token). Unverified: it catches a source answering another account's token (a
    proxy, a misrouted request, an impostor), while the source's own API server verifies what it receives."""
    subject = unverified_claims(token).get("sub")
    if subject == api.service_account_username(namespace, name):
        return None
    if not isinstance(subject, str) or not subject:
        return "a token that names no subject"
    return f"a token of {subject[:120]!r}"


def consumer_of_token(token: str) -> str | None:
    """The consumer cluster a source credential belongs to: NAME when the token is a JWT of
    `system:serviceaccount:multicluster-service-account:NAME` (what bootstrap issues), else None."""
    subject = unverified_claims(token).get("sub")
    prefix = f"system:serviceaccount:{api.SYSTEM_NAMESPACE}:"
    if not isinstance(subject, str) or not subject.startswith(prefix):
        return None
    name = subject[len(prefix) :]
    return name if api.is_dns_subdomain(name) else None


def legacy_secret_name(service_account: str) -> str:
    """The token Secret made for a legacy token: `<sa>-kubemcsa-token`, within 253 characters."""
    return service_account[: 253 - len(LEGACY_SECRET_SUFFIX)].rstrip(".-") + LEGACY_SECRET_SUFFIX


def legacy_secret_manifest(service_account: str, namespace: str) -> dict[str, Any]:
    """A `kubernetes.io/service-account-token` Secret that the token controller fills with a long-lived token."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": LEGACY_SECRET_TYPE,
        "metadata": {
            "name": legacy_secret_name(service_account),
            "namespace": namespace,
            "annotations": {SERVICE_ACCOUNT_NAME_ANNOTATION: service_account},
        },
    }


def is_token_secret_of(secret: dict[str, Any], service_account: str) -> bool:
    annotations = (secret.get("metadata") or {}).get("annotations") or {}
    return secret.get("type") == LEGACY_SECRET_TYPE and annotations.get(SERVICE_ACCOUNT_NAME_ANNOTATION) == (
        service_account
    )


def _decoded(data: dict[str, Any], key: str) -> bytes:
    try:
        return base64.b64decode(data.get(key) or "", validate=True)
    except (binascii.Error, ValueError, TypeError):
        return b""


def legacy_token_of(secret: dict[str, Any]) -> str | None:
    """The token the token controller wrote into a legacy token Secret, or None while it is still empty."""
    data = secret.get("data") if isinstance(secret.get("data"), dict) else {}
    try:
        return _decoded(data, api.KEY_TOKEN).decode().strip() or None
    except UnicodeDecodeError:
        return None


def legacy_ca_of(secret: dict[str, Any]) -> bytes | None:
    data = secret.get("data") if isinstance(secret.get("data"), dict) else {}
    ca = _decoded(data, api.KEY_CA_CRT)
    return ca if b"-----BEGIN CERTIFICATE-----" in ca else None


# --- the edge: API calls ---------------------------------------------------------------------------------------


def request_token(
    client: ApiClient,
    namespace: str,
    service_account: str,
    *,
    audiences: list[str] | tuple[str, ...] | None = None,
    expiration_seconds: int | None = None,
    timeout: float | None = 30,
    clock: Callable[[], float] = time.time,
) -> IssuedToken:
    """One TokenRequest for `namespace/service_account` (one API call)."""
    issued_at = clock()
    response = kube.Resource(client, kube.SERVICE_ACCOUNTS, timeout=timeout).create_subresource(
        service_account, "token", token_request_body(audiences, expiration_seconds), namespace
    )
    return token_from_response(response, issued_at)


def legacy_token(
    client: ApiClient,
    namespace: str,
    service_account: str,
    *,
    timeout: float | None = 30,
    wait_seconds: float = 0.0,
    clock: Callable[[], float] = time.time,
) -> IssuedToken:
    """A long-lived token from the service account's `-kubemcsa-token` Secret, created if needed.

    Calls: get the Secret; if it is missing, get the service account (a 404 says it does not exist) and create
    the Secret. While the Secret stays empty, poll it for up to `wait_seconds`, then check the service account
    again and raise LegacyTokenPending (a controller passes 0 and looks again later).
    """
    secrets = kube.Resource(client, kube.SECRETS, timeout=timeout)
    accounts = kube.Resource(client, kube.SERVICE_ACCOUNTS, timeout=timeout)
    manifest = legacy_secret_manifest(service_account, namespace)
    name = manifest["metadata"]["name"]
    try:
        secret = secrets.get(name, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise
        accounts.get(service_account, namespace)
        try:
            secret = secrets.create(manifest, namespace)
        except ApiException as create_exc:
            if create_exc.status != 409:
                raise
            secret = secrets.get(name, namespace)
    if not is_token_secret_of(secret, service_account):
        raise LegacySecretConflict(name)
    deadline = time.monotonic() + wait_seconds
    while (token := legacy_token_of(secret)) is None:
        if time.monotonic() >= deadline:
            accounts.get(service_account, namespace)  # a 404 here: the account is gone, not the controller slow
            raise LegacyTokenPending(name)
        time.sleep(0.2)  # polling the token controller, which has no event to wait on here
        secret = secrets.get(name, namespace)
    return IssuedToken(token=token, issued_at=clock(), expires_at=None, ca_pem=legacy_ca_of(secret))
