"""The controller's calls to source clusters: one token for one import, or a `RemoteFailure` saying why not.

Token requests themselves live in kubemcsa.tokens (shared with `kubemcsa export`); this module maps what can
go wrong to a condition reason and a message that says what to fix (`classify_remote_error` is pure).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from controller.assess import Remote
from kubemcsa import api, kube, tokens
from kubemcsa.credentials import Credentials
from kubemcsa.imports import ImportToken, inputs_hash
from kubemcsa.spec import ImportSpec

# Legacy mode: the remote token Secret exists but the remote token controller has not filled it in yet.
REASON_LEGACY_TOKEN_PENDING = "LegacyTokenPending"
_MAX_REMOTE_MESSAGE = 300


@dataclass(frozen=True)
class RemoteFailure(Exception):
    """Why a token could not be obtained: a condition reason and a message that never holds a token."""

    reason: str
    message: str

    def __str__(self) -> str:
        return self.message


def classify_remote_error(code: int | None, remote_message: str, cluster: str, spec: ImportSpec) -> RemoteFailure:
    """Map a remote answer (HTTP code, None for no answer) to a reason and a message saying what to fix."""
    detail = " ".join(str(remote_message).split())[:_MAX_REMOTE_MESSAGE]
    target = f"service account {spec.namespace}/{spec.name} in cluster {cluster}"
    if code is None:
        return RemoteFailure(
            api.REASON_REMOTE_UNREACHABLE,
            f"Cannot reach the API server of cluster {cluster} ({detail}); check that it is up and reachable, "
            "the controller retries by itself.",
        )
    if code == 401:
        return RemoteFailure(
            api.REASON_UNAUTHORIZED,
            f"Cluster {cluster} rejected the controller's credentials (401 Unauthorized); renew the controller's "
            f"credential for cluster {cluster}.",
        )
    if code == 403:
        verb = "get or create secrets" if spec.legacy else "create serviceaccounts/token"
        return RemoteFailure(
            api.REASON_FORBIDDEN,
            f"The controller may not request a token for {target} (403: {detail}); grant its identity in "
            f"cluster {cluster} the right to {verb} in namespace {spec.namespace}.",
        )
    if code == 404:
        return RemoteFailure(
            api.REASON_REMOTE_SERVICE_ACCOUNT_NOT_FOUND,
            f"The {target} does not exist; create it there or fix spec.namespace and spec.name.",
        )
    if code in (400, 422):
        return RemoteFailure(
            api.REASON_INVALID_SPEC,
            f"Cluster {cluster} refused the token request for {target} ({code}: {detail}); fix the import's spec.",
        )
    if code == 429 or code >= 500:
        return RemoteFailure(
            api.REASON_REMOTE_UNREACHABLE,
            f"The API server of cluster {cluster} failed ({code}: {detail}); the controller retries by itself.",
        )
    return RemoteFailure(
        api.REASON_REMOTE_ERROR,
        f"Cluster {cluster} answered {code} to the token request for {target} ({detail}); check that cluster.",
    )


def fetch_token(
    client: ApiClient, source: Remote, spec: ImportSpec, *, timeout: float, clock: Callable[[], float]
) -> ImportToken:
    """A new token for the import of `spec` from `source`; RemoteFailure if the source does not give one."""
    try:
        if spec.legacy:
            issued = tokens.legacy_token(client, spec.namespace, spec.name, timeout=timeout, clock=clock)
        else:
            issued = tokens.request_token(
                client,
                spec.namespace,
                spec.name,
                audiences=spec.audiences,
                expiration_seconds=spec.expiration_seconds,
                timeout=timeout,
                clock=clock,
            )
            if issued.expires_at is None:  # an answer without expiry: assume the requested one
                issued = tokens.IssuedToken(issued.token, issued.issued_at, issued.issued_at + spec.expiration_seconds)
    except ApiException as exc:
        raise classify_remote_error(exc.status or None, kube.error_message(exc), source.cluster_name, spec) from None
    except kube.CONNECTION_ERRORS as exc:
        raise classify_remote_error(None, type(exc).__name__, source.cluster_name, spec) from None
    except tokens.TokenAnswerError as exc:
        raise classify_remote_error(502, str(exc), source.cluster_name, spec) from None
    except tokens.LegacySecretConflict as exc:
        raise RemoteFailure(
            api.REASON_SECRET_CONFLICT,
            f"Secret {spec.namespace}/{exc} in cluster {source.cluster_name} is not a token Secret of "
            f"service account {spec.name}; delete it so the controller can create one.",
        ) from None
    except tokens.LegacyTokenPending as exc:
        raise RemoteFailure(
            REASON_LEGACY_TOKEN_PENDING,
            f"Waiting for the token controller of cluster {source.cluster_name} to fill Secret "
            f"{spec.namespace}/{exc}; if this lasts, check that cluster's controller manager.",
        ) from None
    creds = Credentials(
        server=source.server, ca_crt=issued.ca_pem or source.ca_pem, token=issued.token, namespace=spec.namespace
    )
    return ImportToken(creds, issued, inputs_hash(spec, source.server, source.ca_pem))
