"""What to do for one ServiceAccountImport, decided from data alone (no API call, no clock, no I/O).

The worker in run.py calls `decide` with what its caches know; when the decision asks for a token it makes
the remote call and calls `decide` again with the new token (or the failure), then applies the decision.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from controller.spec import ImportSpec, SpecError, parse_spec
from kubemcsa import api
from kubemcsa.credentials import Credentials, CredentialsError, from_secret_data, to_secret_data
from kubemcsa.timefmt import format_time, parse_time

ANNOTATION_PREFIX = "multicluster.admiralty.io/"
ANNOTATION_EXPIRES = ANNOTATION_PREFIX + "token-expiration"
ANNOTATION_ISSUED = ANNOTATION_PREFIX + "token-issued"
ANNOTATION_INPUTS_HASH = ANNOTATION_PREFIX + "inputs-hash"
ANNOTATION_DATA_HASH = ANNOTATION_PREFIX + "data-hash"
# Legacy mode: the remote token Secret exists but the remote token controller has not filled it in yet.
REASON_LEGACY_TOKEN_PENDING = "LegacyTokenPending"
_MAX_REMOTE_MESSAGE = 300


@dataclass(frozen=True)
class Remote:
    """Where a source cluster's API is and the CA that proves it (from the controller's own config for it)."""

    cluster_name: str
    server: str
    ca_pem: bytes


@dataclass(frozen=True)
class IssuedToken:
    """A token obtained for an import, with what it was obtained for."""

    token: str = field(repr=False)
    issued_at: float
    expires_at: float | None  # None: a legacy token, which does not expire
    inputs_hash: str
    server: str
    ca_pem: bytes = field(repr=False)
    namespace: str

    @property
    def refresh_at(self) -> float | None:
        return refresh_time(self.issued_at, self.expires_at)

    def credentials(self) -> Credentials:
        return Credentials(server=self.server, ca_crt=self.ca_pem, token=self.token, namespace=self.namespace)


@dataclass(frozen=True)
class RemoteFailure:
    """Why a token could not be obtained."""

    reason: str
    message: str


@dataclass
class Decision:
    """What the worker must do for one import. Empty means: nothing (the steady state)."""

    request_token: bool = False
    spec: ImportSpec | None = None
    secret: dict[str, Any] | None = None  # the Secret to write
    create_secret: bool = False  # True: create it; False: replace the existing one
    status: dict[str, Any] | None = None  # the new status, only if it differs from the current one
    requeue_at: float | None = None
    failed: bool = False  # the worker backs off
    failure: RemoteFailure | None = None
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    remember: IssuedToken | None = None  # a token recovered from the Secret, to keep in memory


def _dict(value: Any) -> dict[str, Any]:
    """`value` if it is a mapping, else {}: objects edited by hand may hold anything."""
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _meta(obj: Any) -> dict[str, Any]:
    return _dict(_dict(obj).get("metadata"))


def inputs_hash(spec: ImportSpec, remote: Remote) -> str:
    """A hash of everything a token depends on: the spec and the remote server and CA."""
    material = dict(spec.fingerprint_fields())
    material["server"] = remote.server
    material["ca"] = hashlib.sha256(remote.ca_pem).hexdigest()
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def data_hash(data: dict[str, str] | None) -> str:
    """A hash of a Secret's data, recorded in an annotation so that an edit can be told from the cache alone."""
    digest = hashlib.sha256()
    for key in sorted(data or {}):
        digest.update(key.encode() + b"\0" + str((data or {})[key]).encode() + b"\0")
    return digest.hexdigest()[:16]


def is_controlled_by(obj: dict[str, Any] | None, owner_uid: str) -> bool:
    for ref in _list(_meta(obj).get("ownerReferences")):
        if isinstance(ref, dict) and ref.get("controller") is True and ref.get("uid") == owner_uid:
            return True
    return False


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


def set_condition(conditions: list[dict[str, Any]] | None, new: dict[str, Any], now: float) -> list[dict[str, Any]]:
    """Conditions with `new` set, keeping lastTransitionTime when the status did not change (metav1.Condition rules)."""
    result: list[dict[str, Any]] = []
    replaced = False
    for cond in _list(conditions):
        if not isinstance(cond, dict):
            continue
        if cond.get("type") == new["type"]:
            merged = dict(new)
            same = cond.get("status") == new["status"] and cond.get("lastTransitionTime")
            merged["lastTransitionTime"] = cond["lastTransitionTime"] if same else format_time(now)
            result.append(merged)
            replaced = True
        else:
            result.append(cond)
    if not replaced:
        result.append({**new, "lastTransitionTime": format_time(now)})
    return result


def status_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning status `old` into `new` (fields that disappear are set to null)."""
    patch: dict[str, Any] = {key: None for key in (old or {}) if key not in new}
    patch.update(new)
    return {"status": patch}


def _secret_token_state(secret: dict[str, Any]) -> tuple[float | None, float | None]:
    annotations = _dict(_meta(secret).get("annotations"))
    return parse_time(annotations.get(ANNOTATION_ISSUED)), parse_time(annotations.get(ANNOTATION_EXPIRES))


def refresh_time(issued_at: float, expires_at: float | None) -> float | None:
    """When to replace a token: after REFRESH_FRACTION of its real lifetime; None for a token that never expires."""
    if expires_at is None:
        return None
    return issued_at + api.REFRESH_FRACTION * max(0.0, expires_at - issued_at)


def desired_secret(
    imp: dict[str, Any], token: IssuedToken, cluster_name: str, existing: dict[str, Any] | None
) -> dict[str, Any]:
    """The Secret holding `token` for `imp`, built on `existing` (keeping its resourceVersion and others' keys)."""
    meta = imp["metadata"]
    data = to_secret_data(token.credentials(), cluster_name)
    old_meta = _meta(existing)
    labels = {k: v for k, v in _dict(old_meta.get("labels")).items() if isinstance(v, str)}
    labels[api.IMPORT_LABEL] = meta["name"]
    annotations = {
        key: value
        for key, value in _dict(old_meta.get("annotations")).items()
        if isinstance(value, str)
        and key not in (ANNOTATION_EXPIRES, ANNOTATION_ISSUED, ANNOTATION_INPUTS_HASH, ANNOTATION_DATA_HASH)
    }
    annotations[ANNOTATION_ISSUED] = format_time(token.issued_at)
    if token.expires_at is not None:
        annotations[ANNOTATION_EXPIRES] = format_time(token.expires_at)
    annotations[ANNOTATION_INPUTS_HASH] = token.inputs_hash
    annotations[ANNOTATION_DATA_HASH] = data_hash(data)
    owner = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": meta["name"],
        "uid": meta.get("uid", ""),
        "controller": True,
        "blockOwnerDeletion": True,
    }
    others = [
        ref
        for ref in _list(old_meta.get("ownerReferences"))
        if isinstance(ref, dict) and ref.get("uid") != meta.get("uid")
    ]
    new_meta: dict[str, Any] = {
        "name": api.secret_name_for_import(meta["name"]),
        "namespace": meta.get("namespace"),
        "labels": labels,
        "annotations": annotations,
        "ownerReferences": [owner, *others],
    }
    if old_meta.get("resourceVersion"):
        new_meta["resourceVersion"] = old_meta["resourceVersion"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": new_meta,
        "type": _dict(existing).get("type") or "Opaque",
        "data": data,
    }


def token_from_secret(secret: dict[str, Any]) -> IssuedToken | None:
    """The token a current Secret holds (to recreate the Secret after a restart without a new token request)."""
    issued_at, expires_at = _secret_token_state(secret)
    annotations = _dict(_meta(secret).get("annotations"))
    if issued_at is None:
        return None
    try:
        creds = from_secret_data(_dict(secret.get("data")))
    except CredentialsError:
        return None
    return IssuedToken(
        token=creds.token,
        issued_at=issued_at,
        expires_at=expires_at,
        inputs_hash=str(annotations.get(ANNOTATION_INPUTS_HASH, "")),
        server=creds.server,
        ca_pem=creds.ca_crt,
        namespace=creds.namespace,
    )


def _secret_is_current(secret: dict[str, Any], wanted_inputs: str, now: float) -> bool:
    annotations = _dict(_meta(secret).get("annotations"))
    data = _dict(secret.get("data"))
    if annotations.get(ANNOTATION_INPUTS_HASH) != wanted_inputs:
        return False
    if annotations.get(ANNOTATION_DATA_HASH) != data_hash(data) or any(k not in data for k in api.SECRET_KEYS):
        return False
    issued_at, expires_at = _secret_token_state(secret)
    if issued_at is None:
        return False
    refresh_at = refresh_time(issued_at, expires_at)
    return refresh_at is None or now < refresh_at


def _ready(status: str, reason: str, message: str, generation: Any) -> dict[str, Any]:
    cond = {"type": api.CONDITION_READY, "status": status, "reason": reason, "message": message}
    if isinstance(generation, int):
        cond["observedGeneration"] = generation
    return cond


def _status(
    imp: dict[str, Any],
    now: float,
    ready: dict[str, Any],
    secret_name: str | None,
    issued_at: float | None,
    expires_at: float | None,
) -> dict[str, Any] | None:
    """The new status, or None if it equals the current one (so the steady state writes nothing)."""
    old = _dict(imp.get("status"))
    new: dict[str, Any] = {}
    if secret_name:
        new["secrets"] = [{"name": secret_name}]
    new["conditions"] = set_condition(old.get("conditions"), ready, now)
    if expires_at is not None:
        new["expirationTimestamp"] = format_time(expires_at)
    if issued_at is not None:
        new["lastRefreshTime"] = format_time(issued_at)
    generation = _meta(imp).get("generation")
    if isinstance(generation, int):
        new["observedGeneration"] = generation
    return None if new == old else new


def _condition_changed(imp: dict[str, Any], ready: dict[str, Any]) -> bool:
    for cond in _list(_dict(imp.get("status")).get("conditions")):
        if isinstance(cond, dict) and cond.get("type") == api.CONDITION_READY:
            return (cond.get("status"), cond.get("reason"), cond.get("message")) != (
                ready["status"],
                ready["reason"],
                ready["message"],
            )
    return True


def decide(
    imp: dict[str, Any],
    secret: dict[str, Any] | None,
    now: float,
    *,
    remote: Remote | None,
    known_clusters: list[str] | tuple[str, ...] = (),
    issued: IssuedToken | None = None,
    failure: RemoteFailure | None = None,
    cluster_error: str | None = None,
) -> Decision:
    """Decide what to do for import `imp`, given its Secret as cached (or None), the time and the source cluster."""
    meta = _meta(imp)
    generation = meta.get("generation")
    decision = Decision()

    def fail(reason: str, message: str, secret_name: str | None, issued_at=None, expires_at=None) -> Decision:
        ready = _ready("False", reason, message, generation)
        decision.status = _status(imp, now, ready, secret_name, issued_at, expires_at)
        if decision.status is not None and _condition_changed(imp, ready):
            decision.events.append(("Warning", reason, message))
        return decision

    try:
        spec = parse_spec(imp)
    except SpecError as exc:
        return fail(api.REASON_INVALID_SPEC, str(exc), None)
    decision.spec = spec
    secret_name = api.secret_name_for_import(meta.get("name", ""))
    uid = meta.get("uid", "")

    if secret is not None and not is_controlled_by(secret, uid):
        return fail(
            api.REASON_SECRET_CONFLICT,
            f"A Secret named {secret_name} already exists in namespace {meta.get('namespace')} and is not controlled "
            "by this import; delete or rename that Secret, or rename the import.",
            None,
        )
    ours = secret  # from here on the Secret, if any, is ours
    ours_issued, ours_expires = _secret_token_state(ours) if ours is not None else (None, None)

    if remote is None:
        known = ", ".join(sorted(known_clusters)) or "none"
        if cluster_error:
            message = f"The controller cannot use the credentials of cluster {spec.cluster_name}: {cluster_error}"
        else:
            message = (
                f"The controller knows no cluster named {spec.cluster_name} (known: {known}); fix spec.clusterName "
                "or give the controller credentials for it (--source-kubeconfig context, mounted import, "
                "kubemcsa bootstrap)."
            )
        return fail(
            api.REASON_UNKNOWN_CLUSTER,
            message,
            secret_name if ours is not None else None,
            ours_issued,
            ours_expires,
        )

    wanted = inputs_hash(spec, remote)
    if ours is not None and _secret_is_current(ours, wanted, now):
        ready = _ready("True", api.REASON_TOKEN_ISSUED, _ready_message(spec, ours_expires), generation)
        decision.status = _status(imp, now, ready, secret_name, ours_issued, ours_expires)
        decision.requeue_at = refresh_time(ours_issued or now, ours_expires)
        recovered = token_from_secret(ours)
        if recovered is not None and (issued is None or issued.issued_at < recovered.issued_at):
            decision.remember = recovered
        return decision

    candidate = issued
    if candidate is not None and candidate.inputs_hash != wanted:
        candidate = None
    if candidate is not None and candidate.refresh_at is not None and now >= candidate.refresh_at:
        candidate = None

    if candidate is None and failure is None:
        decision.request_token = True
        return decision

    if candidate is None:
        assert failure is not None
        decision.failed = True
        decision.failure = failure
        if ours_expires is not None and now < ours_expires:
            message = (
                f"{failure.message} The last token stays in Secret {secret_name} until it expires at "
                f"{format_time(ours_expires)}."
            )
            decision.requeue_at = ours_expires
            return fail(failure.reason, message, secret_name, ours_issued, ours_expires)
        if ours_expires is not None:
            return fail(
                api.REASON_TOKEN_EXPIRED,
                f"The token in Secret {secret_name} expired at {format_time(ours_expires)} and could not be "
                f"refreshed: {failure.message}",
                secret_name,
                ours_issued,
                ours_expires,
            )
        return fail(failure.reason, failure.message, secret_name if ours is not None else None)

    decision.secret = desired_secret(imp, candidate, spec.cluster_name, ours)
    decision.create_secret = ours is None
    ready = _ready("True", api.REASON_TOKEN_ISSUED, _ready_message(spec, candidate.expires_at), generation)
    decision.status = _status(imp, now, ready, secret_name, candidate.issued_at, candidate.expires_at)
    decision.requeue_at = candidate.refresh_at
    if ours is not None:
        old_token = _dict(ours.get("data")).get(api.KEY_TOKEN)
        new_token = decision.secret["data"][api.KEY_TOKEN]
        if old_token != new_token:
            decision.events.append(
                ("Normal", "TokenRefreshed", f"Refreshed the token in Secret {secret_name}{_until(candidate)}.")
            )
    return decision


def _until(token: IssuedToken) -> str:
    return "" if token.expires_at is None else f", valid until {format_time(token.expires_at)}"


def _ready_message(spec: ImportSpec, expires_at: float | None) -> str:
    what = f"service account {spec.namespace}/{spec.name} of cluster {spec.cluster_name}"
    if expires_at is None:
        return f"The Secret holds a legacy long-lived token of {what}."
    return f"The Secret holds a token of {what}, refreshed before it expires."


def decode_token_response(body: dict[str, Any]) -> tuple[str, float | None]:
    """The token and its expiry from a TokenRequest answer; raise ValueError if it holds no token."""
    status = body.get("status") if isinstance(body, dict) else None
    token = (status or {}).get("token")
    if not isinstance(token, str) or not token:
        raise ValueError("the TokenRequest answer holds no token")
    return token, parse_time((status or {}).get("expirationTimestamp"))


def legacy_secret_token(secret: dict[str, Any]) -> tuple[str, bytes, str] | None:
    """(token, ca.crt, namespace) of a filled kubernetes.io/service-account-token Secret, else None."""
    data = _dict(secret.get("data"))
    try:
        token = base64.b64decode(data.get("token") or "").decode()
        ca = base64.b64decode(data.get("ca.crt") or "")
        namespace = base64.b64decode(data.get("namespace") or "").decode()
    except (ValueError, TypeError, UnicodeDecodeError):
        return None
    if not token:
        return None
    return token, ca, namespace
