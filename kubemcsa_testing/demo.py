"""`kubemcsa demo`: the original Getting Started flow, played on two in-memory clusters, each step printed.
`kubemcsa demo --federated` plays the federated trust mode instead: no token copied anywhere.

Nothing is installed anywhere: two `kubemcsa_testing.ApiServer`s stand in for cluster1 and cluster2, and the
controller and the admission webhook run in this process against cluster1, exactly as they would in a pod.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from kubemcsa import config
from kubemcsa.cli import allow, bootstrap, bootstrap_plan
from kubemcsa.client import apply, kube
from kubemcsa.contract import api
from kubemcsa_testing import crd_manifest, wait

JSON = dict[str, Any]
WEBHOOK_CONFIGURATION = "service-account-import-admission-controller"
IMPORT_NAME = "cluster2-default-pod-lister"
# The attack the export model stops: importing an account its owner never exported (here one bound to cluster-admin).
REFUSED_IMPORT_NAME = "cluster2-kube-system-admin-bot"
WAIT_SECONDS = 30.0


class DemoError(Exception):
    """A step of the demo failed; the message is one sentence saying which."""


def wait_for(what: str, condition: Callable[[], Any], timeout: float = WAIT_SECONDS) -> Any:
    """Poll `condition` until it returns something truthy; DemoError naming `what` after `timeout` seconds."""
    try:
        return wait.wait_for(condition, what, timeout)
    except wait.WaitTimeout as exc:
        raise DemoError(f"{exc}.") from None


def webhook_configuration(url: str, ca_pem: bytes) -> JSON:
    """The MutatingWebhookConfiguration of manifests/webhook, pointed at a URL instead of a Service."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK_CONFIGURATION},
        "webhooks": [
            {
                "name": f"{WEBHOOK_CONFIGURATION}.multicluster.admiralty.io",
                "admissionReviewVersions": ["v1", "v1beta1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "timeoutSeconds": 5,
                "clientConfig": {"url": f"{url}/mutate-pods", "caBundle": base64.b64encode(ca_pem).decode()},
                "rules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "resources": ["pods"],
                        "operations": ["CREATE"],
                        "scope": "Namespaced",
                    }
                ],
                "namespaceSelector": {
                    "matchExpressions": [
                        {"key": api.NAMESPACE_LABEL, "operator": "In", "values": [api.NAMESPACE_LABEL_VALUE]}
                    ]
                },
            }
        ],
    }


def getting_started_cluster2() -> list[JSON]:
    """`kubectl create serviceaccount/role/rolebinding pod-lister` and `kubectl run nginx`, as manifests."""
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "pod-lister", "namespace": "default"}},
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
            "subjects": [{"kind": "ServiceAccount", "name": "pod-lister", "namespace": "default"}],
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "nginx", "namespace": "default", "labels": {"run": "nginx"}},
            "spec": {"containers": [{"name": "nginx", "image": "nginx"}]},
        },
    ]


def admin_bot() -> list[JSON]:
    """A powerful service account of cluster2 that nobody exported."""
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "admin-bot", "namespace": "kube-system"}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "admin-bot"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"kind": "ServiceAccount", "name": "admin-bot", "namespace": "kube-system"}],
        },
    ]


def service_account_import(name: str = IMPORT_NAME, namespace: str = "default", remote: str = "pod-lister") -> JSON:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterName": "cluster2", "namespace": namespace, "name": remote},
    }


def annotated_pod() -> JSON:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "multicluster-client",
            "namespace": "default",
            "annotations": {api.IMPORT_ANNOTATION: IMPORT_NAME},
        },
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "multicluster-client", "image": "multicluster-service-account-example:latest"}],
        },
    }


FEDERATED_IMPORT_NAME = "cluster2-federated"
FEDERATED_POD_SA = "app"


def federated_import() -> JSON:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": FEDERATED_IMPORT_NAME, "namespace": "default"},
        "spec": {"clusterName": "cluster2", "namespace": "default", "tokenType": "Federated"},
    }


def federated_cluster2(remote_user: str) -> list[JSON]:
    """In cluster2: a Role that lists pods, bound to the federated user of cluster1's pods, and an nginx pod."""
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
            "metadata": {"name": "cluster1-app-pod-lister", "namespace": "default"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-lister"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": remote_user}],
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "nginx", "namespace": "default"},
            "spec": {"containers": [{"name": "nginx", "image": "nginx"}]},
        },
    ]


def federated_pod() -> JSON:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "federated-client", "annotations": {api.IMPORT_ANNOTATION: FEDERATED_IMPORT_NAME}},
        "spec": {"serviceAccountName": FEDERATED_POD_SA, "containers": [{"name": "client", "image": "client"}]},
    }


def _ready_condition(imports: kube.Resource, name: str, status: str, reason: str) -> JSON | None:
    conditions = (imports.get(name, "default").get("status") or {}).get("conditions") or []
    found = next((c for c in conditions if c.get("type") == api.CONDITION_READY), None)
    return found if found and (found.get("status"), found.get("reason")) == (status, reason) else None


def write_secret_files(secret: JSON, directory: Path) -> None:
    """Write a Secret's keys as files, the way the kubelet projects a Secret volume (atomic ..data swap)."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = directory / f"..{time.time_ns()}"
    payload.mkdir()
    for key, value in (secret.get("data") or {}).items():
        (payload / key).write_bytes(base64.b64decode(value))
        os.chmod(payload / key, 0o600)
    previous = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    link = directory / "..data_tmp"
    link.symlink_to(payload.name)
    os.replace(link, directory / "..data")
    if previous:
        shutil.rmtree(directory / previous, ignore_errors=True)
    for key in secret.get("data") or {}:
        if not (directory / key).is_symlink():
            (directory / key).symlink_to(Path("..data") / key)


class Demo:
    """Everything the demo starts, so that it can all be stopped, whatever step failed."""

    def __init__(self, out: Callable[[str], None], workdir: Path) -> None:
        self.out = out
        self.workdir = workdir
        self._stack = contextlib.ExitStack()

    def step(self, text: str) -> None:
        self.out(f"\n==> {text}")

    def say(self, text: str) -> None:
        self.out(f"    {text}")

    def close(self) -> None:
        self._stack.close()

    def _start_clusters(self) -> tuple[Any, Any, dict[str, Path], ApiClient, ApiClient]:
        from kubemcsa_testing import ApiServer

        self.step("Starting two in-memory Kubernetes API servers")
        cluster1 = self._stack.enter_context(ApiServer(name="cluster1"))
        cluster2 = self._stack.enter_context(ApiServer(name="cluster2"))
        kubeconfigs = {}
        for server in (cluster1, cluster2):
            kubeconfigs[server.name] = self.workdir / f"{server.name}.kubeconfig"
            server.write_kubeconfig(str(kubeconfigs[server.name]), context=server.name)
            self.say(f"{server.name}: {server.url}  (kubeconfig {kubeconfigs[server.name]})")
        admin1 = self._client(cluster1.admin_client())
        admin2 = self._client(cluster2.admin_client())

        self.step("Installing multicluster-service-account in cluster1: the ServiceAccountImport CRD")
        crd = crd_manifest()
        kube.Resource(admin1, kube.CRDS).create(crd)
        self.say(f"created CustomResourceDefinition {crd['metadata']['name']}")
        return cluster1, cluster2, kubeconfigs, admin1, admin2

    def _start_controller(self, cluster1: Any, **options: Any) -> None:
        from controller.options import Options
        from controller.run import Controller

        controller = Controller(self._client(cluster1.admin_client()), Options(leader_election=False, **options))
        controller.start()
        self._stack.callback(controller.stop)
        if not controller.wait_until_ready(WAIT_SECONDS):
            raise DemoError("the controller did not become ready within 30s.")

    def _start_webhook(self, cluster1: Any, admin1: ApiClient) -> None:
        self.step("Starting the admission webhook and registering it in cluster1")
        from kubemcsa.client.tls import make_ca, make_serving_cert
        from webhook.server import WebhookServer

        ca_cert, ca_key = make_ca("kubemcsa-demo-ca")
        cert, key = make_serving_cert(ca_cert, ca_key, ["localhost"], ip_addresses=["127.0.0.1"])
        cert_file, key_file = self.workdir / "tls.crt", self.workdir / "tls.key"
        cert_file.write_bytes(cert)
        key_file.write_bytes(key)
        os.chmod(key_file, 0o600)
        webhook = WebhookServer(self._client(cluster1.admin_client()), cert_file, key_file).start()
        self._stack.callback(webhook.stop)
        kube.Resource(admin1, kube.MUTATING_WEBHOOK_CONFIGURATIONS).create(webhook_configuration(webhook.url, ca_cert))
        self.say(f"webhook on {webhook.url}/mutate-pods, MutatingWebhookConfiguration {WEBHOOK_CONFIGURATION}")
        wait_for("the webhook's cache", lambda: webhook.cache.has_synced)

    def run(self, keep_running: bool = False, stop: threading.Event | None = None) -> None:
        cluster1, _, kubeconfigs, admin1, admin2 = self._start_clusters()

        self.step("kubemcsa bootstrap --target-context cluster1 --source-context cluster2")
        source = config.context_cluster_info("cluster2", str(kubeconfigs["cluster2"]))
        target = config.context_cluster_info("cluster1", str(kubeconfigs["cluster1"]))
        the_plan = bootstrap_plan.plan("cluster1", "cluster2")
        result = bootstrap.apply(
            the_plan,
            apply.Cluster("source", "cluster2", admin2, source.server, source.ca_pem),
            apply.Cluster("target", "cluster1", admin1, target.server),
            report=self.say,
        )
        self.say(result.summary())

        self.step("Starting the service account import controller against cluster1")
        self._start_controller(cluster1)
        self.say("the controller reaches cluster2 with the credential bootstrap gave it")

        self._start_webhook(cluster1, admin1)

        self.step("In cluster2: service account pod-lister, allowed to list pods in default, and an nginx pod")
        for obj in getting_started_cluster2():
            kube.Resource(admin2, kube.resource_type_of(obj)).create(obj)
            self.say(f"created {obj['kind']} default/{obj['metadata']['name']}")

        self.step("In cluster2, as pod-lister's owner: kubemcsa allow pod-lister -n default --to cluster1/default")
        targets = allow.parse_targets(["cluster1/default"])
        plan = allow.apply(
            admin2, "cluster2", "default", "pod-lister", lambda sa: allow.plan_allow(sa, targets), report=self.say
        )
        self.say(allow.summary(plan, "cluster2"))

        self.step(f"In cluster1: label namespace default {api.NAMESPACE_LABEL}={api.NAMESPACE_LABEL_VALUE}")
        kube.Resource(admin1, kube.NAMESPACES).patch(
            "default", {"metadata": {"labels": {api.NAMESPACE_LABEL: api.NAMESPACE_LABEL_VALUE}}}
        )
        self.say("namespace/default labeled")

        self.step(f"In cluster1: ServiceAccountImport {IMPORT_NAME} (cluster2, default/pod-lister)")
        kube.Resource(admin1, kube.SERVICE_ACCOUNT_IMPORTS).create(service_account_import())
        secrets = kube.Resource(admin1, kube.SECRETS)
        secret_name = api.secret_name_for_import(IMPORT_NAME)

        def secret_ready() -> JSON | None:
            items = secrets.list("default", label_selector=f"{api.IMPORT_LABEL}={IMPORT_NAME}").get("items") or []
            return next((s for s in items if api.KEY_TOKEN in (s.get("data") or {})), None)

        secret = wait_for(f"Secret {secret_name} (is the import Ready? see kubemcsa status)", secret_ready)
        self.say(f"the controller created Secret default/{secret['metadata']['name']} with keys:")
        for key in api.SECRET_KEYS:
            value = base64.b64decode(secret["data"][key])
            shown = "<redacted>" if key == api.KEY_TOKEN else _preview(value)
            self.say(f"  {key:10} {shown}")
        sai = kube.Resource(admin1, kube.SERVICE_ACCOUNT_IMPORTS).get(IMPORT_NAME, "default")
        ready = next((c for c in (sai.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"), {})
        self.say(f"import Ready={ready.get('status')} reason={ready.get('reason')}: {ready.get('message', '')}")

        self.step("In cluster1: a pod annotated to mount the import is admitted by the webhook")
        pod = kube.Resource(admin1, kube.PODS).create(annotated_pod())
        volumes = [v for v in pod["spec"].get("volumes") or [] if (v.get("secret") or {}).get("secretName")]
        for volume in volumes:
            self.say(f"volume {volume['name']}: secret {volume['secret']['secretName']}")
        for container in pod["spec"]["containers"]:
            for mount in container.get("volumeMounts") or []:
                self.say(f"container {container['name']} mounts {mount['name']} at {mount['mountPath']}")
        if not any(v["name"] == api.volume_name_for_import(IMPORT_NAME) for v in volumes):
            raise DemoError("the webhook did not add the import's volume to the annotated pod.")

        self.step("In the pod: the kubelet writes the Secret's files, and a client is built with kubemcsa.config")
        mount_root = self.workdir / "serviceaccountimports"
        write_secret_files(secret, mount_root / IMPORT_NAME)
        self.say(f"files in {mount_root / IMPORT_NAME} (stands for {api.mount_path_for_import(IMPORT_NAME)})")
        remote = config.import_config_and_namespace(mount_root=mount_root)
        self.say(f"config.import_config_and_namespace() -> {remote}")
        with remote.api_client() as client:
            pods = kube.Resource(client, kube.PODS).list(remote.namespace).get("items") or []
            self.say(f"pods in cluster2's {remote.namespace} namespace, listed as pod-lister:")
            for item in pods:
                self.say(f"  {item['metadata']['name']}")
            try:
                kube.Resource(client, kube.SECRETS).list(remote.namespace)
            except ApiException as exc:
                if exc.status != 403:
                    raise
                self.say(f"listing secrets is refused, as it should be: {exc.status} {kube.error_message(exc)}")
            else:
                raise DemoError("pod-lister could list cluster2's secrets, which its Role does not allow.")
        if not any(item["metadata"]["name"] == "nginx" for item in pods):
            raise DemoError("the client built from the mounted import did not see cluster2's nginx pod.")

        self.step("In cluster1: an import of cluster2's kube-system/admin-bot (cluster-admin there), never exported")
        for obj in admin_bot():
            kube.Resource(admin2, kube.resource_type_of(obj)).create(obj)
        refused = service_account_import(REFUSED_IMPORT_NAME, "kube-system", "admin-bot")
        kube.Resource(admin1, kube.SERVICE_ACCOUNT_IMPORTS).create(refused)
        imports = kube.Resource(admin1, kube.SERVICE_ACCOUNT_IMPORTS)

        def refused_condition() -> JSON | None:
            conditions = (imports.get(REFUSED_IMPORT_NAME, "default").get("status") or {}).get("conditions") or []
            return next((c for c in conditions if c.get("type") == "Ready" and c.get("status") == "False"), None)

        condition = wait_for(f"import {REFUSED_IMPORT_NAME} to be refused", refused_condition)
        self.say(f"import Ready=False reason={condition.get('reason')}: {condition.get('message', '')}")
        refused_secret = api.secret_name_for_import(REFUSED_IMPORT_NAME)
        try:
            has_token = api.KEY_TOKEN in (secrets.get(refused_secret, "default").get("data") or {})
        except ApiException as exc:
            if exc.status != 404:
                raise
            has_token = False
        if has_token:
            raise DemoError(f"Secret {refused_secret} holds a token for an account that was never exported.")
        self.say("no token for it in cluster1: cluster2's owner decides who imports what")

        self.step("kubemcsa status -A (cluster1)")
        from kubemcsa.cli import status

        rows = status.rows(status.list_imports(admin1), _now())
        for line in status.format_table(rows).rstrip().splitlines():
            self.say(line)

        if keep_running:
            self.step("Still running; press Ctrl-C to stop. Try:")
            self.say(f"kubectl --kubeconfig {kubeconfigs['cluster1']} get serviceaccountimports -A")
            self.say(f"kubemcsa status -A --kubeconfig {kubeconfigs['cluster1']}")
            self.say(f"kubectl --kubeconfig {kubeconfigs['cluster2']} get pods")
            (stop or threading.Event()).wait()

    def run_federated(self, keep_running: bool = False, stop: threading.Event | None = None) -> None:
        """The federated trust mode: cluster2 trusts cluster1's own tokens, and no token is copied anywhere."""
        from kubemcsa.cli import federate
        from kubemcsa.contract import federation
        from kubemcsa_testing.kubelet import Kubelet

        cluster1, cluster2, kubeconfigs, admin1, admin2 = self._start_clusters()
        system = api.SYSTEM_NAMESPACE

        self.step("Starting the service account import controller against cluster1")
        kube.Resource(admin1, kube.NAMESPACES).create({"metadata": {"name": system}})
        # As manifests/controller: the identity whose tokens check trust, bound to nothing (never the controller's).
        kube.Resource(admin1, kube.SERVICE_ACCOUNTS).create(federation.trust_check_service_account(), system)
        self._start_controller(cluster1, untrusted_recheck_seconds=0.5, backoff_max=1.0)
        self.say(
            f"it checks trust with tokens of {system}/{api.TRUST_CHECK_SERVICE_ACCOUNT}, which holds no RBAC in "
            "cluster1: a check token is worth nothing but at the source's authentication"
        )
        self._start_webhook(cluster1, admin1)

        self.step("kubemcsa federate --target-context cluster1 --source-context cluster2")
        target = config.context_cluster_info("cluster1", str(kubeconfigs["cluster1"]))
        source = config.context_cluster_info("cluster2", str(kubeconfigs["cluster2"]))
        wanted = federation.FederatedSource("cluster2", source.server, source.ca_pem, "cluster2", "cluster1:")
        target_cluster = apply.Cluster("target", "cluster1", admin1, target.server, target.ca_pem)
        issuer, _ = federate.apply(wanted, target_cluster, report=self.say)
        instructions = federate.instructions(issuer, target_cluster, wanted)
        for line in instructions.splitlines():
            self.say(line)

        self.step(f"In cluster1: label namespace default, a service account {FEDERATED_POD_SA}, and a federated import")
        kube.Resource(admin1, kube.NAMESPACES).patch(
            "default", {"metadata": {"labels": {api.NAMESPACE_LABEL: api.NAMESPACE_LABEL_VALUE}}}
        )
        kube.Resource(admin1, kube.SERVICE_ACCOUNTS).create({"metadata": {"name": FEDERATED_POD_SA}}, "default")
        imports = kube.Resource(admin1, kube.SERVICE_ACCOUNT_IMPORTS)
        imports.create(federated_import(), "default")
        self.say(f"ServiceAccountImport default/{FEDERATED_IMPORT_NAME}: clusterName cluster2, tokenType Federated")
        condition = wait_for(
            "the import to say cluster2 does not trust cluster1 yet",
            lambda: _ready_condition(imports, FEDERATED_IMPORT_NAME, "False", api.REASON_FEDERATION_NOT_TRUSTED),
        )
        self.say(f"import Ready=False reason={condition['reason']}: {condition['message']}")

        self.step("In cluster2, its administrator adds the printed AuthenticationConfiguration to kube-apiserver")
        start = instructions.index("apiVersion: apiserver.config.k8s.io")
        cluster2.configure_authentication(instructions[start : instructions.index("\n\n", start)])
        self.say("cluster2 now authenticates cluster1's service-account tokens for audience cluster2")
        check = federate.check(wanted, target_cluster)
        self.say(f"kubemcsa federate --check: a token of cluster1's default/default is user {check.username!r}")
        remote_user = wanted.remote_user("default", FEDERATED_POD_SA)
        for obj in federated_cluster2(remote_user):
            kube.Resource(admin2, kube.resource_type_of(obj)).create(obj)
            self.say(f"created {obj['kind']} default/{obj['metadata']['name']}")
        self.say(f"the RoleBinding lets user {remote_user} list pods in default, nothing more")

        self.step("The import turns Ready by itself")
        condition = wait_for(
            "the federated import to be Ready",
            lambda: _ready_condition(imports, FEDERATED_IMPORT_NAME, "True", api.REASON_FEDERATED),
        )
        self.say(f"import Ready=True reason={condition['reason']}: {condition['message']}")
        status = imports.get(FEDERATED_IMPORT_NAME, "default").get("status") or {}
        self.say(f"status.remoteUser: {status.get('remoteUser')}")
        secret = kube.Resource(admin1, kube.SECRETS).get(api.secret_name_for_import(FEDERATED_IMPORT_NAME), "default")
        self.say(f"Secret default/{secret['metadata']['name']} holds {', '.join(sorted(secret['data']))}: no token")

        self.step(f"In cluster1: a pod of service account {FEDERATED_POD_SA}, annotated, is admitted by the webhook")
        pod = kube.Resource(admin1, kube.PODS).create(federated_pod(), "default")
        volume = next(
            v for v in pod["spec"]["volumes"] if v["name"] == api.volume_name_for_import(FEDERATED_IMPORT_NAME)
        )
        secret_source, token_source = volume["projected"]["sources"]
        self.say(f"volume {volume['name']}: projected, Secret {secret_source['secret']['name']} (four keys) and")
        self.say(f"  serviceAccountToken {token_source['serviceAccountToken']}")
        self.say(f"mounted at {api.mount_path_for_import(FEDERATED_IMPORT_NAME)} in every container")

        self.step("In the pod: the kubelet writes the five files; a client is built with kubemcsa.config")
        kubelet = Kubelet(cluster1, self.workdir / "kubelet")
        kubelet.mount("default", "federated-client")
        root = kubelet.container_root("default", "federated-client", "client") / api.MOUNT_ROOT.lstrip("/")
        files = sorted(p.name for p in (root / FEDERATED_IMPORT_NAME).iterdir() if not p.name.startswith(".."))
        self.say(f"files: {', '.join(files)} (token: the pod's own, for audience cluster2)")
        remote = config.import_config_and_namespace(FEDERATED_IMPORT_NAME, root)
        with remote.api_client() as client:
            self.say(f"cluster2 sees the client as {kube.whoami(client).get('username')!r}")
            pods = kube.Resource(client, kube.PODS).list(remote.namespace).get("items") or []
            self.say(f"pods in cluster2's default namespace: {', '.join(p['metadata']['name'] for p in pods)}")
            try:
                kube.Resource(client, kube.SECRETS).list(remote.namespace)
            except ApiException as exc:
                if exc.status != 403:
                    raise
                self.say(f"listing secrets is refused, as it should be: {exc.status} {kube.error_message(exc)}")
            else:
                raise DemoError("the federated user could list cluster2's secrets, which its Role does not allow.")

            self.step("The kubelet rotates the pod's token; the same client keeps working")
            first = (root / FEDERATED_IMPORT_NAME / "token").read_text()
            wait_for(
                "a new token",
                lambda: kubelet.rotate() and (root / FEDERATED_IMPORT_NAME / "token").read_text() != first,
            )
            pods = kube.Resource(client, kube.PODS).list(remote.namespace).get("items") or []
            self.say(f"after rotation, still listed: {', '.join(p['metadata']['name'] for p in pods)}")

        self.step("No token was copied: the Secrets of cluster1 hold none for cluster2")
        holders = [
            f"{s['metadata']['namespace']}/{s['metadata']['name']}"
            for s in kube.Resource(admin1, kube.SECRETS).list().get("items") or []
            if api.KEY_TOKEN in (s.get("data") or {})
        ]
        self.say(f"Secrets with a token key in cluster1: {', '.join(holders) or 'none'}")
        if keep_running:
            self.step("Still running; press Ctrl-C to stop. Try:")
            self.say(f"kubectl --kubeconfig {kubeconfigs['cluster1']} get serviceaccountimports -A")
            self.say(f"kubectl --kubeconfig {root / FEDERATED_IMPORT_NAME / 'config'} get pods")
            (stop or threading.Event()).wait()

    def _client(self, client: ApiClient) -> ApiClient:
        self._stack.callback(client.close)
        return client


def _preview(value: bytes, width: int = 60) -> str:
    text = value.decode(errors="replace").strip().replace("\n", "\\n")
    return text if len(text) <= width else f"{text[:width]}... ({len(value)} bytes)"


def _now() -> Any:
    import datetime as dt

    return dt.datetime.now(dt.UTC)


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    # Removed at the end even with --keep-running: its kubeconfigs point at servers that stop with the demo.
    with tempfile.TemporaryDirectory(prefix="kubemcsa-demo-") as directory:
        yield Path(directory)


def main(
    keep_running: bool = False,
    out: Callable[[str], None] | None = None,
    err: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
    federated: bool = False,
) -> int:
    """Run the demo; 0 on success, 1 (after one sentence on `err`) on failure. Everything is stopped at the end."""
    import sys

    write = out or (lambda line: print(line, flush=True))
    write_err = err or (lambda line: print(line, file=sys.stderr, flush=True))
    started = time.monotonic()
    with _workdir() as workdir:
        demo = Demo(write, workdir)
        try:
            if federated:
                demo.run_federated(keep_running=keep_running, stop=stop)
            else:
                demo.run(keep_running=keep_running, stop=stop)
        except KeyboardInterrupt:
            write("\nStopped.")
        except DemoError as exc:
            write_err(f"kubemcsa demo: error: {exc}")
            return 1
        except bootstrap.BootstrapError as exc:
            write_err(f"kubemcsa demo: error: bootstrap failed: {exc}")
            return 1
        except ApiException as exc:
            write_err(f"kubemcsa demo: error: an API call failed ({exc.status} {kube.error_message(exc)}).")
            return 1
        except Exception as exc:  # the demo must end with one sentence, not a traceback
            write_err(f"kubemcsa demo: error: {type(exc).__name__}: {exc}; please report it with the output above.")
            return 1
        finally:
            demo.close()
    write(f"\nDone in {time.monotonic() - started:.1f}s: everything started by the demo is stopped.")
    return 0
