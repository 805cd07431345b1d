"""Federated imports end to end, against two clusters (in memory; real ones too with KUBEBUILDER_ASSETS for the
tests marked real_tier), the second trusting the first.

cluster1 runs the controller and the webhook (each with a token of its ServiceAccount, bound to the manifests'
RBAC); the kubelet stand-in writes the pod's projected volume. cluster2 is
the source: it trusts cluster1's issuer once its "administrator" adds the AuthenticationConfiguration that
`kubemcsa federate` prints. No token of either cluster is copied anywhere: a test scans both clusters and the logs.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException
from kubernetes.config import new_client_from_config

from controller.options import Options
from controller.run import Controller
from kubemcsa import cli, config
from kubemcsa.certificates import manager
from kubemcsa.client import kube
from kubemcsa.contract import api, federation
from kubemcsa_testing import ApiServer
from kubemcsa_testing.kubelet import Kubelet
from kubemcsa_testing.objects import create_file, create_or_get
from kubemcsa_testing.tokens import decode_unverified
from kubemcsa_testing.wait import wait_for
from webhook import mutation
from webhook.cache import WatchCache
from webhook.cli import CERT_SECRET_NAME, SERVICE_NAME, WEBHOOK_CONFIGURATION_NAME
from webhook.lookups import MISS_IMPORT, MISS_NAMESPACE
from webhook.server import WebhookServer

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
SYSTEM_NS = api.SYSTEM_NAMESPACE
CONTROLLER_SA = "service-account-import-controller"
TRUST_CHECK_SA = api.TRUST_CHECK_SERVICE_ACCOUNT  # whose tokens check a source's trust: bound to nothing
POD_SA = "app"  # the pod's own service account in cluster1
REMOTE_USER = f"cluster1:system:serviceaccount:default:{POD_SA}"
KUBECTL = shutil.which("kubectl")
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")


def as_stored(volume: dict[str, Any]) -> dict[str, Any]:
    """A projected volume as the webhook writes it, plus the defaultMode (0644) the API server fills in."""
    return {**volume, "projected": {**volume["projected"], "defaultMode": 420}}


def pod_lister_binding(user: str) -> list[dict[str, Any]]:
    """In cluster2: list pods in default, for the federated user of cluster1's default/app pods."""
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "pod-lister", "namespace": "default"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "pod-lister", "namespace": "default"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-lister"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"containers": [{"name": "web", "image": "nginx"}]},
        },
    ]


@dataclass
class Env:
    c1: Any
    c2: Any
    tmp: Path
    admin1: ApiClient
    admin2: ApiClient
    controller_client: ApiClient
    kubeconfigs: dict[str, Path]
    controllers: list[Controller] = field(default_factory=list)
    webhook: WebhookServer | None = None

    def start_controller(self) -> Controller:
        options = Options(
            leader_election=False,
            remote_timeout=3.0,
            backoff_base=0.1,
            backoff_max=1.0,
            untrusted_recheck_seconds=0.3,
        )
        controller = Controller(self.controller_client, options)
        self.controllers.append(controller)
        controller.start()
        assert controller.wait_until_ready(30)
        return controller

    def federate(self, *extra: str) -> tuple[int, str]:
        argv = ["federate", "--target-context", "cluster1", "--target-kubeconfig", str(self.kubeconfigs["cluster1"])]
        argv += ["--source-context", "cluster2", "--source-kubeconfig", str(self.kubeconfigs["cluster2"]), *extra]
        return cli.main(argv), ""

    def create_import(self, name: str = "fed", **spec: Any) -> dict[str, Any]:
        body = {"clusterName": "cluster2", "namespace": "default", "tokenType": "Federated", **spec}
        obj = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name}, "spec": body}
        return kube.Resource(self.admin1, kube.SERVICE_ACCOUNT_IMPORTS).create(obj, "default")

    def ready(self, name: str = "fed") -> dict[str, Any] | None:
        imp = kube.Resource(self.admin1, kube.SERVICE_ACCOUNT_IMPORTS).get(name, "default")
        return next((c for c in (imp.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"), None)

    def wait_ready(self, status: str, reason: str, name: str = "fed") -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            cond = self.ready(name)
            return cond if cond and (cond["status"], cond["reason"]) == (status, reason) else None

        return wait_for(check, f"import {name} Ready={status} {reason}", timeout=30)


def start_webhook(c1: Any, tmp_path: Path) -> WebhookServer:
    """The webhook as deployed: its ServiceAccount's token and RBAC, its certificate, the manifests' registration."""
    admin = c1.admin_client()
    # The Service too: a real API server resolves it to its cluster IP before dialing.
    for name in ("serviceaccount.yaml", "rbac.yaml", "service.yaml", "mutatingwebhookconfiguration.yaml"):
        create_file(admin, MANIFESTS / "webhook" / name)
    client = c1.client_for_token(c1.issue_token(SYSTEM_NS, SERVICE_NAME, expiration_seconds=3600))
    bundle = manager.ensure_webhook_certificates(
        client,
        namespace=SYSTEM_NS,
        secret_name=CERT_SECRET_NAME,
        secret_namespace=api.CERT_NAMESPACE,
        service_name=SERVICE_NAME,
        webhook_configuration_name=WEBHOOK_CONFIGURATION_NAME,
    )
    cert_file, key_file = manager.write_files(bundle, tmp_path / "webhook-tls")
    webhook = WebhookServer(client, cert_file, key_file).start()
    c1.register_service(SYSTEM_NS, SERVICE_NAME, 443, webhook.url)
    assert webhook.cache.wait_for_sync(30)
    return webhook


@pytest.fixture
def env(clusters, tmp_path: Path) -> Iterator[Env]:
    c1, c2 = clusters  # in memory, or the real control planes (cluster2 trusting nobody until told)
    admin1, admin2 = c1.admin_client(), c2.admin_client()
    for part in ("crd/serviceaccountimports.yaml", "namespace.yaml", "controller/serviceaccount.yaml"):
        create_file(admin1, MANIFESTS / part)
    create_file(admin1, MANIFESTS / "controller" / "rbac.yaml")
    kube.Resource(admin1, kube.NAMESPACES).patch(
        "default", {"metadata": {"labels": {api.NAMESPACE_LABEL: api.NAMESPACE_LABEL_VALUE}}}
    )
    controller_client = c1.client_for_token(c1.issue_token(SYSTEM_NS, CONTROLLER_SA, expiration_seconds=3600))
    create_or_get(
        admin1, {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": POD_SA, "namespace": "default"}}
    )
    for obj in pod_lister_binding(REMOTE_USER):
        create_or_get(admin2, obj)
    kubeconfigs = {}
    for server in (c1, c2):
        kubeconfigs[server.name] = tmp_path / f"{server.name}.kubeconfig"
        server.write_kubeconfig(str(kubeconfigs[server.name]), context=server.name)
    environment = Env(c1, c2, tmp_path, admin1, admin2, controller_client, kubeconfigs)
    yield environment
    for controller in environment.controllers:
        controller.stop()
    if environment.webhook is not None:
        environment.webhook.stop()


def trust_cluster1(env: Env, out: str) -> None:
    """What cluster2's administrator does with federate's output: the printed AuthenticationConfiguration."""
    start = out.index("apiVersion: apiserver.config.k8s.io")
    env.c2.configure_authentication(yaml.safe_load(out[start : out.index("\n\n", start)]))


def annotated_pod() -> dict[str, Any]:
    """A pod of service account app asking for the import, as a user writes it: the webhook adds the rest."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "client", "namespace": "default", "annotations": {api.IMPORT_ANNOTATION: "fed"}},
        "spec": {"serviceAccountName": POD_SA, "containers": [{"name": "client", "image": "client"}]},
    }


def scan_for_tokens(env: Env, logs: str) -> list[str]:
    """Where a token shows up: every Secret, ConfigMap, Event and import (status included) of both clusters, and
    the log lines. Returns what it found (names only, never the token)."""
    found = []
    for server, client in (("cluster1", env.admin1), ("cluster2", env.admin2)):
        for rtype in (kube.SECRETS, kube.CONFIG_MAPS, kube.EVENTS, kube.SERVICE_ACCOUNT_IMPORTS):
            try:
                items = kube.Resource(client, rtype).list().get("items") or []
            except ApiException as exc:
                if exc.status == 404:  # cluster2 has no CRD
                    continue
                raise
            for item in items:
                text = json.dumps(item)
                decoded = " ".join(
                    base64.b64decode(v).decode(errors="replace") for v in (item.get("data") or {}).values()
                    if rtype == kube.SECRETS
                )  # fmt: skip
                if JWT.search(text) or JWT.search(decoded):
                    meta = item["metadata"]
                    found.append(f"{server} {rtype.kind} {meta.get('namespace')}/{meta['name']}")
    if JWT.search(logs):
        found.append("a log line")
    return found


@pytest.mark.real_tier
def test_a_federated_import_is_ready_once_trusted_and_pods_call_with_their_own_token(
    env: Env, capsys, caplog, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    env.start_controller()
    env.webhook = start_webhook(env.c1, tmp_path)
    assert env.federate()[0] == 0
    out = capsys.readouterr().out
    env.create_import()

    # Not trusted yet: the reason says so and how to fix it; the Secret is there already (it holds no secret).
    cond = env.wait_ready("False", api.REASON_FEDERATION_NOT_TRUSTED)
    assert "kubemcsa federate" in cond["message"] and "AuthenticationConfiguration" in cond["message"]
    secret = kube.Resource(env.admin1, kube.SECRETS).get(api.secret_name_for_import("fed"), "default")
    assert sorted(secret["data"]) == sorted(api.FEDERATED_SECRET_KEYS)
    kubeconfig = yaml.safe_load(base64.b64decode(secret["data"]["config"]))
    assert kubeconfig["users"][0]["user"] == {"tokenFile": "token"}

    # cluster2's administrator adds the printed configuration: the import turns Ready by itself.
    trust_cluster1(env, out)
    cond = env.wait_ready("True", api.REASON_FEDERATED)
    assert "no token is copied" in cond["message"]
    imp = kube.Resource(env.admin1, kube.SERVICE_ACCOUNT_IMPORTS).get("fed", "default")
    assert imp["status"]["remoteUser"] == "cluster1:system:serviceaccount:default:<service-account>"
    assert imp["status"]["secrets"] == [{"name": "fed-token"}]
    assert "expirationTimestamp" not in imp["status"]

    # An annotated pod of service account app: the webhook mounts the projected volume at the usual path, and
    # the kubelet writes its five files.
    pod = kube.Resource(env.admin1, kube.PODS).create(annotated_pod(), "default")
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == api.volume_name_for_import("fed"))
    assert volume == as_stored(federation.projected_volume(volume["name"], "fed-token", "cluster2", 3600))
    (mount,) = [m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert mount == {"name": volume["name"], "mountPath": api.mount_path_for_import("fed"), "readOnly": True}
    kubelet = Kubelet(env.c1, tmp_path / "kubelet")
    kubelet.mount("default", "client")
    mount_root = kubelet.container_root("default", "client", "client") / api.MOUNT_ROOT.lstrip("/")
    files = mount_root / "fed"
    assert {p.name for p in files.iterdir() if not p.name.startswith("..")} == set(api.SECRET_KEYS)
    claims = decode_unverified((files / "token").read_text())
    assert claims["aud"] == ["cluster2"] and claims["sub"] == f"system:serviceaccount:default:{POD_SA}"

    # A client from the mounted files, with kubemcsa.config: cluster2's RBAC for the federated user, no more.
    remote = config.import_config_and_namespace("fed", mount_root)
    assert remote.namespace == "default"
    with remote.api_client() as client:
        pods = kube.Resource(client, kube.PODS).list("default")["items"]
        assert [p["metadata"]["name"] for p in pods] == ["web"]
        assert kube.whoami(client)["username"] == REMOTE_USER
        with pytest.raises(ApiException) as info:
            kube.Resource(client, kube.SECRETS).list("default")
        assert info.value.status == 403 and REMOTE_USER in kube.error_message(info.value)

    # The kubeconfig alone, with the official client (tokenFile relative to the file) and, if present, kubectl.
    with new_client_from_config(config_file=str(files / "config")) as client:
        assert [p["metadata"]["name"] for p in kube.Resource(client, kube.PODS).list("default")["items"]] == ["web"]
    if KUBECTL:
        listed = subprocess.run(
            [KUBECTL, "--kubeconfig", str(files / "config"), "get", "pods", "-o", "name"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert listed.returncode == 0 and listed.stdout.split() == ["pod/web"], listed.stderr
        refused = subprocess.run(
            [KUBECTL, "--kubeconfig", str(files / "config"), "get", "secrets"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert refused.returncode != 0 and "forbidden" in refused.stderr

    # No token in any Secret, ConfigMap, Event or status of either cluster, nor in a log line (the scan would
    # see one: it matches the pod's token, and the logs hold the controller's trust checks).
    assert JWT.fullmatch((files / "token").read_text())
    assert "does not trust this cluster's tokens yet" in caplog.text and "trusts this cluster's tokens" in caplog.text
    assert scan_for_tokens(env, caplog.text) == []
    # The tokens cluster2 received: the trust checks' (an account bound to nothing) and the pod's own, never the
    # controller's (only the in-memory server records each request's token).
    if isinstance(env.c2, ApiServer):
        subjects = {r.token.subject for r in env.c2.requests if r.token and r.token.issuer == env.c1.authority.issuer}
        prefix = "system:serviceaccount:"
        assert subjects == {f"{prefix}{SYSTEM_NS}:{TRUST_CHECK_SA}", f"{prefix}default:{POD_SA}"}


def test_a_client_built_once_keeps_working_across_the_kubelets_rotation(env: Env, capsys, tmp_path: Path) -> None:
    env.start_controller()
    env.webhook = start_webhook(env.c1, tmp_path)
    assert env.federate()[0] == 0
    trust_cluster1(env, capsys.readouterr().out)
    env.create_import()
    env.wait_ready("True", api.REASON_FEDERATED)
    # From now on cluster1's tokens (the pod's) live 8 seconds: the kubelet rotates at 6.4 s, the first token dies
    # at 8 s, and the second lives until 14.4 s, a margin for a loaded machine.
    env.c1.max_token_expiration_seconds = 8
    kube.Resource(env.admin1, kube.PODS).create(annotated_pod(), "default")
    kubelet = Kubelet(env.c1, tmp_path / "kubelet")
    kubelet.mount("default", "client")
    mount_root = kubelet.container_root("default", "client", "client") / api.MOUNT_ROOT.lstrip("/")
    first = (mount_root / "fed" / "token").read_text()
    remote = config.import_config_and_namespace("fed", mount_root)
    with remote.api_client() as client:
        pods = kube.Resource(client, kube.PODS)
        assert pods.list("default")["items"]
        # The kubelet rotates at 80 % of the lifetime; then the first token expires.
        wait_for(lambda: kubelet.rotate(force=False) > 0, "the kubelet's rotation", timeout=30)
        assert (mount_root / "fed" / "token").read_text() != first
        expiry = decode_unverified(first)["exp"]
        wait_for(lambda: time.time() > expiry + 2, "the first token to expire", timeout=30)
        with pytest.raises(ApiException) as info:  # the old token is dead at cluster2...
            kube.Resource(env.c2.client_for_token(first), kube.PODS).list("default")
        assert info.value.status == 401
        kubelet.rotate(force=False)  # as the kubelet keeps doing, if another rotation is due by now
        assert [p["metadata"]["name"] for p in pods.list("default")["items"]] == ["web"]  # ...the client is not


@pytest.mark.real_tier
def test_deleting_the_federated_source_makes_the_import_unknown_and_the_error_says_how_to_fix(env: Env) -> None:
    env.start_controller()
    env.create_import()
    cond = env.wait_ready("False", api.REASON_UNKNOWN_CLUSTER)
    assert "No federated source cluster is named cluster2" in cond["message"]
    assert "kubemcsa federate" in cond["message"]
    assert env.federate()[0] == 0  # recorded: picked up without a restart
    env.wait_ready("False", api.REASON_FEDERATION_NOT_TRUSTED)
    kube.Resource(env.admin1, kube.CONFIG_MAPS).delete(federation.configmap_name("cluster2"), SYSTEM_NS)
    env.wait_ready("False", api.REASON_UNKNOWN_CLUSTER)


@pytest.mark.real_tier
def test_no_one_with_namespace_rights_or_the_controllers_identity_can_record_a_federated_source(env: Env) -> None:
    """A federated source decides where pods send their tokens: only cluster admins may record one."""
    source = federation.FederatedSource("evil", "https://evil.example", env.c2.ca_pem, "cluster2", "x:")
    body = federation.source_configmap(source)
    create_or_get(
        env.admin1, {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "dev", "namespace": "default"}}
    )
    create_or_get(
        env.admin1,
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "dev-admin", "namespace": "default"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "admin"},
            "subjects": [{"kind": "ServiceAccount", "name": "dev", "namespace": "default"}],
        },
    )
    dev = env.c1.client_for_token(env.c1.issue_token("default", "dev"))
    for client in (dev, env.controller_client):
        with pytest.raises(ApiException) as info:
            kube.Resource(client, kube.CONFIG_MAPS).create(body, SYSTEM_NS)
        assert info.value.status == 403
    # The controller's token requests for checks are for itself only.
    with pytest.raises(ApiException) as info:
        kube.Resource(env.controller_client, kube.SERVICE_ACCOUNTS).create_subresource(
            "default", "token", {"spec": {"audiences": ["cluster2"]}}, SYSTEM_NS
        )
    assert info.value.status == 403


@pytest.mark.real_tier
def test_a_federated_import_the_webhook_has_not_seen_yet_is_mounted_from_one_list(env: Env) -> None:
    """The cache-miss path: the pod comes with its import, before the watch has delivered it."""
    assert env.federate("--audience", "cluster2", "--audience", "cluster2-aud")[0] == 0  # the record allows it
    env.create_import(audiences=["cluster2-aud"], expirationSeconds=1200)
    cache = WatchCache(env.admin1)
    # Only the source records are watched (as they are long before a pod comes): imports and namespaces miss.
    cache._source_informer.start()
    try:
        assert cache._source_informer.wait_for_sync(30)
        pod = annotated_pod()
        decision = mutation.decide(pod, "default", cache.before(time.monotonic() + 5))
    finally:
        cache.stop()
    assert decision.allowed and cache.misses() == {MISS_IMPORT: 1, MISS_NAMESPACE: 1}
    (volume,) = next(op["value"] for op in decision.patch if op["path"] == "/spec/volumes")
    assert volume == federation.projected_volume(volume["name"], "fed-token", "cluster2-aud", 1200)  # the patch itself


def test_twenty_federated_imports_of_one_source_share_its_trust_check(env: Env, capsys) -> None:
    """Checks are per source and audience, not per import: the source sees a handful, whatever the imports."""
    controller = env.start_controller()
    assert env.federate()[0] == 0
    trust_cluster1(env, capsys.readouterr().out)
    wait_for(controller.federated_sources.list, "the controller to see the federated source")
    env.c1.reset_requests()
    env.c2.reset_requests()
    for i in range(20):
        env.create_import(f"fed-{i}")
    for i in range(20):
        env.wait_ready("True", api.REASON_FEDERATED, name=f"fed-{i}")
    reviews = [r for r in env.c2.requests if r.resource == "selfsubjectreviews"]
    check_tokens = [r for r in env.c1.requests if r.subresource == "token" and r.name == TRUST_CHECK_SA]
    # At most one per worker racing for the first answer (the default is 4 workers), then none.
    print(f"20 federated imports: {len(reviews)} SelfSubjectReview(s) at the source, {len(check_tokens)} token(s)")
    assert 1 <= len(reviews) <= controller.options.workers
    assert len(check_tokens) == len(reviews)


def test_the_webhook_mounts_only_an_audience_the_record_allows(env: Env, tmp_path: Path) -> None:
    """The webhook agrees with the controller: a pod whose import asks for an audience no admin recorded (this
    cluster's own API audience, say) is refused with the same fix; one an admin allowed is mounted as asked."""
    env.webhook = start_webhook(env.c1, tmp_path)
    assert env.federate("--audience", "cluster2", "--audience", "cluster2-ci")[0] == 0
    env.create_import("fed", audiences=list(env.c1.authority.api_audiences))
    env.create_import("ci", audiences=["cluster2-ci"])
    pods = kube.Resource(env.admin1, kube.PODS)

    def create(pod: dict[str, Any]) -> dict[str, Any]:
        return wait_for(lambda: _created(pods, pod), f"pod {pod['metadata']['name']} admitted or refused", timeout=10)

    refused = create(annotated_pod())
    assert isinstance(refused, ApiException) and refused.status == 403
    message = kube.error_message(refused)
    assert "allows the audiences cluster2, cluster2-ci only" in message and "remove spec.audiences" in message
    ci_pod = annotated_pod()
    ci_pod["metadata"] = {"name": "ci", "namespace": "default", "annotations": {api.IMPORT_ANNOTATION: "ci"}}
    admitted = create(ci_pod)
    (volume,) = [v for v in admitted["spec"]["volumes"] if v["name"] == api.volume_name_for_import("ci")]
    assert volume == as_stored(federation.projected_volume(volume["name"], "ci-token", "cluster2-ci", 3600))


def _created(pods: kube.Resource, pod: dict[str, Any]) -> dict[str, Any] | ApiException | None:
    """The pod as created, or the refusal; None while the webhook's watch has not delivered the import or the
    source's record yet (refused so)."""
    try:
        return pods.create(pod, "default")
    except ApiException as exc:
        not_yet = ("does not exist in namespace", "which no federated source names")
        return None if any(words in kube.error_message(exc) for words in not_yet) else exc
