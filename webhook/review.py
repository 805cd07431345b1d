"""Turn an AdmissionReview request body into the response body, for admission.k8s.io/v1 and v1beta1.

Pure apart from the lookup it hands to the decision. Whatever the bytes, it answers: HTTP 400 with a
Status when there is no AdmissionReview to answer (no uid to echo), otherwise a well-formed AdmissionReview
in the version it came in. Nothing escapes but LookupWouldBlock, which asks the caller to retry off the
event loop.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
from dataclasses import dataclass
from typing import Any

from kubemcsa import jsonwire
from webhook import mutation
from webhook.mounts import MAPPING

log = logging.getLogger(__name__)

# kube-apiserver refuses request bodies over 3 MiB, but it runs mutating admission before it checks the size of
# annotations, and the AdmissionReview it sends wraps the object with the request's envelope (userInfo, options)
# and the managedFields it adds: 1 MiB more than the object leaves room for those.
MAX_OBJECT_BYTES = 3 * 1024 * 1024
MAX_BODY_BYTES = MAX_OBJECT_BYTES + 1024 * 1024
API_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")
KIND = "AdmissionReview"

# Results: the label of the requests metric.
RESULT_ALLOWED = "allowed"
RESULT_PATCHED = "patched"
RESULT_REFUSED = "refused"
RESULT_BAD_REQUEST = "bad_request"
RESULT_ERROR = "error"

REASON_NOT_A_POD = "NotAPod"
REASON_INTERNAL = "InternalError"

_STATUS_REASONS = {400: "BadRequest", 403: "Forbidden", 500: "InternalError", 503: "ServiceUnavailable"}

_dumps = json.JSONEncoder(separators=(",", ":")).encode


@dataclass(frozen=True)
class Answer:
    """What to send back (status code and JSON body) and how to count it."""

    status_code: int
    body: bytes
    result: str
    reason: str = ""


def bad_request(message: str) -> Answer:
    """HTTP 400 with a Status body: the request is not an AdmissionReview we can answer."""
    status = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": "BadRequest",
        "code": 400,
    }
    return Answer(400, _dumps(status).encode(), RESULT_BAD_REQUEST, "BadRequest")


def _respond(api_version: str, uid: str, response: dict[str, Any]) -> bytes:
    response = {"uid": uid, **response}
    return _dumps({"apiVersion": api_version, "kind": KIND, "response": response}).encode()


def _encode(patch_json: str) -> bytes:
    """The answer's end from its patch on: the patch in base64, and the closing of the answer's JSON."""
    return base64.b64encode(patch_json.encode()) + b'"}}'


# The planned patches of common pod shapes come back as the very same strings (webhook.mutation caches them), so
# their base64 is kept too: at most 256 of at most 16 KiB.
_CACHED_PATCH_CHARS = 16 * 1024
_encoded_patch = functools.lru_cache(maxsize=256)(_encode)


def _allow(api_version: str, uid: str, patch_json: str = "[]") -> Answer:
    if patch_json == "[]":
        return Answer(200, _respond(api_version, uid, {"allowed": True}), RESULT_ALLOWED)
    tail = _encoded_patch(patch_json) if len(patch_json) <= _CACHED_PATCH_CHARS else _encode(patch_json)
    # Formatted by hand: the base64 text needs no escaping, and a generic encoder would scan it all (hot path).
    head = (
        f'{{"apiVersion":"{api_version}","kind":"{KIND}","response":{{"uid":{_dumps(uid)},"allowed":true,'
        f'"patchType":"JSONPatch","patch":"'
    ).encode()
    return Answer(200, head + tail, RESULT_PATCHED)


def refusal(api_version: str, uid: str, reason: str, message: str, code: int = 403) -> Answer:
    """allowed: false with a Status of this code, reason and message."""
    status = {"code": code, "reason": _STATUS_REASONS.get(code, "Forbidden"), "message": message}
    return Answer(200, _respond(api_version, uid, {"allowed": False, "status": status}), RESULT_REFUSED, reason)


def _group_kind(value: Any) -> tuple[Any, Any]:
    if not isinstance(value, MAPPING):
        return None, None
    return value.get("group"), value.get("kind") or value.get("resource")


@dataclass(frozen=True)
class Pending:
    """A parsed AdmissionReview whose answer needs the cluster: small and picklable (see mutation.Prepared)."""

    api_version: str
    uid: str
    namespace: str
    prepared: mutation.Prepared
    # The answer once every import is found (patch encoded here, where the CPU is spent), else None.
    found: Answer | None = None


def review(body: bytes, lookup: mutation.ImportLookup) -> Answer:
    """Answer one AdmissionReview request body: complete(parse(body), lookup)."""
    parsed = parse(body)
    return parsed if isinstance(parsed, Answer) else complete(parsed, lookup)


def parse(body: bytes, *, max_mounts: int | None = None) -> Answer | Pending:
    """The cluster-free part of the review: the answer if it needs no lookup, else what complete() needs.

    Linear in the size of the body, with no I/O: run it wherever a large body cannot stall anything else.
    With `max_mounts`, raises mutation.TooMuchWork for a pod that needs more mounts than that.
    """
    if len(body) > MAX_BODY_BYTES:
        return bad_request(f"The request body is larger than {MAX_BODY_BYTES} bytes; send a single AdmissionReview.")
    try:
        document = jsonwire.loads(body)
    except ValueError:
        return bad_request("The request body is not JSON; send an admission.k8s.io/v1 AdmissionReview.")
    if not isinstance(document, dict):
        return bad_request("The request body is not a JSON object; send an admission.k8s.io/v1 AdmissionReview.")
    api_version = document.get("apiVersion")
    if document.get("kind") != KIND or api_version not in API_VERSIONS:
        return bad_request(
            "The request body is not an AdmissionReview of admission.k8s.io/v1 or v1beta1; "
            "list those in admissionReviewVersions."
        )
    request = document.get("request")
    if not isinstance(request, dict):
        return bad_request("The AdmissionReview has no request; the API server sends one with every review.")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        return bad_request("The AdmissionReview request has no uid; the API server sends one with every review.")
    if len(uid) > 128:
        return bad_request("The AdmissionReview request's uid is not a UID; the API server sends a UUID.")
    try:
        return _parse_request(api_version, uid, request, max_mounts)
    except mutation.TooMuchWork:
        raise
    except Exception:
        return _internal_error(api_version, uid)


def complete(pending: Pending, lookup: mutation.ImportLookup) -> Answer:
    """The answer to a parsed review, with at most one lookup per kind. Raises only LookupWouldBlock."""
    api_version, uid = pending.api_version, pending.uid
    try:
        decision = mutation.finish(pending.prepared, pending.namespace, lookup)
        if decision is pending.prepared.planned and pending.found is not None:
            return pending.found  # (pickling keeps that identity: both come from one object graph)
    except mutation.LookupWouldBlock:
        raise
    except mutation.LookupFailed as exc:
        return refusal(api_version, uid, mutation.REASON_LOOKUP_FAILED, str(exc), code=503)
    except Exception:
        return _internal_error(api_version, uid)
    return _answer(api_version, uid, decision)


def _answer(api_version: str, uid: str, decision: mutation.Decision) -> Answer:
    if decision.allowed:
        return _allow(api_version, uid, decision.patch_json)
    code = 400 if decision.reason == mutation.REASON_INVALID_POD else 403
    return refusal(api_version, uid, decision.reason, decision.message, code=code)


def _internal_error(api_version: str, uid: str) -> Answer:
    # A bug must not take pod creation down with a 500 loop; refuse this pod and log the details.
    log.exception("unexpected error while reviewing request %s", uid)
    status = {
        "code": 500,
        "reason": "InternalError",
        "message": "The service account import webhook failed unexpectedly; retry, and report it "
        "with the webhook's logs if it persists.",
    }
    return Answer(200, _respond(api_version, uid, {"allowed": False, "status": status}), RESULT_ERROR, REASON_INTERNAL)


def _parse_request(api_version: str, uid: str, request: dict[str, Any], max_mounts: int | None) -> Answer | Pending:
    if request.get("operation") != "CREATE":
        return _allow(api_version, uid)
    if request.get("subResource"):
        # pods/binding, pods/eviction, ...: not a pod being created, not ours to judge.
        return _allow(api_version, uid)
    group, kind = _group_kind(request.get("kind"))
    pod = request.get("object")
    if (
        kind != "Pod"
        or group not in ("", None)
        or not isinstance(pod, dict)
        or pod.get("kind", "Pod") != "Pod"
        or pod.get("apiVersion", "v1") != "v1"
    ):
        return refusal(
            api_version,
            uid,
            REASON_NOT_A_POD,
            "This webhook only admits core/v1 pods; limit the MutatingWebhookConfiguration's rules to pods CREATE.",
            code=400,
        )
    namespace = request.get("namespace")
    if not namespace:
        metadata = pod.get("metadata")
        namespace = metadata.get("namespace") if isinstance(metadata, MAPPING) else None
    prepared = mutation.prepare(pod, max_mounts=max_mounts)
    if prepared.early is not None:
        return _answer(api_version, uid, prepared.early)
    found = _answer(api_version, uid, prepared.planned) if prepared.planned is not None else None
    return Pending(api_version, uid, namespace if isinstance(namespace, str) else "", prepared, found)
