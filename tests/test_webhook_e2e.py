"""The webhook end to end: the API server calls it over verified TLS through the real manifests.

The webhook runs with a token of its own ServiceAccount, bound to manifests/webhook/rbac.yaml (so that RBAC is
proven enough), its certificate is set up by kubemcsa.certificates.manager as at startup, and the
MutatingWebhookConfiguration is
the one of the manifests (matchConditions included), its Service registered with the API server. Pods are created
with the official client, and the stored pods are checked. Tests marked real_tier also run against a real
kube-apiserver (KUBEBUILDER_ASSETS), which reaches the webhook through the manifests' Service.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from kubemcsa.certificates import manager
from kubemcsa.client import kube, tls
from kubemcsa.contract import api
from kubemcsa_testing import ApiServer
from kubemcsa_testing.objects import create_or_get
from kubemcsa_testing.pytest_plugin import REAL, fresh_real_clusters
from kubemcsa_testing.wait import wait_for
from webhook.app import MUTATE_PATH
from webhook.cache import WatchCache
from webhook.cli import CERT_SECRET_NAME, SERVICE_NAME, WEBHOOK_CONFIGURATION_NAME
from webhook.lookups import MISS_IMPORT
from webhook.mutation import LookupFailed
from webhook.server import WebhookServer

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
SYSTEM_NS = api.SYSTEM_NAMESPACE
WEBHOOK_SA = SERVICE_NAME
ENABLED = {api.NAMESPACE_LABEL: api.NAMESPACE_LABEL_VALUE}
WAIT = 20.0
WEBHOOK_USER = f"system:serviceaccount:{SYSTEM_NS}:{WEBHOOK_SA}"


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def create(client: ApiClient, obj: dict[str, Any]) -> dict[str, Any]:
    return kube.Resource(client, kube.resource_type_of(obj)).create(obj, obj["metadata"].get("namespace"))


@dataclass
class Env:
    server: Any  # an in-memory ApiServer or a real ControlPlane
    admin: ApiClient
    webhook: WebhookServer
    webhook_client: ApiClient
    ca_pem: bytes
    counter: int = 0

    def namespace(self, labels: dict[str, str] | None = None) -> str:
        self.counter += 1
        name = f"apps-{self.counter}"
        create(self.admin, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
        return name

    def add_import(self, namespace: str, name: str) -> None:
        body = {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterName": "cluster2", "namespace": "default", "name": "pod-lister"},
        }
        create(self.admin, body)

    def create_pod(self, namespace: str, annotation: str | None, **spec: Any) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": f"pod-{self.counter}-{time.monotonic_ns()}", "namespace": namespace}
        if annotation is not None:
            metadata["annotations"] = {api.IMPORT_ANNOTATION: annotation}
        spec.setdefault("containers", [{"name": "main", "image": "busybox"}])
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}
        created = kube.Resource(self.admin, kube.PODS).create(pod, namespace)
        # What is stored, not only what the create answered.
        return kube.Resource(self.admin, kube.PODS).get(created["metadata"]["name"], namespace)


@pytest.fixture(scope="module")
def env(tier: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if tier == REAL:
        server: Any = fresh_real_clusters(request)[0]
        stop = lambda: None  # noqa: E731 - the session's control plane outlives the module
    else:
        server = ApiServer(name="webhook-e2e").start()
        stop = server.stop
    admin = server.admin_client()
    try:
        for doc in documents(MANIFESTS / "crd" / "serviceaccountimports.yaml"):
            create_or_get(admin, doc)  # a real cluster has it installed already
        for namespace in (SYSTEM_NS, api.CERT_NAMESPACE):
            create(admin, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        # The Service too: a real API server resolves it to its cluster IP before dialing.
        for name in ("serviceaccount.yaml", "rbac.yaml", "service.yaml", "mutatingwebhookconfiguration.yaml"):
            for doc in documents(MANIFESTS / "webhook" / name):
                create(admin, doc)
        webhook_client = server.client_for_token(server.issue_token(SYSTEM_NS, WEBHOOK_SA, expiration_seconds=3600))
        # What `kubemcsa-webhook --manage-certificates` does before serving.
        bundle = manager.ensure_webhook_certificates(
            webhook_client,
            namespace=SYSTEM_NS,
            secret_name=CERT_SECRET_NAME,
            secret_namespace=api.CERT_NAMESPACE,
            service_name=SERVICE_NAME,
            webhook_configuration_name=WEBHOOK_CONFIGURATION_NAME,
        )
        cert_file, key_file = manager.write_files(bundle, tmp_path_factory.mktemp("tls"))
        webhook = WebhookServer(webhook_client, cert_file, key_file).start()
        server.register_service(SYSTEM_NS, SERVICE_NAME, 443, webhook.url)
        assert webhook.cache.wait_for_sync(WAIT)
    except BaseException:
        stop()
        raise
    yield Env(server, admin, webhook, webhook_client, bundle.ca_pem)
    webhook.stop()
    stop()


def mounts_of(container: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in container.get("volumeMounts") or [] if m["mountPath"].startswith(api.MOUNT_ROOT)]


def expected_mount(name: str) -> dict[str, Any]:
    return {"name": api.volume_name_for_import(name), "mountPath": api.mount_path_for_import(name), "readOnly": True}


def import_volumes(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in pod["spec"].get("volumes") or [] if "secret" in v]


@pytest.mark.real_tier
def test_annotated_pod_in_enabled_namespace_gets_volumes_and_mounts(env: Env) -> None:
    ns = env.namespace(ENABLED)
    env.add_import(ns, "cluster2-default-pod-lister")
    pod = env.create_pod(
        ns,
        "cluster2-default-pod-lister",
        containers=[{"name": "main", "image": "busybox"}, {"name": "sidecar", "image": "nginx"}],
        initContainers=[{"name": "init", "image": "busybox"}],
    )
    assert import_volumes(pod) == [
        {
            "name": "sai-cluster2-default-pod-lister",
            "secret": {"secretName": "cluster2-default-pod-lister-token", **_defaults(import_volumes(pod)[0])},
        }
    ]
    for container in pod["spec"]["initContainers"] + pod["spec"]["containers"]:
        assert mounts_of(container) == [expected_mount("cluster2-default-pod-lister")], container["name"]
    # The service-account admission's own projected volume is still there, next to ours.
    assert any(v["name"].startswith("kube-api-access-") for v in pod["spec"]["volumes"])


def _defaults(volume: dict[str, Any]) -> dict[str, Any]:
    """Fields the API server defaults in a secret volume (defaultMode), which the webhook does not set."""
    return {k: v for k, v in volume["secret"].items() if k != "secretName"}


@pytest.mark.real_tier
def test_same_pod_without_the_label_or_without_the_annotation_is_untouched(env: Env) -> None:
    plain = env.namespace({})
    env.add_import(plain, "cluster2-default-pod-lister")
    pod = env.create_pod(plain, "cluster2-default-pod-lister")
    assert import_volumes(pod) == [] and mounts_of(pod["spec"]["containers"][0]) == []

    enabled = env.namespace(ENABLED)
    pod = env.create_pod(enabled, None)
    assert import_volumes(pod) == [] and mounts_of(pod["spec"]["containers"][0]) == []


@pytest.mark.real_tier
def test_namespace_not_enabled_is_untouched_even_with_a_misconfigured_selector(env: Env) -> None:
    plain = env.namespace({})
    env.add_import(plain, "imp")
    configurations = kube.Resource(env.admin, kube.MUTATING_WEBHOOK_CONFIGURATIONS)
    configuration = configurations.get(WEBHOOK_CONFIGURATION_NAME)
    selector = configuration["webhooks"][0]["namespaceSelector"]
    patch = [{"op": "replace", "path": "/webhooks/0/namespaceSelector", "value": {}}]
    configurations.patch(WEBHOOK_CONFIGURATION_NAME, patch, patch_type="json")
    before = allowed_count(env)
    try:
        pod = env.create_pod(plain, "imp")
    finally:
        restore = [{"op": "replace", "path": "/webhooks/0/namespaceSelector", "value": selector}]
        configurations.patch(WEBHOOK_CONFIGURATION_NAME, restore, patch_type="json")
    assert import_volumes(pod) == []
    assert allowed_count(env) == before + 1, "the webhook was called, and allowed the pod untouched"


def allowed_count(env: Env) -> float:
    metrics = httpx.get(env.webhook.url + "/metrics", verify=False).text
    line = next(x for x in metrics.splitlines() if x.startswith('kubemcsa_webhook_requests_total{result="allowed"}'))
    return float(line.split()[-1])


@pytest.mark.real_tier
def test_several_imports_with_sloppy_separators(env: Env) -> None:
    ns = env.namespace(ENABLED)
    names = ["cluster2-default-pod-lister", "cluster3-default-pod-lister", "cluster4-default-pod-lister"]
    for name in names:
        env.add_import(ns, name)
    pod = env.create_pod(ns, " cluster2-default-pod-lister,, cluster3-default-pod-lister ,cluster4-default-pod-lister,")
    assert [v["secret"]["secretName"] for v in import_volumes(pod)] == [api.secret_name_for_import(n) for n in names]
    assert mounts_of(pod["spec"]["containers"][0]) == [expected_mount(n) for n in names]


@pytest.mark.real_tier
def test_unknown_import_is_refused_with_a_message_naming_it(env: Env) -> None:
    ns = env.namespace(ENABLED)
    env.add_import(ns, "known")
    with pytest.raises(ApiException) as caught:
        env.create_pod(ns, "known,unknown")
    assert caught.value.status == 403
    message = kube.error_message(caught.value)
    assert 'admission webhook "service-account-import-admission-controller.multicluster.admiralty.io" denied' in (
        message
    )
    assert '"unknown"' in message and f'namespace "{ns}"' in message
    assert kube.Resource(env.admin, kube.PODS).list(ns)["items"] == []


@pytest.mark.real_tier
def test_pod_created_before_its_secret_exists_is_admitted(env: Env) -> None:
    ns = env.namespace(ENABLED)
    env.add_import(ns, "fresh")
    secrets = kube.Resource(env.admin, kube.SECRETS)
    assert all(s["metadata"]["name"] != "fresh-token" for s in secrets.list(ns)["items"])
    pod = env.create_pod(ns, "fresh")
    assert import_volumes(pod)[0]["secret"]["secretName"] == "fresh-token"


@pytest.mark.real_tier
def test_import_created_a_moment_ago_is_found_through_the_api(env: Env) -> None:
    # A cache that has not watched anything yet: every lookup misses and must ask the API server.
    cache = WatchCache(env.webhook_client)
    ns = env.namespace(ENABLED)
    env.add_import(ns, "just-now")
    assert cache.namespace_labels(ns) == {**ENABLED, "kubernetes.io/metadata.name": ns}
    assert cache.missing_imports(ns, ["just-now", "never"]) == ["never"]
    assert cache.namespace_labels("no-such-namespace") is None
    assert cache.misses() == {MISS_IMPORT: 1, "namespace": 2}
    # What that one LIST said is remembered for a moment: the event loop's view answers without a call.
    assert cache.cached().missing_imports(ns, ["just-now", "never"]) == ["never"]
    assert cache.cached().namespace_labels("no-such-namespace") is None
    assert cache.misses() == {MISS_IMPORT: 1, "namespace": 2}
    with pytest.raises(Exception, match="LookupWouldBlock|apps"):
        WatchCache(env.webhook_client).cached().missing_imports(ns, ["just-now"])


def test_a_lookup_never_outlives_the_callers_deadline(env: Env) -> None:
    cache = WatchCache(env.webhook_client)
    ns = env.namespace(ENABLED)
    env.server.reset_requests()
    with pytest.raises(LookupFailed, match="no time left"):
        cache.before(time.monotonic()).missing_imports(ns, ["x"])
    assert [r for r in env.server.requests if r.user == WEBHOOK_USER] == []


def test_lookups_come_from_the_watch_not_one_call_per_request(env: Env) -> None:
    ns = env.namespace(ENABLED)
    env.add_import(ns, "watched")
    cached = env.webhook.cache.cached()
    wait_for(lambda: _exists(cached, ns, "watched"), what="the import in the watch-fed cache")
    env.server.reset_requests()
    for _ in range(3):
        env.create_pod(ns, "watched")
    calls = [r for r in env.server.requests if r.user == WEBHOOK_USER and r.verb in ("get", "list")]
    assert calls == []


def test_unknown_names_cost_one_api_call_per_request_at_most(env: Env) -> None:
    # Once: a pod naming 39,000 unknown imports made 39,001 GETs over 95 s. Now the cap refuses it before any
    # lookup, and a pod at the cap of unknown names costs one LIST, remembered for the next pods.
    ns = env.namespace(ENABLED)
    env.add_import(ns, "known")
    cached = env.webhook.cache.cached()
    wait_for(lambda: _exists(cached, ns, "known"), what="the import in the watch-fed cache")
    env.server.reset_requests()
    with pytest.raises(ApiException) as refused:
        env.create_pod(ns, ",".join(_base36(i) for i in range(39_000)))  # short names: under 256 KiB
    assert f"more than {api.MAX_IMPORTS_PER_POD} imports" in json.loads(refused.value.body)["message"]
    assert [r for r in env.server.requests if r.user == WEBHOOK_USER] == []

    at_cap = ",".join(f"unknown-{i}" for i in range(api.MAX_IMPORTS_PER_POD))
    results: list[str] = []

    def attack() -> None:
        try:
            env.create_pod(ns, at_cap)
            results.append("admitted")
        except ApiException as exc:
            results.append(json.loads(exc.body)["message"])

    attackers = [threading.Thread(target=attack) for _ in range(4)]
    for thread in attackers:
        thread.start()
    ordinary = [env.create_pod(ns, "known") for _ in range(10)]
    for thread in attackers:
        thread.join(WAIT)
    assert all(import_volumes(pod) for pod in ordinary)
    assert len(results) == 4 and all("do not exist" in message for message in results), results
    calls = [(r.verb, r.resource) for r in env.server.requests if r.user == WEBHOOK_USER]
    # Four pods naming 32 unknown imports each: at most one LIST each, whatever the number of names; usually one
    # between them (the others wait for it and reuse its answer for 2 s).
    assert 1 <= len(calls) <= len(results) and set(calls) == {("list", api.PLURAL)}, calls


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while True:
        number, digit = divmod(number, 36)
        text = digits[digit] + text
        if not number:
            return text


def _exists(cached: Any, namespace: str, name: str) -> bool:
    try:
        return bool(cached.namespace_labels(namespace)) and not cached.missing_imports(namespace, [name])
    except Exception:
        return False


# Reinvocation: a sidecar injector that runs after us (its configuration sorts later) adds a container; with
# reinvocationPolicy IfNeeded the API server calls us again and the sidecar gets the mounts too, nothing twice.


async def _sidecar_injector(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    review = json.loads(body)
    pod = review["request"]["object"]
    response: dict[str, Any] = {"uid": review["request"]["uid"], "allowed": True}
    if not any(c["name"] == "injected" for c in pod["spec"]["containers"]):
        patch = [{"op": "add", "path": "/spec/containers/-", "value": {"name": "injected", "image": "envoy"}}]
        response.update(patchType="JSONPatch", patch=base64.b64encode(json.dumps(patch).encode()).decode())
    answer = json.dumps({"apiVersion": review["apiVersion"], "kind": "AdmissionReview", "response": response})
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": answer.encode()})


@pytest.fixture
def sidecar_injector(env: Env, tmp_path: Path) -> Iterator[None]:
    ca_cert, ca_key = tls.make_ca("sidecar-ca")
    cert, key = tls.make_serving_cert(ca_cert, ca_key, ["localhost"], ["127.0.0.1"])
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        _sidecar_injector,
        host="127.0.0.1",
        port=port,
        ssl_certfile=str(tmp_path / "tls.crt"),
        ssl_keyfile=str(tmp_path / "tls.key"),
        lifespan="off",
        log_config=None,
        access_log=False,
    )
    injector = uvicorn.Server(config)
    thread = threading.Thread(target=injector.run, daemon=True)
    thread.start()
    wait_for(lambda: injector.started, what="the sidecar injector")
    configuration = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "zz-sidecar-injector"},
        "webhooks": [
            {
                "name": "sidecar.example.com",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "timeoutSeconds": 5,
                "clientConfig": {
                    "url": f"https://127.0.0.1:{port}/inject",
                    "caBundle": base64.b64encode(ca_cert).decode(),
                },
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "operations": ["CREATE"]}],
            }
        ],
    }
    create(env.admin, configuration)
    try:
        yield
    finally:
        kube.Resource(env.admin, kube.MUTATING_WEBHOOK_CONFIGURATIONS).delete("zz-sidecar-injector")
        injector.should_exit = True
        thread.join(10)


@pytest.mark.usefixtures("sidecar_injector")
@pytest.mark.real_tier
def test_reinvocation_mounts_into_a_container_added_later_and_adds_nothing_twice(env: Env) -> None:
    ns = env.namespace(ENABLED)
    env.add_import(ns, "cluster2-default-pod-lister")
    pod = env.create_pod(ns, "cluster2-default-pod-lister", initContainers=[{"name": "init", "image": "busybox"}])
    assert [c["name"] for c in pod["spec"]["containers"]] == ["main", "injected"]
    assert len(import_volumes(pod)) == 1
    for container in pod["spec"]["initContainers"] + pod["spec"]["containers"]:
        assert mounts_of(container) == [expected_mount("cluster2-default-pod-lister")], container["name"]


@pytest.mark.real_tier
def test_kubemcsa_webhook_command_serves_and_stops_on_sigterm(env: Env, tmp_path: Path) -> None:
    """The console script as deployed: --manage-certificates, its own token, then SIGTERM: exit 0.

    The API server calls it through the Service; once the process has stopped, pods that do not ask for imports
    are still admitted (the registration's matchConditions), and annotated ones are refused, not started bare.
    """
    ns = env.namespace(ENABLED)
    env.add_import(ns, "during-outage")
    kubeconfig = tmp_path / "kubeconfig"
    env.server.write_kubeconfig(str(kubeconfig), token=env.server.issue_token(SYSTEM_NS, WEBHOOK_SA))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [
        sys.executable,
        "-m",
        "webhook",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--kubeconfig",
        str(kubeconfig),
    ]
    argv += ["--manage-certificates", "--cert-dir", str(tmp_path / "tls"), "--namespace", SYSTEM_NS]
    argv += ["--shutdown-delay", "0.2", "--health-port", "0"]  # no health port: 8080 may be taken on this machine
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:

        def ready() -> bool:
            try:
                # The certificate is for the Service's DNS names; here only the CA and readiness matter.
                with httpx.Client(verify=False) as c:
                    return c.get(f"https://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=30, what="kubemcsa-webhook to be ready")
        assert (tmp_path / "tls" / "tls.crt").exists() and (tmp_path / "tls" / "tls.key").stat().st_mode & 0o077 == 0
        with httpx.Client(verify=False) as c:
            body = (Path(__file__).parent / "fixtures" / "admissionreview-v1-pod.json").read_bytes()
            answer = c.post(f"https://127.0.0.1:{port}{MUTATE_PATH}", content=body).json()
        # Namespace capture-demo does not exist in this cluster: not enabled, so allowed and untouched.
        assert answer["response"] == {"uid": json.loads(body)["request"]["uid"], "allowed": True}
        env.server.register_service(SYSTEM_NS, SERVICE_NAME, 443, f"https://127.0.0.1:{port}")
        wait_for(lambda: _mounted_through_the_service(env, ns), timeout=WAIT, what="the command's answers")
    except BaseException:
        process.kill()
        env.server.register_service(SYSTEM_NS, SERVICE_NAME, 443, env.webhook.url)
        raise
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0].decode()
    assert process.returncode == 0, output
    assert "stopping" in output

    try:
        # The webhook is down: a pod that does not ask is admitted without it; one that asks is refused.
        assert import_volumes(env.create_pod(ns, None)) == []
        with pytest.raises(ApiException) as refused:
            env.create_pod(ns, "during-outage")
    finally:
        env.server.register_service(SYSTEM_NS, SERVICE_NAME, 443, env.webhook.url)
    assert refused.value.status == 500
    message = json.loads(refused.value.body)["message"]
    url = f"https://{SERVICE_NAME}.{SYSTEM_NS}.svc:443{MUTATE_PATH}?timeout=5s"
    prefix = (
        f'Internal error occurred: failed calling webhook "{SERVICE_NAME}.multicluster.admiralty.io": failed to '
        f'call webhook: Post "{url}": '
    )
    assert message.startswith(prefix), message
    if isinstance(env.server, ApiServer):
        assert message == f"{prefix}dial tcp 127.0.0.1:{port}: connect: connection refused"
    else:  # the real one dials the Service's cluster IP, here through the test's egress proxy, which says 502
        assert "dialing 10.96." in message and "502" in message, message
    assert import_volumes(env.create_pod(ns, "during-outage"))  # and back once it answers again


def _mounted_through_the_service(env: Env, namespace: str) -> bool:
    return bool(import_volumes(env.create_pod(namespace, "during-outage")))


def _exists_in_cache(env: Env, namespace: str, name: str) -> bool:
    return (namespace, name) in env.webhook.cache._imports


def test_a_secret_the_import_does_not_control_is_never_mounted(env: Env) -> None:
    # Once: whoever created "<import>-token" first had it mounted into every pod asking for the import.
    ns = env.namespace(ENABLED)
    planted = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "victim-token", "namespace": ns},
        "stringData": {"server": "https://attacker.example", "token": "planted"},
    }
    create(env.admin, planted)
    env.add_import(ns, "victim")
    imports = kube.Resource(env.admin, kube.SERVICE_ACCOUNT_IMPORTS)
    # What the controller writes when it finds the name taken (controller/assess.py, check_secret_conflict).
    conflict = {
        "type": api.CONDITION_READY,
        "status": "False",
        "reason": api.REASON_SECRET_CONFLICT,
        "message": f"A Secret named victim-token already exists in namespace {ns} and is not controlled by this import",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
    imports.patch_status("victim", {"status": {"conditions": [conflict]}}, ns)
    wait_for(lambda: env.webhook.cache._unowned.get((ns, "victim")), what="the conflict in the watch-fed cache")
    with pytest.raises(ApiException) as refused:
        env.create_pod(ns, "victim")
    message = json.loads(refused.value.body)["message"]
    assert refused.value.status == 403 and '"victim-token"' in message and "not controlled" in message
    # Found through the API (a cache that has not watched yet): the same answer.
    cold = WatchCache(env.webhook_client)
    assert cold.missing_imports(ns, ["victim"]) == []
    assert "not controlled" in cold.unowned_secrets(ns, ["victim"])["victim"]
    # Once the controller controls a Secret of that name it lists it, and pods get it again.
    status = {
        "secrets": [{"name": "victim-token"}],
        "conditions": [{**conflict, "status": "True", "reason": "TokenIssued"}],
    }
    imports.patch_status("victim", {"status": status}, ns)
    wait_for(lambda: (ns, "victim") not in env.webhook.cache._unowned, what="the fix in the watch-fed cache")
    assert import_volumes(env.create_pod(ns, "victim"))[0]["secret"]["secretName"] == "victim-token"


def test_a_namespace_editor_cannot_write_an_imports_status(env: Env) -> None:
    # The webhook trusts status.secrets and the Ready reason because only the controller can write them.
    ns = env.namespace(ENABLED)
    env.add_import(ns, "mine")
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "editor", "namespace": ns}}
    create(env.admin, sa)
    for doc in documents(MANIFESTS / "crd" / "user-roles.yaml"):
        try:
            create(env.admin, doc)
        except ApiException as exc:
            if exc.status != 409:
                raise
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "editor", "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
        "subjects": [{"kind": "ServiceAccount", "name": "editor", "namespace": ns}],
    }
    create(env.admin, binding)
    editor = kube.Resource(
        env.server.client_for_token(env.server.issue_token(ns, "editor")), kube.SERVICE_ACCOUNT_IMPORTS
    )
    editor.patch("mine", {"metadata": {"labels": {"x": "y"}}}, ns)  # the import itself: theirs to edit
    with pytest.raises(ApiException) as forbidden:
        editor.patch_status("mine", {"status": {"secrets": [{"name": "mine-token"}]}}, ns)
    assert forbidden.value.status == 403
