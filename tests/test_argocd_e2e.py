"""An import with spec.argoCD keeps Argo CD's cluster Secret, end to end on two clusters (RBAC enforced): in memory,
and for the tests marked real_tier on real control planes too (KUBEBUILDER_ASSETS).

cluster1 runs the controller with the RBAC of manifests/controller and holds Argo CD's namespace `argocd`;
cluster2 is the source, where the service account `deployer` may list pods in `default` and nothing else.
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient, Configuration
from kubernetes.client.exceptions import ApiException

from controller.options import Options
from controller.run import Controller
from kubemcsa import cli
from kubemcsa.client import kube
from kubemcsa.contract import api, argocd, federation
from kubemcsa_testing import ApiServer
from kubemcsa_testing.kubelet import Kubelet
from kubemcsa_testing.objects import create_or_get
from kubemcsa_testing.pytest_plugin import REAL, fresh_real_clusters
from kubemcsa_testing.wait import wait_for

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
ARGOCD_NS = "argocd"
CONTROLLER = ("multicluster-service-account", "service-account-import-controller")
REMOTE_IDENTITY = "importer"  # the controller's service account in cluster2


def apply(client: ApiClient, *objs: dict[str, Any]) -> None:
    for obj in objs:
        create_or_get(client, obj)


def namespaced_grant(namespace: str, account: tuple[str, str], rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A Role in `namespace` with `rules`, and its RoleBinding to service account `account` (namespace, name)."""
    rbac = "rbac.authorization.k8s.io"
    meta = {"name": f"{account[1]}-grant", "namespace": namespace}
    subject = {"kind": "ServiceAccount", "namespace": account[0], "name": account[1]}
    ref = {"apiGroup": rbac, "kind": "Role", "name": meta["name"]}
    role = {"apiVersion": f"{rbac}/v1", "kind": "Role", "metadata": meta, "rules": rules}
    return [
        role,
        {"apiVersion": f"{rbac}/v1", "kind": "RoleBinding", "metadata": meta, "roleRef": ref, "subjects": [subject]},
    ]


def rule(group: str, resource: str, *verbs: str) -> dict[str, Any]:
    return {"apiGroups": [group], "resources": [resource], "verbs": list(verbs)}


class ArgoEnv:
    def __init__(self, make_server: Callable[..., Any], tmp: Path, token_lifetime: int | None) -> None:
        self.c1 = make_server(name="cluster1")
        self.c2 = make_server(name="cluster2")
        self.admin1, self.admin2 = self.c1.admin_client(), self.c2.admin_client()
        for manifest in ("crd/serviceaccountimports.yaml", "namespace.yaml", "controller/serviceaccount.yaml"):
            apply(self.admin1, *yaml.safe_load_all((MANIFESTS / manifest).read_text()))
        apply(self.admin1, *yaml.safe_load_all((MANIFESTS / "controller" / "rbac.yaml").read_text()))
        for ns in (ARGOCD_NS, "team-a"):
            apply(self.admin1, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        self.controller_user = "system:serviceaccount:{}:{}".format(*CONTROLLER)
        self.controller_client = self.c1.client_for_token(self.c1.issue_token(*CONTROLLER))
        sa = {"apiVersion": "v1", "kind": "ServiceAccount"}
        # Its owner exports it to every namespace of cluster1 (kubemcsa allow deployer --to 'cluster1/*').
        exported = {"labels": {api.EXPORTED_LABEL: "true"}, "annotations": {api.EXPORT_TO_ANNOTATION: "cluster1/*"}}
        apply(self.admin2, {**sa, "metadata": {"name": "deployer", "namespace": "default", **exported}})
        apply(self.admin2, *namespaced_grant("default", ("default", "deployer"), [rule("", "pods", "list")]))
        apply(self.admin2, {**sa, "metadata": {"name": REMOTE_IDENTITY, "namespace": "default"}})
        token_rules = [rule("", "serviceaccounts/token", "create"), rule("", "serviceaccounts", "list", "watch")]
        apply(self.admin2, *namespaced_grant("default", ("default", REMOTE_IDENTITY), token_rules))
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "default"}}
        apply(self.admin2, {**pod, "spec": {"containers": [{"name": "web", "image": "nginx"}]}})
        remote_token = self.c2.issue_token("default", REMOTE_IDENTITY)
        self.sources = self.c2.write_kubeconfig(tmp / "sources", context="cluster2", token=remote_token)
        # Only the imports' tokens are short-lived: capped once the controller's own credential (a static
        # kubeconfig nobody refreshes) has its hour. Capped before, it expired 4 s after setup, and a first refresh
        # later than that on a loaded machine was rightly refused with 401 (a flake in CI).
        if token_lifetime is not None:
            self.c2.max_token_expiration_seconds = token_lifetime
        self.controller: Controller | None = None
        self.imports = kube.Resource(self.admin1, kube.SERVICE_ACCOUNT_IMPORTS)
        self.secrets = kube.Resource(self.admin1, kube.SECRETS)

    def start(self, **options: Any) -> Controller:
        settings = {"leader_election": False, "file_poll_seconds": 0.1, "backoff_base": 0.1, "backoff_max": 1.0}
        settings["cluster_name"] = "cluster1"
        self.controller = Controller(
            self.controller_client, Options(source_kubeconfig=self.sources, **settings, **options)
        )
        self.controller.start()
        assert self.controller.wait_until_ready(30)
        return self.controller

    def create_import(self, name: str, namespace: str = ARGOCD_NS, client: ApiClient | None = None, **spec: Any):
        body = {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterName": "cluster2", "namespace": "default", "name": "deployer", **spec},
        }
        return kube.Resource(client or self.admin1, kube.SERVICE_ACCOUNT_IMPORTS).create(body, namespace)

    def secret(self, name: str, namespace: str = ARGOCD_NS) -> dict[str, Any] | None:
        try:
            return self.secrets.get(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def condition(self, import_name: str, kind: str, namespace: str = ARGOCD_NS) -> dict[str, Any] | None:
        status = self.imports.get(import_name, namespace).get("status") or {}
        return next((c for c in status.get("conditions") or [] if c["type"] == kind), None)

    def wait_condition(self, import_name: str, kind: str, status: str, reason: str) -> dict[str, Any]:
        def holds() -> dict[str, Any] | None:
            found = self.condition(import_name, kind)
            return found if found and (found["status"], found["reason"]) == (status, reason) else None

        return wait_for(holds, what=f"{import_name}: {kind}={status} {reason}")

    @property
    def counted(self) -> bool:
        """Only the in-memory server records each request (a real one is checked by its stored objects)."""
        return isinstance(self.c1, ApiServer)

    def controller_writes(self) -> list[Any]:
        if not self.counted:
            return []
        return [
            r
            for r in self.c1.requests
            if r.user == self.controller_user and r.verb not in ("list", "watch") and r.resource != "leases"
        ]


@pytest.fixture
def make_env(tier, request, tmp_path) -> Iterator[Callable[..., ArgoEnv]]:
    envs: list[ArgoEnv] = []
    make_server = request.getfixturevalue("api_server_factory")
    if tier == REAL:  # the session's control planes, reset; their tokens cannot be made short-lived
        real = dict(zip(("cluster1", "cluster2"), fresh_real_clusters(request), strict=True))

        def make_server(name: str) -> Any:
            return real[name]

    def make(token_lifetime: int | None = None) -> ArgoEnv:
        assert tier != REAL or token_lifetime is None, "a real API server issues tokens for 10 minutes at least"
        envs.append(ArgoEnv(make_server, tmp_path, token_lifetime))
        return envs[-1]

    yield make
    for env in envs:
        if env.controller is not None:
            env.controller.stop()


def client_as_argo_cd_builds_it(secret: dict[str, Any]) -> ApiClient:
    """What Argo CD's Cluster.RESTConfig() makes of a cluster Secret: Host = server, BearerToken = bearerToken,
    TLSClientConfig.CAData = caData (decoded), certificate verification on."""
    data = {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
    config = json.loads(data["config"])
    client_config = Configuration(host=data["server"])
    client_config.api_key = {"authorization": config["bearerToken"]}
    client_config.api_key_prefix = {"authorization": "Bearer"}
    assert config["tlsClientConfig"]["insecure"] is False
    client_config.ssl_ca_cert = None
    client_config.ca_cert_data = base64.b64decode(config["tlsClientConfig"]["caData"]).decode()
    client_config.verify_ssl = True
    return ApiClient(client_config)


def bearer_token(secret: dict[str, Any] | None) -> str | None:
    return argocd.read_cluster_secret_data((secret or {}).get("data")).bearer_token if secret else None


def import_token(secret: dict[str, Any] | None) -> str | None:
    return base64.b64decode(secret["data"][api.KEY_TOKEN]).decode() if secret else None


@pytest.mark.real_tier
def test_argo_cds_secret_lists_what_the_remote_account_may_and_nothing_more_then_goes_with_spec_argocd(make_env):
    env = make_env()
    controller = env.start(resync_seconds=0.2)
    env.create_import("prod", argoCD={"name": "prod-eu"})
    written = env.wait_condition("prod", "ArgoCDSecretReady", "True", "SecretWritten")
    assert "prod-argocd" in written["message"]
    secret = env.secret("prod-argocd")

    # Exactly Argo CD's declarative cluster Secret: its label, its three keys, its config JSON.
    assert secret["metadata"]["labels"][argocd.SECRET_TYPE_LABEL] == argocd.SECRET_TYPE_CLUSTER
    assert secret["type"] == "Opaque"
    assert set(secret["data"]) == {"name", "server", "config"}
    decoded = argocd.read_cluster_secret_data(secret["data"])
    assert (decoded.name, decoded.server) == ("prod-eu", env.c2.url)
    assert set(decoded.config) == {"bearerToken", "tlsClientConfig"}
    assert decoded.ca_pem == env.c2.ca_pem
    assert decoded.bearer_token == import_token(env.secret("prod-token"))
    (owner,) = secret["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["controller"]) == (api.KIND, "prod", True)
    assert owner["uid"] == env.imports.get("prod", ARGOCD_NS)["metadata"]["uid"]

    # A client built as Argo CD builds it lists what cluster2's RBAC grants the account, and nothing else.
    remote = client_as_argo_cd_builds_it(secret)
    assert [p["metadata"]["name"] for p in kube.Resource(remote, kube.PODS).list("default")["items"]] == ["web"]
    for forbidden in (
        lambda: kube.Resource(remote, kube.SECRETS).list("default"),
        lambda: kube.Resource(remote, kube.PODS).list("kube-system"),
        lambda: kube.Resource(remote, kube.PODS).create(
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": []}}, "default"
        ),
    ):
        with pytest.raises(ApiException) as info:
            forbidden()
        assert info.value.status == 403

    # The steady state: resyncs replay the import from the caches, with no API call in either cluster.
    wait_for(lambda: env.condition("prod", "Ready") is not None)
    if env.counted:
        env.c1.reset_requests()
        env.c2.reset_requests()
        done = controller.metrics.reconciles.labels("success")._value.get()
        wait_for(lambda: controller.metrics.reconciles.labels("success")._value.get() >= done + 5, what="resyncs")
        assert env.controller_writes() == []
        assert [r for r in env.c2.requests if r.user.endswith(REMOTE_IDENTITY)] == []

    # Dropping spec.argoCD deletes the Secret and the condition; the import itself stays Ready.
    env.imports.patch("prod", {"spec": {"argoCD": None}}, ARGOCD_NS)
    wait_for(lambda: env.secret("prod-argocd") is None, what="the Argo CD Secret's deletion")
    wait_for(lambda: env.condition("prod", "ArgoCDSecretReady") is None, what="the condition's removal")
    assert env.condition("prod", "Ready")["status"] == "True" and env.secret("prod-token") is not None
    if env.counted:
        deletes = [(r.verb, r.name) for r in env.controller_writes() if r.verb == "delete"]
        assert deletes == [("delete", "prod-argocd")]

    # Back again, then the import goes: the garbage collector takes its Argo CD Secret with it.
    env.imports.patch("prod", {"spec": {"argoCD": {"name": "prod-eu"}}}, ARGOCD_NS)
    wait_for(lambda: env.secret("prod-argocd"), what="the Argo CD Secret, again")
    env.imports.delete("prod", ARGOCD_NS)
    wait_for(lambda: env.secret("prod-argocd") is None and env.secret("prod-token") is None, what="garbage collection")


def test_every_token_refresh_rewrites_the_bearer_token(make_env):
    env = make_env(token_lifetime=4)  # cluster2 caps tokens at 4 s: refreshed every 3.2 s
    env.start()
    env.create_import("prod", argoCD={})
    env.wait_condition("prod", "ArgoCDSecretReady", "True", "SecretWritten")
    first = bearer_token(env.secret("prod-argocd"))

    def rotated_in_step() -> bool:
        before = import_token(env.secret("prod-token"))
        in_argocd = bearer_token(env.secret("prod-argocd"))
        after = import_token(env.secret("prod-token"))
        return in_argocd != first and before == after == in_argocd

    wait_for(rotated_in_step, what="a refreshed token in both Secrets")
    assert argocd.read_cluster_secret_data(env.secret("prod-argocd")["data"]).name == "cluster2"  # the default


@pytest.mark.real_tier
def test_a_foreign_secret_of_that_name_is_left_alone_and_reported(make_env):
    env = make_env()
    hand_written = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "prod-argocd",
            "namespace": ARGOCD_NS,
            "labels": {argocd.SECRET_TYPE_LABEL: argocd.SECRET_TYPE_CLUSTER},
        },
        "data": argocd.cluster_secret_data(
            argocd.ArgoCDCluster(name="by-hand"), "https://elsewhere", argocd.bearer_token_config("hand", b"")
        ),
    }
    apply(env.admin1, hand_written)
    env.start()
    env.create_import("prod", argoCD={})
    conflict = env.wait_condition("prod", "ArgoCDSecretReady", "False", api.REASON_SECRET_CONFLICT)
    assert "prod-argocd" in conflict["message"]
    assert env.condition("prod", "Ready")["status"] == "True"  # the import itself works
    kept = env.secret("prod-argocd")
    assert kept["data"] == hand_written["data"] and not kept["metadata"].get("ownerReferences")

    def conflict_said() -> bool:  # the Event follows the status write
        events = kube.Resource(env.admin1, kube.EVENTS).list(ARGOCD_NS)["items"]
        return any(e["reason"] == api.REASON_SECRET_CONFLICT and "prod-argocd" in e["message"] for e in events)

    wait_for(conflict_said, what="the SecretConflict Event")
    assert not [r for r in env.controller_writes() if r.resource == "secrets" and r.name == "prod-argocd"]

    # Once the hand-written Secret is gone, the import's own takes its place.
    env.secrets.delete("prod-argocd", ARGOCD_NS)
    env.wait_condition("prod", "ArgoCDSecretReady", "True", "SecretWritten")
    assert bearer_token(env.secret("prod-argocd")) == import_token(env.secret("prod-token"))


@pytest.mark.real_tier
def test_namespace_rights_cannot_put_an_argo_cd_secret_in_a_namespace_one_does_not_control(make_env):
    """Attacker: alice may manage imports and read Secrets in team-a only. She cannot register a cluster with the
    Argo CD of namespace argocd: an import's Secrets go to the import's own namespace, whatever its spec says."""
    env = make_env()
    apply(
        env.admin1, {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "alice", "namespace": "team-a"}}
    )
    rights = [rule(api.GROUP, api.PLURAL, "create", "get", "list", "patch"), rule("", "secrets", "get", "list")]
    apply(env.admin1, *namespaced_grant("team-a", ("team-a", "alice"), rights))
    alice = env.c1.client_for_token(env.c1.issue_token("team-a", "alice"))
    env.start()

    with pytest.raises(ApiException) as info:
        env.create_import("evil", namespace=ARGOCD_NS, client=alice, argoCD={})
    assert info.value.status == 403
    # No field names another namespace: one smuggled in is pruned by the API server (or refused, if strict).
    env.create_import("evil", namespace="team-a", client=alice, argoCD={"name": "prod", "namespace": ARGOCD_NS})
    wait_for(lambda: env.secret("evil-argocd", "team-a"), what="the Argo CD Secret in team-a")
    assert env.secret("evil-argocd") is None
    assert "namespace" not in env.imports.get("evil", "team-a")["spec"]["argoCD"]
    assert not [r for r in env.controller_writes() if r.namespace == ARGOCD_NS]
    with pytest.raises(ApiException) as info:
        kube.Resource(alice, kube.SECRETS).list(ARGOCD_NS)
    assert info.value.status == 403


@pytest.mark.real_tier
def test_a_federated_import_feeds_argo_cd_through_the_projected_token_of_its_application_controller(
    make_env, tmp_path, capsys
):
    """No token is copied: Argo CD's Secret runs an exec plugin that reads the token the kubelet projects into the
    application controller's pod (annotated with the import), and cluster2 trusts cluster1's tokens."""
    env = make_env()
    argocd_user = f"cluster1:system:serviceaccount:{ARGOCD_NS}:argocd-application-controller"
    apply(
        env.admin1,
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "argocd-application-controller", "namespace": ARGOCD_NS},
        },
    )
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "argocd", "namespace": "default"},
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "argocd", "namespace": "default"},
    }
    apply(
        env.admin2,
        {**role, "rules": [rule("", "pods", "list")]},
        {
            **binding,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "argocd"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": argocd_user}],
        },
    )
    kubeconfigs = {s.name: s.write_kubeconfig(tmp_path / f"{s.name}.admin", context=s.name) for s in (env.c1, env.c2)}
    env.start(untrusted_recheck_seconds=0.3)
    argv = ["federate", "--target-context", "cluster1", "--target-kubeconfig", kubeconfigs["cluster1"]]
    assert cli.main([*argv, "--source-context", "cluster2", "--source-kubeconfig", kubeconfigs["cluster2"]]) == 0
    printed = capsys.readouterr().out
    start = printed.index("apiVersion: apiserver.config.k8s.io")  # what cluster2's administrator adds
    env.c2.configure_authentication(yaml.safe_load(printed[start : printed.index("\n\n", start)]))
    env.create_import("prod", tokenType="Federated", argoCD={"name": "prod-eu"})
    env.wait_condition("prod", "Ready", "True", api.REASON_FEDERATED)
    env.wait_condition("prod", "ArgoCDSecretReady", "True", "SecretWritten")

    secret = env.secret("prod-argocd")
    assert set(secret["data"]) == {"name", "server", "config"}
    decoded = argocd.read_cluster_secret_data(secret["data"])
    assert set(decoded.config) == {"execProviderConfig", "tlsClientConfig"} and decoded.bearer_token is None
    assert decoded.ca_pem == env.c2.ca_pem and decoded.server == env.c2.url
    exec_config = decoded.config["execProviderConfig"]
    token_path = f"{api.mount_path_for_import('prod')}/{api.KEY_TOKEN}"
    assert exec_config["args"][-1] == token_path

    # Argo CD's application controller, annotated with the import, gets its projected token from the kubelet.
    volume = federation.projected_volume(api.volume_name_for_import("prod"), "prod-token", "cluster2", 3600)
    mount = {"name": volume["name"], "mountPath": api.mount_path_for_import("prod")}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "argocd-application-controller-0",
            "namespace": ARGOCD_NS,
            "annotations": {api.IMPORT_ANNOTATION: "prod"},
        },
        "spec": {
            "serviceAccountName": "argocd-application-controller",
            "containers": [{"name": "argocd-application-controller", "image": "argocd", "volumeMounts": [mount]}],
            "volumes": [volume],
        },
    }
    apply(env.admin1, pod)
    kubelet = Kubelet(env.c1, tmp_path / "kubelet")
    kubelet.mount(ARGOCD_NS, pod["metadata"]["name"])
    root = kubelet.container_root(ARGOCD_NS, pod["metadata"]["name"], "argocd-application-controller")

    def argo_cd_client() -> ApiClient:  # client-go runs the plugin in the container (its / is `root`) for a token
        args = [*exec_config["args"][:-1], str(root / token_path.lstrip("/"))]
        out = subprocess.run([exec_config["command"], *args], capture_output=True, text=True, check=True, timeout=10)
        token = json.loads(out.stdout)["status"]["token"]
        data = {
            **secret["data"],
            "config": base64.b64encode(json.dumps(argocd.bearer_token_config(token, decoded.ca_pem)).encode()).decode(),
        }
        return client_as_argo_cd_builds_it({"data": data})

    remote = argo_cd_client()
    assert [p["metadata"]["name"] for p in kube.Resource(remote, kube.PODS).list("default")["items"]] == ["web"]
    assert kube.whoami(remote)["username"] == argocd_user
    with pytest.raises(ApiException) as info:
        kube.Resource(remote, kube.SECRETS).list("default")
    assert info.value.status == 403
    # The kubelet's rotation swaps the files behind the mount (the plugin reading the file anew: test_argocd_secret).
    kubelet.rotate()
    assert kube.whoami(argo_cd_client())["username"] == argocd_user
