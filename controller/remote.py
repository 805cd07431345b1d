"""The controller's calls to source clusters: one token for one import, or a `RemoteFailure` saying why not.

Token requests themselves live in kubemcsa.client.tokens (shared with `kubemcsa export`); this module maps what can
go wrong to a condition reason and a message that says what to fix (`classify_remote_error` is pure).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import urllib3
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from controller.model import Remote
from controller.source_clusters import ORIGIN_KUBECONFIG, ORIGIN_MOUNTED, ORIGIN_SECRET
from kubemcsa.client import kube, tokens
from kubemcsa.contract import api
from kubemcsa.contract import imports as imports_contract
from kubemcsa.contract.credentials import Credentials
from kubemcsa.contract.imports import ImportToken, inputs_hash
from kubemcsa.contract.spec import ImportSpec
from kubemcsa.contract.timefmt import format_time

# Legacy mode: the remote token Secret exists but the remote token controller has not filled it in yet.
REASON_LEGACY_TOKEN_PENDING = "LegacyTokenPending"
_MAX_REMOTE_MESSAGE = 300


@dataclass(frozen=True)
class RemoteFailure(Exception):
    """Why a token could not be obtained: a condition reason and a message that never holds a token.

    `source_down`: the failure is the source's, not the import's (no answer, a server error, or the controller's
    own credential rejected): it opens the source's circuit, so all its imports wait for one probe.
    """

    reason: str
    message: str
    source_down: bool = False

    def __str__(self) -> str:
        return self.message


def renew_hint(source: Remote) -> str:
    """The one thing that renews the controller's own credential for `source`, by where it comes from."""
    name = source.cluster_name
    if source.origin == ORIGIN_SECRET:
        return (
            f"renew it with: kubemcsa bootstrap --target-context <this cluster> --source-context <cluster {name}> "
            f"--source-name {name}"
        )
    if source.origin == ORIGIN_KUBECONFIG:
        return f"put a valid credential in context {name} of the controller's --source-kubeconfig"
    if source.origin == ORIGIN_MOUNTED:
        return f"renew the Secret mounted as import {name} in the controller's --imports-dir"
    return f"renew the controller's credential for cluster {name}"


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and what it wraps (urllib3's `reason`, then __cause__ / __context__)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 10:
        chain.append(current)
        wrapped = getattr(current, "reason", None)
        current = wrapped if isinstance(wrapped, BaseException) else (current.__cause__ or current.__context__)
    return chain


def connection_problem(exc: BaseException) -> tuple[str, str]:
    """(reason, what happened) for a call that got no answer: TLS, DNS, refused, timeout or closed connection."""
    chain = _causes(exc)
    text = " ".join(str(e) for e in chain)
    if any(isinstance(e, ssl.SSLCertVerificationError) for e in chain) or "CERTIFICATE_VERIFY_FAILED" in text:
        return api.REASON_REMOTE_CERTIFICATE_UNTRUSTED, "its certificate is not signed by the CA the controller holds"
    if any(isinstance(e, socket.gaierror) or type(e).__name__ == "NameResolutionError" for e in chain):
        return api.REASON_REMOTE_UNREACHABLE, "its host name does not resolve (DNS)"
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return api.REASON_REMOTE_UNREACHABLE, "connection refused"
    if any(isinstance(e, ConnectionError | urllib3.exceptions.ProtocolError | ssl.SSLError) for e in chain):
        return api.REASON_REMOTE_UNREACHABLE, "the connection was closed before an answer"
    # urllib3's NewConnectionError is a ConnectTimeoutError by class: only a real timeout counts here.
    timeouts = (TimeoutError, urllib3.exceptions.TimeoutError)
    if any(isinstance(e, timeouts) and not isinstance(e, urllib3.exceptions.NewConnectionError) for e in chain):
        return api.REASON_REMOTE_UNREACHABLE, "timed out"
    return api.REASON_REMOTE_UNREACHABLE, type(exc).__name__


def unreachable(source: Remote, exc: BaseException) -> RemoteFailure:
    reason, what = connection_problem(exc)
    cluster = source.cluster_name
    if reason == api.REASON_REMOTE_CERTIFICATE_UNTRUSTED:
        message = (
            f"The API server of cluster {cluster} at {source.server} failed TLS verification: {what} for it; "
            f"if that cluster's CA changed, {renew_hint(source)}."
        )
    else:
        message = (
            f"Cannot reach the API server of cluster {cluster} at {source.server} ({what}); check that it is up "
            "and reachable, the controller retries by itself."
        )
    return RemoteFailure(reason, message, source_down=True)


@dataclass(frozen=True)
class _Answer:
    """One remote answer as the classifiers see it."""

    code: int | None
    detail: str  # the remote message, one line, cut short
    cluster: str
    spec: ImportSpec
    source: Remote
    now: float

    @property
    def target(self) -> str:
        return f"service account {self.spec.namespace}/{self.spec.name} in cluster {self.cluster}"


def _unreachable(a: _Answer) -> RemoteFailure:
    return RemoteFailure(
        api.REASON_REMOTE_UNREACHABLE,
        f"Cannot reach the API server of cluster {a.cluster} ({a.detail}); check that it is up and reachable, "
        "the controller retries by itself.",
        source_down=True,
    )


def _unauthorized(a: _Answer) -> RemoteFailure:
    expired_at = a.source.credential_expires_at
    if expired_at is not None and expired_at <= a.now:
        return RemoteFailure(
            api.REASON_SOURCE_CREDENTIAL_EXPIRED,
            f"The controller's own credential for cluster {a.cluster} expired at {format_time(expired_at)}, so "
            f"cluster {a.cluster} rejects it; {renew_hint(a.source)}.",
            source_down=True,
        )
    return RemoteFailure(
        api.REASON_UNAUTHORIZED,
        f"Cluster {a.cluster} rejected the controller's own credential (401 Unauthorized); {renew_hint(a.source)}.",
        source_down=True,
    )


def _forbidden(a: _Answer) -> RemoteFailure:
    spec, cluster = a.spec, a.cluster
    if spec.legacy:
        fix = (
            f"legacy tokens need the open grant: kubemcsa bootstrap --legacy-tokens --allow-all-service-accounts "
            f"for cluster {cluster}"
        )
    else:
        fix = (
            f"its owner must export it to this cluster with RBAC: kubemcsa allow {spec.name} -n {spec.namespace} "
            f"--context {cluster} --to <this cluster>/<namespace>"
        )
    return RemoteFailure(
        api.REASON_FORBIDDEN,
        f"Cluster {cluster} refused the controller a token for {a.target} (403: {a.detail}); {fix}.",
    )


def _not_found(a: _Answer) -> RemoteFailure:
    return RemoteFailure(
        api.REASON_REMOTE_SERVICE_ACCOUNT_NOT_FOUND,
        f"The {a.target} does not exist; create it there or fix spec.namespace and spec.name.",
    )


def _invalid(a: _Answer) -> RemoteFailure:
    return RemoteFailure(
        api.REASON_INVALID_SPEC,
        f"Cluster {a.cluster} refused the token request for {a.target} ({a.code}: {a.detail}); fix the import's spec.",
    )


def _failing(a: _Answer) -> RemoteFailure:
    return RemoteFailure(
        api.REASON_REMOTE_UNREACHABLE,
        f"The API server of cluster {a.cluster} failed ({a.code}: {a.detail}); the controller retries by itself.",
        source_down=True,
    )


def _other(a: _Answer) -> RemoteFailure:
    return RemoteFailure(
        api.REASON_REMOTE_ERROR,
        f"Cluster {a.cluster} answered {a.code} to the token request for {a.target} ({a.detail}); check that cluster.",
    )


_BY_CODE = {401: _unauthorized, 403: _forbidden, 404: _not_found, 400: _invalid, 422: _invalid, 429: _failing}


def classify_remote_error(
    code: int | None,
    remote_message: str,
    cluster: str,
    spec: ImportSpec,
    source: Remote | None = None,
    now: float = 0.0,
) -> RemoteFailure:
    """Map a remote answer (HTTP code, None for no answer) to a reason and a message saying what to fix."""
    detail = " ".join(str(remote_message).split())[:_MAX_REMOTE_MESSAGE]
    answer = _Answer(code, detail, cluster, spec, source or Remote(cluster_name=cluster, server="", ca_pem=b""), now)
    if code is None:
        return _unreachable(answer)
    classify = _BY_CODE.get(code) or (_failing if code >= 500 else _other)
    return classify(answer)


class TokenSource(Protocol):
    """How the reconciler gets one token for one import: `fetch_token` in production, a fake in its table tests
    (tests/test_reconciler_table.py). Returns the token, or raises RemoteFailure saying why not."""

    def __call__(
        self,
        client: ApiClient,
        source: Remote,
        spec: ImportSpec,
        *,
        timeout: float,
        clock: Callable[[], float],
        remote_uid: str | None = None,
    ) -> ImportToken: ...


def fetch_token(
    client: ApiClient,
    source: Remote,
    spec: ImportSpec,
    *,
    timeout: float,
    clock: Callable[[], float],
    remote_uid: str | None = None,
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
                issued = imports_contract.IssuedToken(
                    issued.token, issued.issued_at, issued.issued_at + spec.expiration_seconds
                )
    except ApiException as exc:
        if not exc.status:  # the client wraps a TLS failure in an ApiException without a status
            raise unreachable(source, exc) from None
        code = exc.status
        raise classify_remote_error(code, kube.error_message(exc), source.cluster_name, spec, source, clock()) from None
    except kube.CONNECTION_ERRORS as exc:
        raise unreachable(source, exc) from None
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
    wrong = tokens.subject_mismatch(issued.token, spec.namespace, spec.name)
    if wrong is not None:
        raise RemoteFailure(
            api.REASON_TOKEN_SUBJECT_MISMATCH,
            f"Cluster {source.cluster_name} answered {wrong} when asked for one of service account "
            f"{spec.namespace}/{spec.name}, so it is not used; check what answers at {source.server} (a proxy or "
            "another server in front of that cluster's API server).",
        )
    creds = Credentials(
        server=source.server, ca_crt=issued.ca_pem or source.ca_pem, token=issued.token, namespace=spec.namespace
    )
    return ImportToken(creds, issued, inputs_hash(spec, source.server, source.ca_pem, remote_uid))
