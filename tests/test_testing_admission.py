"""Mutating admission of the in-memory API server, against a real HTTPS webhook started by the test."""

from __future__ import annotations

import base64
import dataclasses
import json
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubemcsa.client import tls
from kubemcsa_testing import admission
from kubemcsa_testing.admission import AdmissionAttributes, run_mutating_webhooks
from kubemcsa_testing.errors import StatusError
from kubemcsa_testing.rbac import UserInfo

ADMIN = UserInfo("admin", ("system:masters", "system:authenticated"), "admin")
FIXTURE = {
    # The request shape a real kube-apiserver sends (shared/fixtures/admissionreview-v1-pod.json), minus the pod.
    "kind": "AdmissionReview",
    "apiVersion": "admission.k8s.io/v1",
    "request": {
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
        "requestResource": {"group": "", "version": "v1", "resource": "pods"},
        "name": "multicluster-client",
        "namespace": "capture-demo",
        "operation": "CREATE",
        "userInfo": {"username": "admin", "uid": "admin", "groups": ["system:masters", "system:authenticated"]},
        "oldObject": None,
        "dryRun": False,
        "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
    },
}


# --- a throwaway PKI and an HTTPS webhook -------------------------------------------------------------------


Handler = Callable[[dict[str, Any]], Any]  # review -> response review (dict), or (status, bytes)


class Webhook:
    """An HTTPS server whose answer per path is a function of the AdmissionReview it receives."""

    def __init__(self, dns_names: list[str]) -> None:
        self.ca_pem, ca_key_pem = tls.make_ca("webhook-ca")
        cert_pem, key_pem = tls.make_serving_cert(self.ca_pem, ca_key_pem, dns_names, ["127.0.0.1"])
        self.handlers: dict[str, Handler] = {}
        self.calls: list[dict[str, Any]] = []
        self.release = threading.Event()  # ends the handlers that hang, at teardown
        webhook = self

        class RequestHandler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                path, _, query = self.path.partition("?")
                review = json.loads(body)
                webhook.calls.append({"path": path, "query": query, "headers": dict(self.headers), "review": review})
                answer = webhook.handlers[path](review)
                status, payload = answer if isinstance(answer, tuple) else (200, json.dumps(answer).encode())
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass  # the API server gave up (timeout): nothing to answer to

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), RequestHandler)
        self.server.daemon_threads = True
        with tempfile.TemporaryDirectory() as tmp:
            cert_file, key_file = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
            cert_file.write_bytes(cert_pem)
            key_file.write_bytes(key_pem)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert_file, key_file)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def ca_bundle(self) -> str:
        return base64.b64encode(self.ca_pem).decode()

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def hook() -> Iterator[Webhook]:
    server = Webhook(["localhost", "sai-webhook.kube-system.svc"])
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _reset(hook: Webhook) -> None:
    hook.handlers.clear()
    hook.calls.clear()


# --- helpers ------------------------------------------------------------------------------------------------


def pod(labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "p", "namespace": "default"}
    if labels is not None:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"containers": [{"name": "c", "image": "i"}]}}


def pod_attrs(obj: dict[str, Any] | None = None, **changes: Any) -> AdmissionAttributes:
    attrs = AdmissionAttributes(
        obj=obj if obj is not None else pod(),
        old_obj=None,
        operation="CREATE",
        kind={"group": "", "version": "v1", "kind": "Pod"},
        resource={"group": "", "version": "v1", "resource": "pods"},
        sub_resource="",
        namespace="default",
        name="p",
        namespace_labels={"multicluster-service-account": "enabled"},
        user=ADMIN,
        dry_run=False,
    )
    return dataclasses.replace(attrs, **changes)


def webhook_spec(name: str, url: str | None = None, **fields: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "clientConfig": {"url": url} if url else {},
        "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        "timeoutSeconds": 5,
    }
    spec.update(fields)
    return spec


def config(name: str, *webhooks: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": list(webhooks),
    }


def on(hook: Webhook, path: str, **fields: Any) -> dict[str, Any]:
    """A webhook spec that calls `path` on the test server, trusting its CA."""
    spec = webhook_spec(fields.pop("name", path.strip("/") + ".example.com"), hook.url(path), **fields)
    spec["clientConfig"]["caBundle"] = hook.ca_bundle
    return spec


def allow(review: dict[str, Any], patch: list[Any] | None = None, **response: Any) -> dict[str, Any]:
    answer: dict[str, Any] = {"uid": review["request"]["uid"], "allowed": True, **response}
    if patch is not None:
        answer["patchType"] = "JSONPatch"
        answer["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    return {"apiVersion": review["apiVersion"], "kind": "AdmissionReview", "response": answer}


def add_label(key: str, value: str) -> Handler:
    def handler(review: dict[str, Any]) -> dict[str, Any]:
        labels = review["request"]["object"]["metadata"].get("labels")
        if labels is None:
            return allow(review, [{"op": "add", "path": "/metadata/labels", "value": {key: value}}])
        if labels.get(key) == value:
            return allow(review)
        return allow(review, [{"op": "add", "path": f"/metadata/labels/{key}", "value": value}])

    return handler


def run(configs: list[dict[str, Any]], attrs: AdmissionAttributes | None = None, **kw: Any) -> dict[str, Any] | None:
    return run_mutating_webhooks(configs, attrs or pod_attrs(), **kw)


def status_of(call: Callable[[], Any]) -> dict[str, Any]:
    with pytest.raises(StatusError) as caught:
        call()
    return caught.value.to_status()


# --- calling over HTTPS -------------------------------------------------------------------------------------


def test_patch_is_applied_and_the_request_is_kube_s(hook: Webhook) -> None:
    hook.handlers["/mutate"] = add_label("captured", "yes")
    result = run([config("c", on(hook, "/mutate"))])
    assert result is not None and result["metadata"]["labels"] == {"captured": "yes"}
    (call,) = hook.calls
    assert call["query"] == "timeout=5s"
    assert call["headers"]["User-Agent"] == "kube-apiserver-admission"
    assert call["headers"]["Content-Type"] == "application/json"
    assert call["headers"]["Accept"] == "application/json, */*"
    assert call["headers"]["Accept-Encoding"] == "gzip"
    review = call["review"]
    assert review["apiVersion"] == "admission.k8s.io/v1" and review["kind"] == "AdmissionReview"
    request = review["request"]
    assert request["object"] == pod()
    assert set(request) == set(FIXTURE["request"]) | {"uid", "object"}
    for key in ("kind", "resource", "requestKind", "requestResource", "operation", "userInfo", "oldObject", "dryRun"):
        assert request[key] == FIXTURE["request"][key], key


def test_the_callers_object_is_not_modified(hook: Webhook) -> None:
    hook.handlers["/mutate"] = add_label("a", "b")
    original = pod()
    run([config("c", on(hook, "/mutate"))], pod_attrs(original))
    assert original == pod()


def test_no_matching_webhook_returns_the_object_unchanged_without_calls(hook: Webhook) -> None:
    spec = on(
        hook,
        "/mutate",
        rules=[{"operations": ["UPDATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
    )
    assert run([config("c", spec)]) == pod()
    assert hook.calls == []


def test_denial_carries_the_webhook_message_and_code(hook: Webhook) -> None:
    hook.handlers["/deny"] = lambda r: {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": r["request"]["uid"], "allowed": False, "status": {"code": 403, "message": "no pods today"}},
    }
    status = status_of(lambda: run([config("c", on(hook, "/deny", name="deny.example.com"))]))
    assert status["code"] == 403
    assert status["message"] == 'admission webhook "deny.example.com" denied the request: no pods today'


def test_denial_without_status_is_a_400_without_explanation(hook: Webhook) -> None:
    hook.handlers["/deny"] = lambda r: {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": r["request"]["uid"], "allowed": False},
    }
    status = status_of(lambda: run([config("c", on(hook, "/deny", name="d.example.com"))]))
    assert status["code"] == 400
    assert status["message"] == 'admission webhook "d.example.com" denied the request without explanation'


def test_patch_that_does_not_apply_is_kube_s_internal_error(hook: Webhook) -> None:
    hook.handlers["/bad-patch"] = lambda r: allow(
        r, [{"op": "add", "path": "/metadata/labels/captured", "value": "yes"}]
    )
    status = status_of(lambda: run([config("c", on(hook, "/bad-patch", failurePolicy="Ignore"))]))
    assert status["code"] == 500 and status["reason"] == "InternalError"
    assert status["message"] == (
        'Internal error occurred: add operation does not apply: doc is missing path: "/metadata/labels/captured": '
        "missing value"
    )


def test_timeout_fails_the_request_under_fail_and_is_skipped_under_ignore(hook: Webhook) -> None:
    hook.handlers["/slow"] = lambda r: (hook.release.wait(3), allow(r))[1]
    spec = on(hook, "/slow", name="slow.example.com", timeoutSeconds=1)
    status = status_of(lambda: run([config("c", spec)]))
    assert status["code"] == 500
    assert status["message"].startswith(
        'Internal error occurred: failed calling webhook "slow.example.com": failed to call'
    )
    assert status["message"].endswith(f'Post "{hook.url("/slow")}?timeout=1s": context deadline exceeded')
    assert run([config("c", {**spec, "failurePolicy": "Ignore"})]) == pod()


def test_bad_responses_are_call_failures(hook: Webhook) -> None:
    cases: dict[str, tuple[Handler, str]] = {
        "/not-json": (lambda r: (200, b"hello"), "failed to call webhook: couldn't get version/kind; json parse error"),
        "/wrong-uid": (
            lambda r: {**allow(r), "response": {"uid": "other", "allowed": True}},
            'received invalid webhook response: expected response.uid="',
        ),
        "/wrong-version": (
            lambda r: {**allow(r), "apiVersion": "admission.k8s.io/v1beta1"},
            "received invalid webhook response: expected webhook response of admission.k8s.io/v1, "
            "Kind=AdmissionReview, got admission.k8s.io/v1beta1, Kind=AdmissionReview",
        ),
        "/wrong-kind": (
            lambda r: {**allow(r), "kind": "Pod"},
            "expected webhook response of admission.k8s.io/v1, Kind=AdmissionReview, got admission.k8s.io/v1, Kind=Pod",
        ),
        "/no-response": (
            lambda r: {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"},
            "webhook response was absent",
        ),
        "/patch-without-type": (
            lambda r: {**allow(r), "response": {**allow(r)["response"], "patch": "W10="}},
            "webhook returned response.patch but not response.patchType",
        ),
        "/undecodable-patch": (
            lambda r: {**allow(r), "response": {**allow(r)["response"], "patchType": "JSONPatch", "patch": "bm9wZQ=="}},
            "received undecodable patch in webhook response",
        ),
        "/http-500": (
            lambda r: (500, b"boom"),
            'an error on the server ("boom") has prevented the request from succeeding',
        ),
    }
    for path, (handler, expected) in cases.items():
        hook.handlers[path] = handler
        name = path.strip("/") + ".example.com"
        status = status_of(lambda p=path, n=name: run([config("c", on(hook, p, name=n))]))
        assert status["code"] == 500, path
        assert status["message"].startswith(f'Internal error occurred: failed calling webhook "{name}": '), path
        assert expected in status["message"], (path, status["message"])
        assert run([config("c", on(hook, path, name=name, failurePolicy="Ignore"))]) == pod(), path


def test_tls_is_verified_against_the_ca_bundle_and_the_host(hook: Webhook) -> None:
    hook.handlers["/mutate"] = add_label("a", "b")
    other_ca_pem, _ = tls.make_ca("someone-else")
    wrong_ca = on(hook, "/mutate", name="w.example.com")
    wrong_ca["clientConfig"]["caBundle"] = base64.b64encode(other_ca_pem).decode()
    status = status_of(lambda: run([config("c", wrong_ca)]))
    assert "x509: certificate signed by unknown authority" in status["message"]
    no_bundle = on(hook, "/mutate", name="n.example.com")
    del no_bundle["clientConfig"]["caBundle"]
    assert (
        "x509: certificate signed by unknown authority" in status_of(lambda: run([config("c", no_bundle)]))["message"]
    )
    wrong_host = on(hook, "/mutate", name="h.example.com")
    wrong_host["clientConfig"]["url"] = f"https://127.0.0.2:{hook.port}/mutate"
    message = status_of(lambda: run([config("c", wrong_host)]))["message"]
    assert "failed to call webhook" in message
    assert hook.calls == []
    by_name = on(hook, "/mutate", name="l.example.com")
    by_name["clientConfig"]["url"] = f"https://localhost:{hook.port}/mutate"
    assert run([config("c", by_name)])["metadata"]["labels"] == {"a": "b"}


def test_service_is_resolved_and_verified_under_its_service_name(hook: Webhook) -> None:
    hook.handlers["/inject"] = add_label("via", "service")
    spec = webhook_spec("svc.example.com")
    spec["clientConfig"] = {
        "service": {"namespace": "kube-system", "name": "sai-webhook", "path": "/inject", "port": 8443},
        "caBundle": hook.ca_bundle,
    }
    asked: list[tuple[str, str, int]] = []

    def resolve(namespace: str, name: str, port: int) -> str | None:
        asked.append((namespace, name, port))
        return f"https://127.0.0.1:{hook.port}"

    result = run([config("c", spec)], resolve_service=resolve)
    assert result["metadata"]["labels"] == {"via": "service"}
    assert asked == [("kube-system", "sai-webhook", 8443)]
    assert hook.calls[0]["headers"]["Host"] == "sai-webhook.kube-system.svc:8443"
    missing = status_of(lambda: run([config("c", spec)], resolve_service=lambda *a: None))
    assert missing["message"].endswith(
        'Post "https://sai-webhook.kube-system.svc:8443/inject?timeout=5s": service "sai-webhook" not found'
    )
    # A certificate without the service's DNS name is refused even though the address is right.
    other = {
        **spec,
        "clientConfig": {**spec["clientConfig"], "service": {**spec["clientConfig"]["service"], "name": "x"}},
    }
    refused = status_of(lambda: run([config("c", other)], resolve_service=lambda *a: f"127.0.0.1:{hook.port}"))
    assert "tls: failed to verify certificate" in refused["message"]


def test_connection_refused_is_a_call_failure() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spec = webhook_spec("gone.example.com", f"https://127.0.0.1:{port}/x")
    status = status_of(lambda: run([config("c", spec)]))
    assert f"dial tcp 127.0.0.1:{port}: connect: connection refused" in status["message"]
    assert run([config("c", {**spec, "failurePolicy": "Ignore"})]) == pod()


def test_dry_run_skips_nothing_but_refuses_webhooks_with_side_effects(hook: Webhook) -> None:
    hook.handlers["/mutate"] = add_label("a", "b")
    dry = pod_attrs(dry_run=True)
    result = run([config("c", on(hook, "/mutate", sideEffects="NoneOnDryRun"))], dry)
    assert result["metadata"]["labels"] == {"a": "b"} and hook.calls[0]["review"]["request"]["dryRun"] is True
    status = status_of(lambda: run([config("c", on(hook, "/mutate", name="s.example.com", sideEffects="Some"))], dry))
    assert status["code"] == 400
    assert status["message"] == 'admission webhook "s.example.com" does not support dry run'
    no_side_effects = on(hook, "/mutate", name="u.example.com")
    del no_side_effects["sideEffects"]
    assert "Webhook SideEffects is nil" in status_of(lambda: run([config("c", no_side_effects)], dry))["message"]


def test_webhooks_run_in_configuration_name_order_and_see_earlier_patches(hook: Webhook) -> None:
    seen: list[tuple[str, dict[str, str]]] = []

    def recorder(label: str) -> Handler:
        def handler(review: dict[str, Any]) -> dict[str, Any]:
            seen.append((label, dict(review["request"]["object"]["metadata"].get("labels") or {})))
            return add_label(label, "1")(review)

        return handler

    hook.handlers["/a"] = recorder("a")
    hook.handlers["/b"] = recorder("b")
    hook.handlers["/c"] = recorder("c")
    configs = [config("zz", on(hook, "/a")), config("aa", on(hook, "/b"), on(hook, "/c"))]
    result = run(configs, pod_attrs(pod(labels={})))
    assert [label for label, _ in seen] == ["b", "c", "a"]
    assert seen[1][1] == {"b": "1"} and seen[2][1] == {"b": "1", "c": "1"}
    assert result["metadata"]["labels"] == {"a": "1", "b": "1", "c": "1"}


def test_if_needed_webhooks_are_reinvoked_once_after_a_later_change(hook: Webhook) -> None:
    hook.handlers["/first"] = add_label("first", "1")
    hook.handlers["/second"] = add_label("second", "1")
    hook.handlers["/quiet"] = lambda r: allow(r)
    configs = [
        config("1", on(hook, "/first", reinvocationPolicy="IfNeeded")),
        config("2", on(hook, "/quiet", reinvocationPolicy="IfNeeded")),
        config("3", on(hook, "/second")),
    ]
    result = run(configs, pod_attrs(pod(labels={})))
    assert [c["path"] for c in hook.calls] == ["/first", "/quiet", "/second", "/first", "/quiet"]
    assert result["metadata"]["labels"] == {"first": "1", "second": "1"}
    hook.calls.clear()
    never = [config("1", on(hook, "/first")), config("2", on(hook, "/quiet")), config("3", on(hook, "/second"))]
    run(never, pod_attrs(pod(labels={})))
    assert [c["path"] for c in hook.calls] == ["/first", "/quiet", "/second"]


def test_a_patch_may_not_move_the_object(hook: Webhook) -> None:
    hook.handlers["/move"] = lambda r: allow(
        r, [{"op": "replace", "path": "/metadata/namespace", "value": "kube-system"}]
    )
    status = status_of(lambda: run([config("c", on(hook, "/move"))]))
    assert status["code"] == 400 and "namespace of the provided object does not match" in status["message"]
    hook.handlers["/rename"] = lambda r: allow(r, [{"op": "replace", "path": "/metadata/name", "value": "q"}])
    assert status_of(lambda: run([config("c", on(hook, "/rename"))]))["code"] == 400


def test_v1beta1_is_used_when_it_is_the_only_version_the_webhook_speaks(hook: Webhook) -> None:
    hook.handlers["/old"] = lambda r: {"response": {"allowed": True}}  # v1beta1 answers were never checked
    assert run([config("c", on(hook, "/old", admissionReviewVersions=["v1beta1"]))]) == pod()
    assert hook.calls[0]["review"]["apiVersion"] == "admission.k8s.io/v1beta1"
    message = status_of(lambda: run([config("c", on(hook, "/old", admissionReviewVersions=["v2"]))]))["message"]
    assert "webhook does not accept known AdmissionReview versions (v1, v1beta1)" in message


def test_warnings_are_collected(hook: Webhook) -> None:
    hook.handlers["/warn"] = lambda r: allow(r, warnings=["deprecated field"])
    warnings: list[str] = []
    run([config("c", on(hook, "/warn"))], warnings=warnings)
    assert warnings == ["deprecated field"]


# --- matching (pure) ----------------------------------------------------------------------------------------


def matches(webhook: dict[str, Any], attrs: AdmissionAttributes) -> bool:
    return admission.webhook_matches(webhook, attrs)


def rule(**fields: Any) -> dict[str, Any]:
    base = {"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}
    return {**base, **fields}


def test_rules_match_operations_groups_versions_resources() -> None:
    attrs = pod_attrs()
    assert matches(webhook_spec("w", rules=[rule()]), attrs)
    assert matches(webhook_spec("w", rules=[rule(operations=["*"])]), attrs)
    assert not matches(webhook_spec("w", rules=[rule(operations=["UPDATE"])]), attrs)
    assert not matches(webhook_spec("w", rules=[rule(apiGroups=["apps"])]), attrs)
    assert matches(webhook_spec("w", rules=[rule(apiGroups=["*"], apiVersions=["*"], resources=["*"])]), attrs)
    assert not matches(webhook_spec("w", rules=[rule(apiVersions=["v2"])]), attrs)
    assert not matches(webhook_spec("w", rules=[]), attrs)


def test_resources_with_subresources() -> None:
    status = pod_attrs(sub_resource="status", operation="UPDATE")
    assert not matches(webhook_spec("w", rules=[rule(operations=["*"])]), status)
    assert not matches(webhook_spec("w", rules=[rule(operations=["*"], resources=["*"])]), status)
    assert matches(webhook_spec("w", rules=[rule(operations=["*"], resources=["pods/*"])]), status)
    assert matches(webhook_spec("w", rules=[rule(operations=["*"], resources=["pods/status"])]), status)
    assert matches(webhook_spec("w", rules=[rule(operations=["*"], resources=["*/status"])]), status)
    assert matches(webhook_spec("w", rules=[rule(operations=["*"], resources=["*/*"])]), status)
    assert matches(webhook_spec("w", rules=[rule(operations=["*"], resources=["*/*"])]), pod_attrs())
    assert not matches(webhook_spec("w", rules=[rule(resources=["pods/status"])]), pod_attrs())


def test_scope() -> None:
    namespaced = pod_attrs()
    node = pod_attrs(resource={"group": "", "version": "v1", "resource": "nodes"}, namespace="", namespace_labels=None)
    ns = pod_attrs(resource={"group": "", "version": "v1", "resource": "namespaces"}, namespace="default")
    for attrs, scope, expected in [
        (namespaced, "Namespaced", True),
        (namespaced, "Cluster", False),
        (node, "Cluster", True),
        (node, "Namespaced", False),
        (ns, "Cluster", True),
        (ns, "Namespaced", False),
        (namespaced, "*", True),
    ]:
        spec = webhook_spec("w", rules=[rule(resources=["*"], scope=scope)])
        assert matches(spec, attrs) is expected, (attrs.resource, scope)


def test_namespace_selector() -> None:
    enabled = {"namespaceSelector": {"matchLabels": {"multicluster-service-account": "enabled"}}}
    assert matches(webhook_spec("w", **enabled), pod_attrs())
    assert not matches(webhook_spec("w", **enabled), pod_attrs(namespace_labels={}))
    exprs = {"namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["prod"]}]}}
    assert matches(webhook_spec("w", **exprs), pod_attrs(namespace_labels={}))
    assert not matches(webhook_spec("w", **exprs), pod_attrs(namespace_labels={"env": "prod"}))
    # Cluster-scoped objects other than namespaces are never exempted by a namespaceSelector.
    node = pod_attrs(resource={"group": "", "version": "v1", "resource": "nodes"}, namespace="", namespace_labels=None)
    assert matches(webhook_spec("w", rules=[rule(resources=["nodes"])], **enabled), node)
    # A namespace being created is matched on its own labels.
    ns_obj = {"metadata": {"name": "new", "labels": {"multicluster-service-account": "enabled"}}}
    ns = pod_attrs(
        obj=ns_obj,
        resource={"group": "", "version": "v1", "resource": "namespaces"},
        namespace="new",
        namespace_labels=None,
    )
    assert matches(webhook_spec("w", rules=[rule(resources=["namespaces"])], **enabled), ns)
    # An unknown namespace cannot be matched: kube answers 500.
    status = status_of(lambda: matches(webhook_spec("w", **enabled), pod_attrs(namespace_labels=None)))
    assert status["code"] == 500 and 'namespaces "default" not found' in status["message"]
    bad = {"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}
    assert status_of(lambda: matches(webhook_spec("w", **bad), pod_attrs()))["code"] == 500


def test_object_selector_matches_the_new_or_the_old_object() -> None:
    selector = {"objectSelector": {"matchLabels": {"inject": "true"}}}
    assert matches(webhook_spec("w", **selector), pod_attrs(pod(labels={"inject": "true"})))
    assert not matches(webhook_spec("w", **selector), pod_attrs(pod()))
    update = pod_attrs(pod(), old_obj=pod(labels={"inject": "true"}), operation="UPDATE")
    assert matches(webhook_spec("w", rules=[rule(operations=["UPDATE"])], **selector), update)


def test_apply_patch_words_failures_as_evanphx_json_patch() -> None:
    obj = pod()
    assert admission.apply_patch(obj, [{"op": "add", "path": "/metadata/labels", "value": {"a": "b"}}])["metadata"][
        "labels"
    ] == {"a": "b"}
    cases = [
        (
            {"op": "remove", "path": "/metadata/labels/x"},
            'remove operation does not apply: doc is missing path: "/metadata/labels/x"',
        ),
        (
            {"op": "replace", "path": "/spec/volumes", "value": []},
            'replace operation does not apply: doc is missing path: "/spec/volumes"',
        ),
        (
            {"op": "move", "from": "/nope", "path": "/x"},
            'move operation does not apply: doc is missing from path: "/nope"',
        ),
        ({"op": "test", "path": "/kind", "value": "Service"}, "testing value /kind failed: test failed"),
    ]
    for op, expected in cases:
        status = status_of(lambda o=op: admission.apply_patch(obj, [o]))
        assert status["code"] == 500 and expected in status["message"], status["message"]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "op": st.sampled_from(["add", "remove", "replace", "move", "copy", "test", "bogus"]),
                "path": st.text(max_size=12),
            },
            optional={"value": st.integers() | st.text(max_size=3), "from": st.text(max_size=8)},
        ),
        max_size=4,
    )
)
def test_garbage_patches_never_crash(patch: list[dict[str, Any]]) -> None:
    try:
        result = admission.apply_patch(pod(), patch)
    except StatusError as exc:
        assert exc.code == 500
    else:
        assert isinstance(result, dict)


@settings(max_examples=150, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda c: (
            st.lists(c, max_size=3)
            | st.dictionaries(
                st.sampled_from(["response", "uid", "allowed", "patch", "patchType", "status", "apiVersion", "kind"]),
                c,
                max_size=4,
            )
        ),
        max_leaves=10,
    )
)
def test_garbage_responses_are_call_errors_never_crashes(answer: Any) -> None:
    try:
        admission.verify_response(answer, "v1", "u")
    except admission._CallError:
        pass


@given(
    st.dictionaries(
        st.sampled_from(["rules", "namespaceSelector", "objectSelector", "clientConfig"]),
        st.none() | st.integers() | st.text(max_size=3) | st.lists(st.none(), max_size=2),
    )
)
def test_garbage_webhook_specs_never_crash_matching(spec: dict[str, Any]) -> None:
    try:
        matches(spec, pod_attrs())
    except StatusError as exc:
        assert exc.code == 500


# --- configuration defaulting and validation ----------------------------------------------------------------


def test_defaults_are_kube_s_v1_defaults() -> None:
    spec = webhook_spec("a.example.com")
    del spec["timeoutSeconds"]
    spec["clientConfig"] = {"service": {"namespace": "ns", "name": "svc"}}
    defaulted = admission.default_configuration(config("c", spec))["webhooks"][0]
    assert defaulted["failurePolicy"] == "Fail" and defaulted["matchPolicy"] == "Equivalent"
    assert defaulted["namespaceSelector"] == {} and defaulted["objectSelector"] == {}
    assert defaulted["timeoutSeconds"] == 10 and defaulted["reinvocationPolicy"] == "Never"
    assert defaulted["rules"][0]["scope"] == "*"
    assert defaulted["clientConfig"]["service"]["port"] == 443
    assert "sideEffects" in defaulted and spec["clientConfig"]["service"] == {"namespace": "ns", "name": "svc"}


def test_a_valid_configuration_has_no_causes() -> None:
    assert admission.configuration_causes(config("c", webhook_spec("a.example.com", "https://h/x"))) == []


def test_the_project_s_own_webhook_configuration_is_valid() -> None:
    import yaml

    path = Path(__file__).resolve().parent.parent / "manifests" / "webhook" / "mutatingwebhookconfiguration.yaml"
    documents = [
        d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "MutatingWebhookConfiguration"
    ]
    assert documents
    for document in documents:
        assert admission.configuration_causes(document) == []


def test_invalid_configurations_are_described_as_kube_does() -> None:
    spec = webhook_spec("short", "http://h/x?q=1", sideEffects="Some", timeoutSeconds=31, failurePolicy="Maybe")
    spec["admissionReviewVersions"] = ["v2"]
    spec["rules"] = [
        {"operations": ["CREATE", "PATCH"], "apiGroups": [""], "apiVersions": ["v1"], "resources": [], "scope": "Pods"}
    ]
    spec["namespaceSelector"] = {"matchExpressions": [{"key": "a", "operator": "Near"}]}
    causes = dict(admission.configuration_causes(config("c", spec, webhook_spec("b.example.com"))))
    assert (
        causes["webhooks[0].name"]
        == 'Invalid value: "short": should be a domain with at least three segments separated by dots'
    )
    assert causes["webhooks[0].sideEffects"] == 'Unsupported value: "Some": supported values: "None", "NoneOnDryRun"'
    assert (
        causes["webhooks[0].timeoutSeconds"] == "Invalid value: 31: the timeout value must be between 1 and 30 seconds"
    )
    assert causes["webhooks[0].failurePolicy"].startswith('Unsupported value: "Maybe"')
    assert "must include at least one of v1, v1beta1" in causes["webhooks[0].admissionReviewVersions"]
    assert causes["webhooks[0].clientConfig.url"].endswith("query parameters are not allowed")
    assert causes["webhooks[0].rules[0].resources"] == "Required value"
    assert causes["webhooks[0].rules[0].operations"].startswith('Unsupported value: "PATCH"')
    assert causes["webhooks[0].rules[0].scope"].startswith('Unsupported value: "Pods"')
    assert causes["webhooks[0].namespaceSelector.matchExpressions[0].operator"].endswith(
        "not a valid selector operator"
    )
    assert causes["webhooks[1].clientConfig"] == "Required value: exactly one of url or service is required"
    no_side_effects = webhook_spec("c.example.com", "https://h/x")
    del no_side_effects["sideEffects"]
    del no_side_effects["admissionReviewVersions"]
    causes = dict(admission.configuration_causes(config("c", no_side_effects, no_side_effects)))
    assert causes["webhooks[0].sideEffects"] == "Required value: must specify one of None, NoneOnDryRun"
    assert causes["webhooks[0].admissionReviewVersions"] == "Required value: must specify one of v1, v1beta1"
    assert causes["webhooks[1].name"] == 'Duplicate value: "c.example.com"'


@given(
    st.recursive(
        st.none() | st.integers() | st.text(max_size=4),
        lambda c: (
            st.lists(c, max_size=3)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "webhooks",
                        "name",
                        "clientConfig",
                        "rules",
                        "url",
                        "service",
                        "sideEffects",
                        "namespaceSelector",
                        "matchExpressions",
                        "operator",
                    ]
                ),
                c,
                max_size=4,
            )
        ),
        max_leaves=12,
    )
)
def test_garbage_configurations_never_crash_validation_or_defaulting(value: Any) -> None:
    if isinstance(value, dict):
        admission.configuration_causes(value)
        admission.default_configuration(value)


# --- matchConditions ----------------------------------------------------------------------------------------

HAS_ANNOTATION = "has(object.metadata.annotations) && 'x.io/ask' in object.metadata.annotations"


def annotated(annotations: dict[str, str] | None) -> dict[str, Any]:
    obj = pod()
    if annotations is not None:
        obj["metadata"]["annotations"] = annotations
    return obj


def labels_after(spec: dict[str, Any], attrs: AdmissionAttributes) -> Any:
    mutated = run([config("c", spec)], attrs)
    return (mutated or {}).get("metadata", {}).get("labels")


def test_match_conditions_decide_whether_the_webhook_is_called(hook: Webhook) -> None:
    hook.handlers["/m"] = add_label("called", "yes")
    spec = on(hook, "/m", matchConditions=[{"name": "asks", "expression": HAS_ANNOTATION}])
    assert labels_after(spec, pod_attrs(annotated(None))) is None
    assert labels_after(spec, pod_attrs(annotated({"other": "x"}))) is None
    assert hook.calls == []
    assert labels_after(spec, pod_attrs(annotated({"x.io/ask": "a"}))) == {"called": "yes"}
    assert len(hook.calls) == 1


def test_all_match_conditions_must_hold_and_request_is_available(hook: Webhook) -> None:
    hook.handlers["/m"] = add_label("called", "yes")
    conditions = [
        {"name": "asks", "expression": HAS_ANNOTATION},
        {"name": "not-admin", "expression": "request.userInfo.username != 'admin'"},
    ]
    spec = on(hook, "/m", matchConditions=conditions)
    assert labels_after(spec, pod_attrs(annotated({"x.io/ask": "a"}))) is None
    other = dataclasses.replace(pod_attrs(annotated({"x.io/ask": "a"})), user=UserInfo("bob", ("g",)))
    assert labels_after(spec, other) == {"called": "yes"}


def test_a_match_condition_that_errs_fails_closed_or_skips_under_ignore(hook: Webhook) -> None:
    hook.handlers["/m"] = add_label("called", "yes")
    failing = [{"name": "bad", "expression": "object.metadata.annotations['x.io/ask'] == 'a'"}]
    spec = on(hook, "/m", matchConditions=failing)
    status = status_of(lambda: run([config("c", spec)], pod_attrs(annotated(None))))
    assert status["code"] == 403 and status["reason"] == "Forbidden"
    assert status["message"] == (
        "pods \"p\" is forbidden: expression 'object.metadata.annotations['x.io/ask'] == 'a'' resulted in error: "
        "no such key: annotations"
    )
    ignored = on(hook, "/m", matchConditions=failing, failurePolicy="Ignore")
    assert labels_after(ignored, pod_attrs(annotated(None))) is None
    # A false condition wins over an error in another: the webhook is skipped, nothing fails.
    mixed = on(hook, "/m", matchConditions=[*failing, {"name": "no", "expression": "false"}])
    assert labels_after(mixed, pod_attrs(annotated(None))) is None
    assert hook.calls == []


@pytest.mark.parametrize(
    ("conditions", "cause"),
    [
        ([{"name": "a", "expression": "nope(object)"}], "matchConditions[0].expression: Invalid value"),
        ([{"name": "a", "expression": "authorizer.group('').check()"}], "compilation failed"),
        ([{"name": "a", "expression": "object.x ="}], "compilation failed"),
        ([{"name": "a"}], "matchConditions[0].expression: Required value"),
        ([{"expression": "true"}], "matchConditions[0].name: Required value"),
        ([{"name": "a", "expression": "true"}, {"name": "a", "expression": "true"}], "Duplicate value"),
        ([{"name": "-a", "expression": "true"}], "matchConditions[0].name: Invalid value"),
        ([{"name": f"c{i}", "expression": "true"} for i in range(65)], "Too many: 65"),
    ],
)
def test_match_conditions_are_validated_and_unsupported_cel_fails_loudly(
    conditions: list[dict[str, Any]], cause: str
) -> None:
    spec = webhook_spec("w.example.com", "https://127.0.0.1:1/", matchConditions=conditions)
    causes = admission.configuration_causes(config("c", spec))
    assert any(cause in f"{field}: {message}" for field, message in causes), causes


def test_the_manifests_condition_is_valid() -> None:
    import yaml

    manifest = Path(__file__).parent.parent / "manifests" / "webhook" / "mutatingwebhookconfiguration.yaml"
    assert admission.configuration_causes(yaml.safe_load(manifest.read_text())) == []
