"""Mutating admission webhooks, called as kube-apiserver's MutatingAdmissionWebhook plugin calls them.

Matching (rules, namespaceSelector, objectSelector), the AdmissionReview sent, the verification of the
answer, failurePolicy, sideEffects on dry run, JSONPatch application and reinvocation follow
k8s.io/apiserver/pkg/admission/plugin/webhook; error wording is kube-apiserver's so that clients (and the
tests of this project) see what they would see on a real cluster. The only I/O is the HTTPS POST.
"""

from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import functools
import gzip
import http.client
import json
import re
import socket
import ssl
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jsonpatch
import jsonpointer

from kubemcsa_testing import cel
from kubemcsa_testing.errors import StatusError, bad_request, internal
from kubemcsa_testing.rbac import UserInfo
from kubemcsa_testing.selectors import label_selector_from_dict

ADMISSION_GROUP = "admission.k8s.io"
SUPPORTED_REVIEW_VERSIONS = ("v1", "v1beta1")
DEFAULT_TIMEOUT_SECONDS = 10
MAX_RESPONSE_BYTES = 3 * 1024 * 1024
USER_AGENT = "kube-apiserver-admission"

# Where a webhook's clientConfig.service really listens: (namespace, name, port) -> "https://HOST:PORT" or None.
ServiceResolver = Callable[[str, str, int], "str | None"]

_OPTIONS_KIND = {"CREATE": "CreateOptions", "UPDATE": "UpdateOptions", "DELETE": "DeleteOptions"}


@dataclass(frozen=True)
class AdmissionAttributes:
    """One request as admission sees it. `kind` is {group, version, kind}, `resource` {group, version, resource}."""

    obj: dict[str, Any] | None
    old_obj: dict[str, Any] | None
    operation: str
    kind: dict[str, str]
    resource: dict[str, str]
    sub_resource: str
    namespace: str
    name: str
    namespace_labels: dict[str, str] | None
    user: UserInfo
    dry_run: bool
    options: dict[str, Any] | None = None
    extra: dict[str, list[str]] = field(default_factory=dict)


class _CallError(Exception):
    """A failure to call the webhook or to understand its answer (kube's ErrCallingWebhook)."""


# --- matching -----------------------------------------------------------------------------------------------


def _strings(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _exact_or_wildcard(items: Any, requested: str) -> bool:
    return any(item in ("*", requested) for item in _strings(items))


def _scope_matches(scope: Any, attrs: AdmissionAttributes) -> bool:
    resource = attrs.resource.get("resource", "")
    if scope in (None, "*"):
        return True
    if scope == "Namespaced":
        # A Namespace object is cluster-scoped even though its request carries a namespace (its own name).
        return resource != "namespaces" and bool(attrs.namespace)
    if scope == "Cluster":
        return resource == "namespaces" or not attrs.namespace
    return False


def _resource_matches(resources: Any, resource: str, sub_resource: str) -> bool:
    for item in _strings(resources):
        res, _, sub = item.partition("/")
        if res in ("*", resource) and sub in ("*", sub_resource):
            return True
    return False


def rule_matches(rule: Mapping[str, Any], attrs: AdmissionAttributes) -> bool:
    """One RuleWithOperations against the request (operations, apiGroups, apiVersions, resources, scope)."""
    if not isinstance(rule, Mapping):
        return False
    return (
        _scope_matches(rule.get("scope"), attrs)
        and _exact_or_wildcard(rule.get("operations"), attrs.operation)
        and _exact_or_wildcard(rule.get("apiGroups"), attrs.resource.get("group", ""))
        and _exact_or_wildcard(rule.get("apiVersions"), attrs.resource.get("version", ""))
        and _resource_matches(rule.get("resources"), attrs.resource.get("resource", ""), attrs.sub_resource)
    )


def _labels_of(obj: Any) -> dict[str, str]:
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    labels = meta.get("labels") if isinstance(meta, Mapping) else None
    return {k: v for k, v in labels.items() if isinstance(v, str)} if isinstance(labels, Mapping) else {}


def _selector(selector: Any) -> Callable[[Mapping[str, str]], bool] | None:
    """None for an empty selector (matches everything); StatusError 500 for a malformed one, as kube."""
    if not selector:
        return None
    if not isinstance(selector, Mapping):
        raise internal("invalid label selector: must be an object")
    try:
        return label_selector_from_dict(selector)
    except StatusError as exc:
        raise internal(exc.message) from exc


def namespace_selector_matches(webhook: Mapping[str, Any], attrs: AdmissionAttributes) -> bool:
    resource = attrs.resource.get("resource", "")
    if not attrs.namespace and resource != "namespaces":
        # kube: a cluster-scoped object that is not a Namespace is never exempted by a namespaceSelector.
        return True
    matches = _selector(webhook.get("namespaceSelector"))
    if matches is None:
        return True
    if resource == "namespaces" and not attrs.sub_resource and attrs.operation in ("CREATE", "UPDATE"):
        # The namespace being written is not stored yet: its labels come from the object itself.
        return matches(_labels_of(attrs.obj))
    if attrs.namespace_labels is None:
        raise internal(f'namespaces "{attrs.namespace}" not found')
    return matches(attrs.namespace_labels)


def object_selector_matches(webhook: Mapping[str, Any], attrs: AdmissionAttributes) -> bool:
    matches = _selector(webhook.get("objectSelector"))
    if matches is None:
        return True
    return any(obj is not None and matches(_labels_of(obj)) for obj in (attrs.obj, attrs.old_obj))


def webhook_matches(webhook: Mapping[str, Any], attrs: AdmissionAttributes) -> bool:
    """Should this webhook be called for this request? (rules, namespaceSelector, objectSelector, matchConditions).

    A matchCondition that cannot be evaluated refuses the request (StatusError 403) under failurePolicy Fail and
    skips the webhook under Ignore, as kube's matcher does.
    """
    rules = webhook.get("rules")
    if not isinstance(rules, list) or not any(rule_matches(rule, attrs) for rule in rules):
        return False
    if not (namespace_selector_matches(webhook, attrs) and object_selector_matches(webhook, attrs)):
        return False
    return match_conditions_match(webhook, attrs)


# Variables of a webhook's matchConditions; `authorizer` is declared, but no method of it is supported here.
MATCH_CONDITION_VARIABLES = ("object", "oldObject", "request", "authorizer")
MAX_MATCH_CONDITIONS = 64


@functools.lru_cache(maxsize=256)
def _compiled(expression: str) -> cel.Program:
    return cel.compile_expression(expression, MATCH_CONDITION_VARIABLES)


def match_conditions_match(webhook: Mapping[str, Any], attrs: AdmissionAttributes) -> bool:
    """kube's matchconditions.Matcher: every condition true; any false skips the webhook; errors fail closed
    (a 403 naming the expression) unless failurePolicy is Ignore, which skips the webhook."""
    conditions = webhook.get("matchConditions")
    if not conditions:
        return True
    request = build_review(attrs, None, "v1", "")["request"]
    for key in ("uid", "object", "oldObject"):
        request.pop(key, None)
    activation = {"object": attrs.obj, "oldObject": attrs.old_obj, "request": request}
    errors: list[str] = []
    for condition in conditions:
        expression = str(condition.get("expression", "")) if isinstance(condition, Mapping) else ""
        try:
            result = _compiled(expression).evaluate(activation)
        except cel.CelError as exc:
            errors.append(f"expression '{expression}' resulted in error: {exc}")
            continue
        if result is not True:
            return False
    if not errors:
        return True
    if webhook.get("failurePolicy") == "Ignore":
        return False
    text = errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"
    resource = attrs.resource.get("resource", "")
    group = attrs.resource.get("group", "")
    qualified = f"{resource}.{group}" if group else resource
    what = f'{qualified} "{attrs.name}"' if attrs.name else qualified
    raise StatusError(403, "Forbidden", f"{what} is forbidden: {text}", {"name": attrs.name, "kind": resource})


# --- the AdmissionReview ------------------------------------------------------------------------------------


def review_version(webhook: Mapping[str, Any]) -> str | None:
    """The first of admissionReviewVersions this server speaks (v1, v1beta1), else None."""
    for version in _strings(webhook.get("admissionReviewVersions")):
        if version in SUPPORTED_REVIEW_VERSIONS:
            return version
    return None


def build_review(attrs: AdmissionAttributes, obj: dict[str, Any] | None, version: str, uid: str) -> dict[str, Any]:
    """The AdmissionReview request body (same shape for v1 and v1beta1), as in the shared fixtures."""
    user: dict[str, Any] = {"username": attrs.user.username}
    if attrs.user.uid:
        user["uid"] = attrs.user.uid
    if attrs.user.groups:
        user["groups"] = list(attrs.user.groups)
    if attrs.extra:
        user["extra"] = {k: list(v) for k, v in attrs.extra.items()}
    options = attrs.options
    if options is None and attrs.operation in _OPTIONS_KIND:
        options = {"kind": _OPTIONS_KIND[attrs.operation], "apiVersion": "meta.k8s.io/v1"}
    request: dict[str, Any] = {
        "uid": uid,
        "kind": dict(attrs.kind),
        "resource": dict(attrs.resource),
    }
    if attrs.sub_resource:
        request["subResource"] = attrs.sub_resource
    request["requestKind"] = dict(attrs.kind)
    request["requestResource"] = dict(attrs.resource)
    if attrs.sub_resource:
        request["requestSubResource"] = attrs.sub_resource
    if attrs.name:
        request["name"] = attrs.name
    if attrs.namespace:
        request["namespace"] = attrs.namespace
    request.update(
        {
            "operation": attrs.operation,
            "userInfo": user,
            "object": obj,
            "oldObject": attrs.old_obj,
            "dryRun": attrs.dry_run,
            "options": options,
        }
    )
    return {"kind": "AdmissionReview", "apiVersion": f"{ADMISSION_GROUP}/{version}", "request": request}


@dataclass(frozen=True)
class WebhookResult:
    allowed: bool
    patch: list[Any] | None
    status: dict[str, Any] | None
    warnings: tuple[str, ...]


def _gvk_string(api_version: Any, kind: Any) -> str:
    group, _, version = str(api_version or "").rpartition("/")
    return f"{group}/{version}, Kind={kind or ''}"


def verify_response(review: Any, version: str, uid: str) -> WebhookResult:
    """Check a webhook's answer as kube does (VerifyAdmissionResponse); _CallError explains what is wrong."""
    if not isinstance(review, Mapping):
        raise _CallError("failed to call webhook: couldn't get version/kind; json parse error: not a JSON object")
    response = review.get("response")
    if not isinstance(response, Mapping):
        raise _CallError("received invalid webhook response: webhook response was absent")
    if version == "v1":
        got_uid = response.get("uid")
        if got_uid != uid:
            raise _CallError(
                f"received invalid webhook response: expected response.uid={json.dumps(uid)}, got "
                f"{json.dumps(got_uid if isinstance(got_uid, str) else '')}"
            )
        if review.get("apiVersion") != f"{ADMISSION_GROUP}/v1" or review.get("kind") != "AdmissionReview":
            raise _CallError(
                "received invalid webhook response: expected webhook response of "
                f"{ADMISSION_GROUP}/v1, Kind=AdmissionReview, "
                f"got {_gvk_string(review.get('apiVersion'), review.get('kind'))}"
            )
    raw_patch = response.get("patch")
    patch_type = response.get("patchType")
    if version == "v1":
        if raw_patch and patch_type is None:
            raise _CallError(
                "received invalid webhook response: webhook returned response.patch but not response.patchType"
            )
        if not raw_patch and patch_type is not None:
            raise _CallError(
                "received invalid webhook response: webhook returned response.patchType but not response.patch"
            )
    elif raw_patch:
        patch_type = "JSONPatch"  # v1beta1 never checked patchType
    if raw_patch and patch_type != "JSONPatch":
        raise _CallError(f"unsupported patch type {json.dumps(patch_type if isinstance(patch_type, str) else '')}")
    patch: list[Any] | None = None
    if raw_patch:
        if not isinstance(raw_patch, str):
            raise _CallError(
                "failed to call webhook: json: cannot unmarshal response.patch into Go value of type []uint8"
            )
        try:
            decoded = base64.b64decode(raw_patch, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _CallError(f"failed to call webhook: illegal base64 data in response.patch: {exc}") from exc
        try:
            patch = json.loads(decoded)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _CallError(f"received undecodable patch in webhook response: {exc}") from exc
        if not isinstance(patch, list) or not all(isinstance(op, Mapping) for op in patch):
            raise _CallError(
                "received undecodable patch in webhook response: "
                "json: cannot unmarshal into Go value of type jsonpatch.Patch"
            )
    status = response.get("status")
    warnings = tuple(w for w in response.get("warnings") or () if isinstance(w, str))
    return WebhookResult(
        allowed=response.get("allowed") is True,
        patch=patch or None,
        status=dict(status) if isinstance(status, Mapping) else None,
        warnings=warnings,
    )


def rejection(webhook_name: str, status: Mapping[str, Any] | None) -> StatusError:
    """kube's error for allowed: false (webhookerrors.ToStatusErr)."""
    status = status or {}
    denied = f"admission webhook {json.dumps(webhook_name)} denied the request"
    code = status.get("code")
    if not isinstance(code, int) or isinstance(code, bool) or code < 400:
        code = 400
    message, reason = status.get("message"), status.get("reason")
    if isinstance(message, str) and message:
        text = f"{denied}: {message}"
    elif isinstance(reason, str) and reason:
        text = f"{denied}: {reason}"
    else:
        text = f"{denied} without explanation"
    details = status.get("details")
    return StatusError(
        code, reason if isinstance(reason, str) else "", text, dict(details) if isinstance(details, Mapping) else None
    )


# --- JSONPatch ----------------------------------------------------------------------------------------------


def apply_patch(obj: dict[str, Any], patch: list[Any]) -> dict[str, Any]:
    """Apply a webhook's JSONPatch; a patch that does not apply is kube's 500 with evanphx/json-patch's words."""
    doc: Any = copy.deepcopy(obj)
    for op in patch:
        name = op.get("op")
        path = op.get("path")
        try:
            doc = jsonpatch.JsonPatch([op]).apply(doc, in_place=False)
        except jsonpatch.JsonPatchTestFailed as exc:
            raise internal(f"testing value {path} failed: test failed") from exc
        except (jsonpatch.JsonPatchConflict, jsonpointer.JsonPointerException, IndexError, KeyError, TypeError) as exc:
            where = f'from path: "{op.get("from")}"' if name in ("move", "copy") else f'path: "{path}"'
            raise internal(f"{name} operation does not apply: doc is missing {where}: missing value") from exc
        except jsonpatch.InvalidJsonPatch as exc:
            raise internal(f"Unexpected kind: {name}" if name else "invalid JSON patch operation") from exc
        except jsonpatch.JsonPatchException as exc:
            raise internal(f"{name} operation does not apply: {exc}") from exc
    if not isinstance(doc, dict):
        raise internal("the webhook's patch replaced the object with something that is not an object")
    return doc


def _check_identity(
    webhook_name: str, before: Mapping[str, Any], after: Mapping[str, Any], attrs: AdmissionAttributes
) -> dict[str, Any]:
    """Refuse a patch that moves the object (other name or namespace), as the request handlers do."""
    old_meta = before.get("metadata") if isinstance(before.get("metadata"), Mapping) else {}
    new_meta = after.get("metadata")
    if not isinstance(new_meta, Mapping):
        raise internal(f"admission webhook {json.dumps(webhook_name)} removed the object's metadata")
    if (new_meta.get("namespace") or "") != (old_meta.get("namespace") or ""):
        raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
    if old_meta.get("name") and new_meta.get("name") != old_meta.get("name"):
        raise bad_request(
            f"the name of the object ({new_meta.get('name')}) "
            f"does not match the name on the URL ({old_meta.get('name')})"
        )
    if new_meta.get("uid") != old_meta.get("uid"):
        if attrs.operation != "CREATE":
            raise StatusError(
                409,
                "Conflict",
                f"Precondition failed: UID in precondition: {old_meta.get('uid')}, "
                f"UID in object meta: {new_meta.get('uid')}",
            )
        # On create the server assigns the uid: whatever the webhook wrote is ignored.
        restored = dict(after)
        restored["metadata"] = {k: v for k, v in new_meta.items() if k != "uid"}
        if "uid" in old_meta:
            restored["metadata"]["uid"] = old_meta["uid"]
        return restored
    return dict(after)


# --- HTTPS --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    url: str  # what kube would print in errors: https://HOST:PORT/PATH?timeout=Ns
    connect_host: str
    connect_port: int
    server_name: str  # the name the certificate must carry
    host_header: str
    path: str


def _target(webhook: Mapping[str, Any], timeout: int, resolve_service: ServiceResolver | None) -> _Target:
    config = webhook.get("clientConfig")
    if not isinstance(config, Mapping):
        raise _CallError("could not get REST client: webhook has no clientConfig")
    query = f"timeout={timeout}s"
    url = config.get("url")
    if isinstance(url, str) and url:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "https" or not parsed.hostname:
            raise _CallError(f'could not get REST client: webhook url must be an https URL with a host, got "{url}"')
        try:
            port = parsed.port or 443
        except ValueError as exc:
            raise _CallError(f'could not get REST client: invalid port in webhook url "{url}"') from exc
        path = (parsed.path or "/") + "?" + (f"{parsed.query}&{query}" if parsed.query else query)
        full = urllib.parse.urlunsplit(("https", parsed.netloc, parsed.path, path.partition("?")[2], ""))
        return _Target(full, parsed.hostname, port, parsed.hostname, parsed.netloc, path)
    service = config.get("service")
    if not isinstance(service, Mapping) or not service.get("name") or not service.get("namespace"):
        raise _CallError("could not get REST client: webhook clientConfig needs a url or a service")
    name, namespace = str(service["name"]), str(service["namespace"])
    port = service.get("port") if isinstance(service.get("port"), int) else 443
    server_name = f"{name}.{namespace}.svc"
    path = str(service.get("path") or "/")
    full = f"https://{server_name}:{port}{path}?{query}"
    resolved = resolve_service(namespace, name, port) if resolve_service is not None else None
    if not resolved:
        raise _CallError(f'failed to call webhook: Post "{full}": service "{name}" not found')
    base = urllib.parse.urlsplit(resolved if "://" in resolved else f"https://{resolved}")
    if not base.hostname:
        raise _CallError(f'failed to call webhook: Post "{full}": service "{name}" has no endpoints')
    return _Target(full, base.hostname, base.port or 443, server_name, f"{server_name}:{port}", f"{path}?{query}")


def _tls_context(webhook: Mapping[str, Any]) -> ssl.SSLContext:
    config = webhook.get("clientConfig") or {}
    bundle = config.get("caBundle") if isinstance(config, Mapping) else None
    if not bundle:
        return ssl.create_default_context()
    try:
        pem = base64.b64decode(bundle, validate=True).decode("ascii")
        return ssl.create_default_context(cadata=pem)
    except (binascii.Error, ValueError, ssl.SSLError) as exc:
        raise _CallError(
            "could not get REST client: unable to load root certificates: unable to parse bytes as PEM block"
        ) from exc


def _describe_os_error(exc: BaseException, target: _Target) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "context deadline exceeded"
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code == 62 or "mismatch" in str(exc.verify_message):
            return f"tls: failed to verify certificate: x509: certificate is not valid for {target.server_name}"
        if exc.verify_code == 10:
            return "tls: failed to verify certificate: x509: certificate has expired or is not yet valid"
        return "tls: failed to verify certificate: x509: certificate signed by unknown authority"
    if isinstance(exc, ssl.SSLError):
        return f"remote error: tls: {exc.reason or 'handshake failure'}"
    if isinstance(exc, ConnectionRefusedError):
        return f"dial tcp {target.connect_host}:{target.connect_port}: connect: connection refused"
    if isinstance(exc, ConnectionResetError | http.client.RemoteDisconnected | BrokenPipeError):
        return "EOF"
    if isinstance(exc, socket.gaierror):
        return f"dial tcp: lookup {target.connect_host}: no such host"
    return f"dial tcp {target.connect_host}:{target.connect_port}: {exc.__class__.__name__}"


def post_review(
    webhook: Mapping[str, Any], review: dict[str, Any], *, resolve_service: ServiceResolver | None = None
) -> Any:
    """POST the AdmissionReview to the webhook over verified TLS within timeoutSeconds; the decoded JSON answer."""
    timeout = webhook.get("timeoutSeconds")
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0:
        timeout = DEFAULT_TIMEOUT_SECONDS
    target = _target(webhook, timeout, resolve_service)
    context = _tls_context(webhook)
    body = json.dumps(review, separators=(",", ":")).encode()
    deadline = time.monotonic() + timeout

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    sock: socket.socket | None = None
    try:
        raw = socket.create_connection((target.connect_host, target.connect_port), timeout=remaining())
        raw.settimeout(remaining())
        sock = context.wrap_socket(raw, server_hostname=target.server_name)
        conn = http.client.HTTPConnection(target.connect_host, target.connect_port)
        conn.sock = sock
        conn.putrequest("POST", target.path, skip_host=True, skip_accept_encoding=True)
        for header, value in (
            ("Host", target.host_header),
            ("User-Agent", USER_AGENT),
            ("Content-Type", "application/json"),
            ("Accept", "application/json, */*"),
            ("Accept-Encoding", "gzip"),
            ("Content-Length", str(len(body))),
        ):
            conn.putheader(header, value)
        conn.endheaders(body)
        sock.settimeout(remaining())
        response = conn.getresponse()
        chunks: list[bytes] = []
        size = 0
        while True:
            sock.settimeout(remaining())
            chunk = response.read1(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise _CallError(f'failed to call webhook: Post "{target.url}": response body too large')
            chunks.append(chunk)
        payload = b"".join(chunks)
        status_code = response.status
        encoding = (response.getheader("Content-Encoding") or "").lower()
    except _CallError:
        raise
    except (OSError, http.client.HTTPException) as exc:
        raise _CallError(f'failed to call webhook: Post "{target.url}": {_describe_os_error(exc, target)}') from exc
    finally:
        if sock is not None:
            sock.close()
    if encoding == "gzip":
        try:
            payload = gzip.decompress(payload)
        except (OSError, EOFError) as exc:
            raise _CallError(f'failed to call webhook: Post "{target.url}": gzip: invalid header') from exc
    if not 200 <= status_code < 300:
        raise _CallError(f"failed to call webhook: {_http_error(status_code, payload)}")
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _CallError(f"failed to call webhook: couldn't get version/kind; json parse error: {exc}") from exc


def _http_error(code: int, payload: bytes) -> str:
    """What client-go says about a non-2xx answer."""
    try:
        status = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        status = None
    if isinstance(status, Mapping) and status.get("kind") == "Status" and isinstance(status.get("message"), str):
        return status["message"]
    text = payload[:200].decode("utf-8", "replace").strip()
    if code >= 500 and text:
        return f'an error on the server ("{text}") has prevented the request from succeeding'
    return f"the server responded with the status code {code} but did not return more information"


# --- the plugin ---------------------------------------------------------------------------------------------


def _sorted_webhooks(configurations: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(identity, webhook) in kube's order: configurations by name, webhooks in their order."""
    ordered: list[tuple[str, dict[str, Any]]] = []
    configs = [c for c in configurations if isinstance(c, Mapping)]
    for config in sorted(configs, key=lambda c: str((c.get("metadata") or {}).get("name", ""))):
        config_name = str((config.get("metadata") or {}).get("name", ""))
        for index, webhook in enumerate(config.get("webhooks") or []):
            if isinstance(webhook, Mapping):
                ordered.append((f"{config_name}/{index}", dict(webhook)))
    return ordered


def _call(
    webhook: dict[str, Any],
    attrs: AdmissionAttributes,
    obj: dict[str, Any] | None,
    resolve_service: ServiceResolver | None,
    warnings: list[str] | None,
) -> dict[str, Any] | None:
    """Call one webhook: the patched object (None if unchanged); _CallError or StatusError otherwise."""
    name = str(webhook.get("name", ""))
    if attrs.dry_run:
        side_effects = webhook.get("sideEffects")
        if side_effects is None:
            raise _CallError("Webhook SideEffects is nil")
        if side_effects not in ("None", "NoneOnDryRun"):
            raise bad_request(f"admission webhook {json.dumps(name)} does not support dry run")
    version = review_version(webhook)
    if version is None:
        raise _CallError(
            "could not create admission objects: webhook does not accept known AdmissionReview versions (v1, v1beta1)"
        )
    uid = str(uuid.uuid4())
    answer = post_review(webhook, build_review(attrs, obj, version, uid), resolve_service=resolve_service)
    result = verify_response(answer, version, uid)
    if warnings is not None:
        warnings.extend(result.warnings)
    if not result.allowed:
        raise rejection(name, result.status)
    if not result.patch:
        return None
    if obj is None:
        raise internal(
            f"admission webhook {json.dumps(name)} attempted to modify the object, "
            "which is not supported for this operation"
        )
    patched = _check_identity(name, obj, apply_patch(obj, result.patch), attrs)
    return None if patched == obj else patched


def run_mutating_webhooks(
    configurations: list[dict[str, Any]],
    attrs: AdmissionAttributes,
    *,
    resolve_service: ServiceResolver | None = None,
    warnings: list[str] | None = None,
) -> dict[str, Any] | None:
    """Run every matching MutatingWebhookConfiguration webhook on the request; the (possibly) mutated object.

    Raises StatusError as kube-apiserver answers: the webhook's denial, 500 for a failed call under
    failurePolicy Fail or a patch that does not apply, 400 for a dry run a webhook cannot honour.
    `warnings` (if given) collects the webhooks' warnings, which kube-apiserver returns as Warning headers.
    """
    obj = copy.deepcopy(attrs.obj) if attrs.obj is not None else None
    hooks = _sorted_webhooks(configurations)
    reinvocable_invoked: set[str] = set()  # IfNeeded webhooks called since the last change
    to_reinvoke: set[str] = set()
    should_reinvoke = False

    for round_number in (0, 1):
        if round_number == 1 and not should_reinvoke:
            break
        for identity, webhook in hooks:
            current = dataclasses.replace(attrs, obj=obj)
            if not webhook_matches(webhook, current):
                continue
            # In the reinvocation round only the IfNeeded webhooks that a later change concerns are called again.
            if round_number == 1 and identity not in to_reinvoke:
                continue
            if round_number == 1:
                to_reinvoke.discard(identity)
            ignore_failures = webhook.get("failurePolicy") == "Ignore"
            try:
                patched = _call(webhook, current, obj, resolve_service, warnings)
                error: _CallError | None = None
            except _CallError as exc:
                patched, error = None, exc
            if patched is not None:
                obj = patched
                to_reinvoke |= reinvocable_invoked
                reinvocable_invoked = set()
                should_reinvoke = True
            if webhook.get("reinvocationPolicy") == "IfNeeded":
                reinvocable_invoked.add(identity)
            if error is not None and not ignore_failures:
                name = json.dumps(str(webhook.get("name", "")))
                raise internal(f"failed calling webhook {name}: {error}")
    return obj


__all__ = [
    "AdmissionAttributes",
    "ServiceResolver",
    "apply_patch",
    "build_review",
    "configuration_causes",
    "default_configuration",
    "match_conditions_match",
    "namespace_selector_matches",
    "object_selector_matches",
    "post_review",
    "rejection",
    "review_version",
    "rule_matches",
    "run_mutating_webhooks",
    "verify_response",
    "webhook_matches",
]


# --- MutatingWebhookConfiguration defaulting and validation (admissionregistration.k8s.io/v1) ----------------

_OPERATIONS = ("*", "CONNECT", "CREATE", "DELETE", "UPDATE")
_SCOPES = ("*", "Cluster", "Namespaced")
_SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


def default_configuration(configuration: Mapping[str, Any]) -> dict[str, Any]:
    """A copy with the v1 defaults kube-apiserver stores (and `kubectl get -o yaml` shows)."""
    result = copy.deepcopy(dict(configuration))
    webhooks = result.get("webhooks")
    if not isinstance(webhooks, list):
        return result
    for webhook in webhooks:
        if not isinstance(webhook, dict):
            continue
        webhook.setdefault("failurePolicy", "Fail")
        webhook.setdefault("matchPolicy", "Equivalent")
        webhook.setdefault("namespaceSelector", {})
        webhook.setdefault("objectSelector", {})
        webhook.setdefault("timeoutSeconds", DEFAULT_TIMEOUT_SECONDS)
        webhook.setdefault("reinvocationPolicy", "Never")
        rules = webhook.get("rules")
        for rule in rules if isinstance(rules, list) else []:
            if isinstance(rule, dict):
                rule.setdefault("scope", "*")
        client = webhook.get("clientConfig")
        service = client.get("service") if isinstance(client, dict) else None
        if isinstance(service, dict):
            service.setdefault("port", 443)
    return result


def _unsupported(value: Any, supported: tuple[str, ...]) -> str:
    return f"Unsupported value: {json.dumps(value)}: supported values: " + ", ".join(json.dumps(s) for s in supported)


def _selector_causes(selector: Any, path: str) -> list[tuple[str, str]]:
    if selector is None:
        return []
    if not isinstance(selector, Mapping):
        return [(path, "Invalid value: must be a label selector object")]
    causes: list[tuple[str, str]] = []
    for index, expr in enumerate(selector.get("matchExpressions") or []):
        where = f"{path}.matchExpressions[{index}]"
        if not isinstance(expr, Mapping):
            causes.append((where, "Invalid value: must be an object"))
            continue
        operator, values = expr.get("operator"), expr.get("values") or []
        if operator not in _SELECTOR_OPERATORS:
            causes.append(
                (f"{where}.operator", f"Invalid value: {json.dumps(operator)}: not a valid selector operator")
            )
        elif operator in ("In", "NotIn") and not values:
            causes.append((f"{where}.values", "Required value: must be specified when `operator` is 'In' or 'NotIn'"))
        elif operator in ("Exists", "DoesNotExist") and values:
            causes.append(
                (f"{where}.values", "Forbidden: may not be specified when `operator` is 'Exists' or 'DoesNotExist'")
            )
    return causes


def _client_config_causes(client: Any, path: str) -> list[tuple[str, str]]:
    if not isinstance(client, Mapping) or bool(client.get("url")) == bool(client.get("service")):
        return [(path, "Required value: exactly one of url or service is required")]
    causes: list[tuple[str, str]] = []
    url = client.get("url")
    if url:
        parsed = urllib.parse.urlsplit(str(url))
        if parsed.scheme != "https":
            causes.append((f"{path}.url", f"Invalid value: {json.dumps(url)}: 'https' is the only allowed URL scheme"))
        if not parsed.hostname:
            causes.append((f"{path}.url", f"Invalid value: {json.dumps(url)}: host must be specified"))
        if parsed.query:
            causes.append((f"{path}.url", f"Invalid value: {json.dumps(url)}: query parameters are not allowed"))
        if parsed.fragment:
            causes.append((f"{path}.url", f"Invalid value: {json.dumps(url)}: fragments are not allowed"))
        return causes
    service = client["service"]
    if not isinstance(service, Mapping):
        return [(f"{path}.service", "Invalid value: must be an object")]
    for key in ("name", "namespace"):
        if not service.get(key):
            causes.append((f"{path}.service.{key}", f"Required value: service {key} is required"))
    service_path = service.get("path")
    if service_path is not None and not (isinstance(service_path, str) and service_path.startswith("/")):
        causes.append((f"{path}.service.path", f"Invalid value: {json.dumps(service_path)}: must start with a '/'"))
    port = service.get("port", 443)
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        causes.append(
            (
                f"{path}.service.port",
                f"Invalid value: {json.dumps(port)}: port is not valid: must be between 1 and 65535, inclusive",
            )
        )
    return causes


def _rule_causes(rules: Any, path: str) -> list[tuple[str, str]]:
    if rules is None:
        return []
    if not isinstance(rules, list):
        return [(path, "Invalid value: must be a list")]
    causes: list[tuple[str, str]] = []
    for index, rule in enumerate(rules):
        where = f"{path}[{index}]"
        if not isinstance(rule, Mapping):
            causes.append((where, "Invalid value: must be an object"))
            continue
        for key in ("operations", "apiGroups", "apiVersions", "resources"):
            if not _strings(rule.get(key)):
                causes.append((f"{where}.{key}", "Required value"))
        for operation in _strings(rule.get("operations")):
            if operation not in _OPERATIONS:
                causes.append((f"{where}.operations", _unsupported(operation, _OPERATIONS)))
        scope = rule.get("scope")
        if scope is not None and scope not in _SCOPES:
            causes.append((f"{where}.scope", _unsupported(scope, _SCOPES)))
    return causes


_QUALIFIED_NAME = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def _match_condition_causes(conditions: Any, path: str) -> list[tuple[str, str]]:
    if conditions is None:
        return []
    if not isinstance(conditions, list):
        return [(path, "Invalid value: must be a list")]
    causes: list[tuple[str, str]] = []
    if len(conditions) > MAX_MATCH_CONDITIONS:
        causes.append((path, f"Too many: {len(conditions)}: must have at most {MAX_MATCH_CONDITIONS} items"))
    names: set[str] = set()
    for index, condition in enumerate(conditions):
        where = f"{path}[{index}]"
        if not isinstance(condition, Mapping):
            causes.append((where, "Invalid value: must be an object"))
            continue
        name = condition.get("name")
        if not isinstance(name, str) or not name:
            causes.append((f"{where}.name", "Required value"))
        elif len(name) > 316 or not _QUALIFIED_NAME.match(name):
            causes.append(
                (
                    f"{where}.name",
                    f"Invalid value: {json.dumps(name)}: name part must consist of alphanumeric characters, '-', '_' "
                    "or '.', and must start and end with an alphanumeric character",
                )
            )
        elif name in names:
            causes.append((f"{where}.name", f"Duplicate value: {json.dumps(name)}"))
        else:
            names.add(name)
        expression = condition.get("expression")
        if not isinstance(expression, str) or not expression:
            causes.append((f"{where}.expression", "Required value"))
            continue
        try:
            _compiled(expression)
        except cel.CelError as exc:
            causes.append(
                (f"{where}.expression", f"Invalid value: {json.dumps(expression)}: compilation failed: ERROR: {exc}")
            )
    return causes


def configuration_causes(configuration: Mapping[str, Any]) -> list[tuple[str, str]]:
    """What kube-apiserver's validation would refuse in a v1 MutatingWebhookConfiguration, as (field, message)."""
    webhooks = configuration.get("webhooks") if isinstance(configuration, Mapping) else None
    if webhooks is None:
        return []
    if not isinstance(webhooks, list):
        return [("webhooks", "Invalid value: must be a list")]
    causes: list[tuple[str, str]] = []
    seen: set[str] = set()
    for index, webhook in enumerate(webhooks):
        path = f"webhooks[{index}]"
        if not isinstance(webhook, Mapping):
            causes.append((path, "Invalid value: must be an object"))
            continue
        name = webhook.get("name")
        if not isinstance(name, str) or not name:
            causes.append((f"{path}.name", "Required value"))
        elif name.count(".") < 2:
            causes.append(
                (
                    f"{path}.name",
                    f"Invalid value: {json.dumps(name)}: "
                    "should be a domain with at least three segments separated by dots",
                )
            )
        elif name in seen:
            causes.append((f"{path}.name", f"Duplicate value: {json.dumps(name)}"))
        if isinstance(name, str):
            seen.add(name)
        versions = webhook.get("admissionReviewVersions")
        if not versions:
            causes.append((f"{path}.admissionReviewVersions", "Required value: must specify one of v1, v1beta1"))
        elif review_version(webhook) is None:
            causes.append(
                (
                    f"{path}.admissionReviewVersions",
                    f"Invalid value: {json.dumps(versions)}: must include at least one of v1, v1beta1",
                )
            )
        side_effects = webhook.get("sideEffects")
        if side_effects is None:
            causes.append((f"{path}.sideEffects", "Required value: must specify one of None, NoneOnDryRun"))
        elif side_effects not in ("None", "NoneOnDryRun"):
            causes.append((f"{path}.sideEffects", _unsupported(side_effects, ("None", "NoneOnDryRun"))))
        policy = webhook.get("failurePolicy")
        if policy is not None and policy not in ("Fail", "Ignore"):
            causes.append((f"{path}.failurePolicy", _unsupported(policy, ("Fail", "Ignore"))))
        match_policy = webhook.get("matchPolicy")
        if match_policy is not None and match_policy not in ("Equivalent", "Exact"):
            causes.append((f"{path}.matchPolicy", _unsupported(match_policy, ("Equivalent", "Exact"))))
        reinvocation = webhook.get("reinvocationPolicy")
        if reinvocation is not None and reinvocation not in ("IfNeeded", "Never"):
            causes.append((f"{path}.reinvocationPolicy", _unsupported(reinvocation, ("IfNeeded", "Never"))))
        timeout = webhook.get("timeoutSeconds")
        if timeout is not None and (
            not isinstance(timeout, int) or isinstance(timeout, bool) or not 1 <= timeout <= 30
        ):
            causes.append(
                (
                    f"{path}.timeoutSeconds",
                    f"Invalid value: {json.dumps(timeout)}: the timeout value must be between 1 and 30 seconds",
                )
            )
        causes += _client_config_causes(webhook.get("clientConfig"), f"{path}.clientConfig")
        causes += _rule_causes(webhook.get("rules"), f"{path}.rules")
        causes += _selector_causes(webhook.get("namespaceSelector"), f"{path}.namespaceSelector")
        causes += _selector_causes(webhook.get("objectSelector"), f"{path}.objectSelector")
        causes += _match_condition_causes(webhook.get("matchConditions"), f"{path}.matchConditions")
    return causes
