"""The import controller end to end, against two in-memory clusters over real HTTPS with the real client, and for
the tests marked real_tier against real control planes too (KUBEBUILDER_ASSETS); what only an in-memory server can
show (the requests it recorded, a source stopped, a forged token answer) stays in the memory tier.

cluster1 is local (the controller runs there with a token of its ServiceAccount, bound to the RBAC of
manifests/controller, to prove that RBAC is enough); cluster2 is the source, where the controller's identity
may only `create serviceaccounts/token` and list and watch service accounts in `default` (plus secrets rights in
the legacy-mode test), and where the service accounts imported are exported to every namespace of cluster1.
The export model itself (who may import what) is tested in tests/test_controller_exports.py.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException
from kubernetes.config import new_client_from_config

from controller.options import Options
from controller.run import Controller
from kubemcsa.client import kube
from kubemcsa.client.informer import Informer
from kubemcsa.config import import_config_and_namespace
from kubemcsa.contract import api, federation
from kubemcsa.contract.credentials import Credentials, to_secret_data
from kubemcsa.contract.timefmt import parse_time
from kubemcsa_testing import ApiServer
from kubemcsa_testing.objects import create_file, create_or_get, create_pinned_credential
from kubemcsa_testing.pytest_plugin import REAL, fresh_real_clusters
from kubemcsa_testing.wait import wait_for

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
SYSTEM_NS = api.SYSTEM_NAMESPACE
CONTROLLER_SA = "service-account-import-controller"
REMOTE_SA = "import-controller"  # the controller's identity in cluster2
WAIT = 30.0


def role(namespace: str, name: str, rules: list[dict[str, Any]], subject_ns: str, subject: str) -> list[dict]:
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": name, "namespace": namespace},
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": name, "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": subject, "namespace": subject_ns}],
        },
    ]


def service_account(namespace: str, name: str, export_to: str | None = "cluster1/*") -> dict[str, Any]:
    """A service account, exported by its owner to `export_to` (as kubemcsa allow labels and annotates it)."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if export_to:
        meta["labels"] = {api.EXPORTED_LABEL: "true"}
        meta["annotations"] = {api.EXPORT_TO_ANNOTATION: export_to}
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta}


TOKEN_RULES = [{"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]}]
# As bootstrap grants: see which service accounts are exported, in every namespace.
WATCH_RULES = [{"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["list", "watch"]}]
# As bootstrap --legacy-tokens grants (kubemcsa.cli.bootstrap_plan.controller_rules).
LEGACY_RULES = [
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create"]},
    {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get"]},
]


@dataclass
class Env:
    c1: Any
    c2: Any
    tmp: Path
    admin1: ApiClient
    admin2: ApiClient
    controller_client: ApiClient
    source_kubeconfig: str
    remote_token: str = field(repr=False)
    controllers: list[Controller] = field(default_factory=list)

    @property
    def in_memory(self) -> bool:
        """Whether the clusters are in-memory servers, which record every request (a real one does not)."""
        return isinstance(self.c1, ApiServer)

    @property
    def controller_user(self) -> str:
        return f"system:serviceaccount:{SYSTEM_NS}:{CONTROLLER_SA}"

    @property
    def remote_user(self) -> str:
        return f"system:serviceaccount:default:{REMOTE_SA}"

    def start_controller(self, client: ApiClient | None = None, exports: bool = True, **kwargs: Any) -> Controller:
        options: dict[str, Any] = {
            "source_kubeconfig": self.source_kubeconfig,
            "cluster_name": "cluster1",
            "leader_election": False,
            "remote_timeout": 3.0,
            "file_poll_seconds": 0.1,
            "backoff_base": 0.1,
            "backoff_max": 1.0,
        }
        options.update(kwargs)
        controller = Controller(client or self.controller_client, Options(**options))
        self.controllers.append(controller)
        controller.start()
        assert controller.wait_until_ready(WAIT)
        if exports and controller.sources.get("cluster2") is not None:
            # Listed, or failing to (an unreachable source, a bad credential: its imports say why).
            exports_seen = lambda: controller.exports.has_synced("cluster2") or controller.exports.failing("cluster2")  # noqa: E731
            wait_for(exports_seen, what="cluster2's export watch")
        return controller

    def create_import(self, import_name: str, import_namespace: str = "default", **spec: Any) -> dict[str, Any]:
        body = {"clusterName": "cluster2", "namespace": "default", "name": "pod-lister", **spec}
        meta = {"name": import_name, "namespace": import_namespace}
        obj = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": meta, "spec": body}
        return kube.Resource(self.admin1, kube.SERVICE_ACCOUNT_IMPORTS).create(obj, import_namespace)

    def get_import(self, name: str, namespace: str = "default") -> dict[str, Any]:
        return kube.Resource(self.admin1, kube.SERVICE_ACCOUNT_IMPORTS).get(name, namespace)

    def secret(self, import_name: str, namespace: str = "default") -> dict[str, Any] | None:
        try:
            return kube.Resource(self.admin1, kube.SECRETS).get(api.secret_name_for_import(import_name), namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def ready(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        for cond in (self.get_import(name, namespace).get("status") or {}).get("conditions") or []:
            if cond.get("type") == "Ready":
                return cond
        return None

    def wait_ready(self, name: str, status: str = "True", reason: str | None = None, namespace: str = "default"):
        def check() -> dict[str, Any] | None:
            cond = self.ready(name, namespace)
            if cond and cond["status"] == status and (reason is None or cond["reason"] == reason):
                return cond
            return None

        return wait_for(check, what=f"import {name} Ready={status} {reason or ''}")


def setup_cluster1(c1: Any) -> tuple[ApiClient, ApiClient]:
    admin = c1.admin_client()
    create_file(admin, MANIFESTS / "crd" / "serviceaccountimports.yaml")
    create_file(admin, MANIFESTS / "namespace.yaml")
    create_file(admin, MANIFESTS / "controller" / "serviceaccount.yaml")
    create_file(admin, MANIFESTS / "controller" / "rbac.yaml")
    token = c1.issue_token(SYSTEM_NS, CONTROLLER_SA, expiration_seconds=3600)
    return admin, c1.client_for_token(token)


def setup_cluster2(c2: Any, extra_rules: list[dict[str, Any]] | None = None) -> tuple[ApiClient, str]:
    admin = c2.admin_client()
    create_or_get(admin, service_account("default", "pod-lister"))
    for obj in role(
        "default",
        "pod-lister",
        [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}],
        "default",
        "pod-lister",
    ):
        create_or_get(admin, obj)
    create_or_get(admin, service_account("default", REMOTE_SA))
    for obj in role("default", "token-requester", TOKEN_RULES + (extra_rules or []), "default", REMOTE_SA):
        create_or_get(admin, obj)
    for obj in role("default", "export-watcher", WATCH_RULES, "default", REMOTE_SA):
        obj["kind"] = "Cluster" + obj["kind"]
        obj["metadata"].pop("namespace")
        if obj["kind"] == "ClusterRoleBinding":
            obj["roleRef"]["kind"] = "ClusterRole"
        create_or_get(admin, obj)
    create_or_get(
        admin,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"containers": [{"name": "web", "image": "nginx"}]},
        },
    )
    return admin, c2.issue_token("default", REMOTE_SA, expiration_seconds=3600)


@pytest.fixture
def make_env(tier: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Env]]:
    envs: list[Env] = []
    real = fresh_real_clusters(request) if tier == REAL else None

    def make(max_token_expiration_seconds: int | None = None, extra_rules: list | None = None) -> Env:
        if real is not None:
            assert not envs and max_token_expiration_seconds is None, "the real tier has one pair of clusters"
            c1, c2 = real
        else:
            factory = request.getfixturevalue("api_server_factory")
            c1 = factory(name="cluster1")
            c2 = factory(name="cluster2", max_token_expiration_seconds=max_token_expiration_seconds)
        admin1, controller_client = setup_cluster1(c1)
        admin2, remote_token = setup_cluster2(c2, extra_rules)
        # One file per env: a controller of an earlier env follows its file, and must not move to this env's source.
        path = str(tmp_path / f"sources-{len(envs)}.kubeconfig")
        c2.write_kubeconfig(path, context="cluster2", token=remote_token)
        env = Env(c1, c2, tmp_path, admin1, admin2, controller_client, path, remote_token)
        envs.append(env)
        return env

    yield make
    for env in envs:
        for controller in env.controllers:
            controller.stop()


@pytest.fixture
def env(make_env) -> Env:
    return make_env()


def bootstrap_source(env: Env, name: str = "cluster2") -> dict[str, Any]:
    """What `kubemcsa bootstrap` leaves in cluster1 for source `name` (cluster2 behind it): an import of that name in
    the system namespace and its first Secret, pinned, whose credentials the controller uses to reach the source and
    keeps refreshing itself. Returns the import."""
    imp = create_or_get(
        env.admin1,
        {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "metadata": {"name": name, "namespace": SYSTEM_NS},
            "spec": {"clusterName": name, "namespace": "default", "name": REMOTE_SA},
        },
    )
    owner = {"apiVersion": api.API_VERSION, "kind": api.KIND, "name": name, "uid": imp["metadata"]["uid"]}
    owner.update(controller=True, blockOwnerDeletion=True)
    create_pinned_credential(
        env.admin1,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": api.secret_name_for_import(name),
                "namespace": SYSTEM_NS,
                "labels": {api.IMPORT_LABEL: name},
                "ownerReferences": [owner],
            },
            "data": to_secret_data(remote_credentials(env), name),
        },
    )
    return imp


def mount(secret: dict[str, Any], directory: Path) -> None:
    """Write a Secret's keys into `directory` as the kubelet does (each file replaced atomically)."""
    directory.mkdir(parents=True, exist_ok=True)
    for key, value in (secret.get("data") or {}).items():
        tmp = directory / f".{key}.tmp"
        tmp.write_bytes(base64.b64decode(value))
        os.replace(tmp, directory / key)


def writes_by(server: Any, user: str) -> list[Any]:
    """The requests of `user` that are not reads (list/watch/get) nor leader election."""
    return [
        r
        for r in server.requests
        if r.user == user and r.verb not in ("get", "list", "watch") and r.resource != "leases"
    ]


def reads_by(server: Any, user: str) -> list[Any]:
    return [r for r in server.requests if r.user == user and r.verb == "get" and r.resource != "leases"]


# --- the Getting Started flow ---------------------------------------------------------------------------------


@pytest.mark.real_tier
def test_getting_started_secret_works_and_is_least_privilege(env: Env) -> None:
    env.start_controller()
    if env.in_memory:
        env.c1.reset_requests()
        env.c2.reset_requests()
    env.create_import("cluster2-default-pod-lister")
    cond = env.wait_ready("cluster2-default-pod-lister")
    assert cond["reason"] == api.REASON_TOKEN_ISSUED
    secret = env.secret("cluster2-default-pod-lister")
    assert set(secret["data"]) == set(api.SECRET_KEYS)
    assert secret["metadata"]["labels"][api.IMPORT_LABEL] == "cluster2-default-pod-lister"
    owner = secret["metadata"]["ownerReferences"][0]
    assert owner["kind"] == api.KIND and owner["controller"] and owner["blockOwnerDeletion"]
    status = env.get_import("cluster2-default-pod-lister")["status"]
    assert status["secrets"] == [{"name": "cluster2-default-pod-lister-token"}]
    assert status["expirationTimestamp"] and status["lastRefreshTime"] and status["observedGeneration"] == 1

    directory = env.tmp / "mnt" / "cluster2-default-pod-lister"
    mount(secret, directory)
    remote = new_client_from_config(config_file=str(directory / "config"), persist_config=False)
    pods = kube.Resource(remote, kube.PODS).list("default")
    assert [p["metadata"]["name"] for p in pods["items"]] == ["web"]
    for forbidden in (
        lambda: kube.Resource(remote, kube.SECRETS).list("default"),
        lambda: kube.Resource(remote, kube.PODS).list("kube-system"),
    ):
        with pytest.raises(ApiException) as info:
            forbidden()
        assert info.value.status == 403

    if not env.in_memory:
        return
    # At most 3 API calls for a new import across both clusters, and no GET: the caches have the answers.
    wait_for(lambda: len(writes_by(env.c1, env.controller_user)) >= 2, what="the status write")
    local = writes_by(env.c1, env.controller_user)
    # (The export watch's own list and watch, per source not per import, may still be connecting.)
    remote_calls = [r for r in env.c2.requests if r.user == env.remote_user and r.verb not in ("list", "watch")]
    assert [(r.verb, r.resource, r.subresource) for r in remote_calls] == [("create", "serviceaccounts", "token")]
    assert sorted((r.verb, r.resource) for r in local) == [("create", "secrets"), ("patch", "serviceaccountimports")]
    assert not reads_by(env.c1, env.controller_user)


def test_steady_state_makes_no_api_calls(env: Env) -> None:
    controller = env.start_controller(resync_seconds=0.2)
    env.create_import("a")
    env.wait_ready("a")
    env.wait_ready  # noqa: B018 - settle: the status write's own watch event is reconciled with no call
    wait_for(lambda: len(writes_by(env.c1, env.controller_user)) >= 2, what="initial writes")
    env.c1.reset_requests()
    env.c2.reset_requests()
    before = controller.metrics.reconciles.labels("success")._value.get()
    # Several resyncs replay the import: each is reconciled from the caches alone.
    wait_for(lambda: controller.metrics.reconciles.labels("success")._value.get() >= before + 5, what="resyncs")
    assert writes_by(env.c1, env.controller_user) == []
    assert reads_by(env.c1, env.controller_user) == []
    assert [r for r in env.c2.requests if r.user == env.remote_user] == []


# --- rotation ----------------------------------------------------------------------------------------------------


def test_rotation_keeps_a_long_running_client_working(make_env) -> None:
    env = make_env(max_token_expiration_seconds=4)
    # Every token of cluster2 lives 4 s, the controller's own too: it reaches cluster2 through a bootstrapped
    # import that it refreshes itself.
    bootstrap_source(env)
    env.start_controller(source_kubeconfig=None)
    env.create_import("rot")
    env.wait_ready("rot")
    mount_root = env.tmp / "imports"
    stop = threading.Event()

    def kubelet() -> None:  # re-projects the Secret into the volume when it changes, as the kubelet does
        last = None
        while not stop.is_set():
            secret = env.secret("rot")
            if secret and secret["data"] != last:
                mount(secret, mount_root / "rot")
                last = secret["data"]
            stop.wait(0.05)

    mount(env.secret("rot"), mount_root / "rot")
    first_token = (mount_root / "rot" / "token").read_text()
    thread = threading.Thread(target=kubelet, daemon=True)
    thread.start()
    try:
        client = import_config_and_namespace("rot", mount_root).api_client()
        pods = kube.Resource(client, kube.PODS)
        seen = {first_token}
        first_expiry = time.time() + 4

        def rotated_past_first_expiry() -> bool:
            assert pods.list("default")["items"]  # every call on the same client keeps working
            seen.add((mount_root / "rot" / "token").read_text())
            return len(seen) >= 3 and time.time() > first_expiry + 1

        wait_for(rotated_past_first_expiry, what="two rotations")
        # The first token is really dead: rotation was needed.
        dead = env.c2.client_for_token(first_token)
        with pytest.raises(ApiException) as info:
            kube.Resource(dead, kube.PODS).list("default")
        assert info.value.status == 401
        assert env.ready("rot")["status"] == "True"
        assert env.ready("cluster2", SYSTEM_NS)["status"] == "True"
        own = base64.b64decode(env.secret("cluster2", SYSTEM_NS)["data"]["token"]).decode()
        assert own != env.remote_token  # the controller's own credential rotated too
    finally:
        stop.set()
        thread.join(5)
    events = kube.Resource(env.admin1, kube.EVENTS).list("default")["items"]
    assert any(e["reason"] == "TokenRefreshed" and e["type"] == "Normal" for e in events)
    assert not any(first_token in str(e) for e in events)


# --- lifecycle ---------------------------------------------------------------------------------------------------


@pytest.mark.real_tier
def test_delete_import_deletes_secret_and_deleted_secret_is_recreated(env: Env) -> None:
    env.start_controller()
    env.create_import("life")
    env.wait_ready("life")
    first = env.secret("life")
    uid = first["metadata"]["uid"]

    kube.Resource(env.admin1, kube.SECRETS).delete("life-token", "default")
    recreated = wait_for(lambda: (s := env.secret("life")) and s["metadata"]["uid"] != uid and s, what="recreation")
    assert set(recreated["data"]) == set(api.SECRET_KEYS)
    # Recreated from the controller's memory: the token was still fresh, no new token request.
    assert recreated["data"][api.KEY_TOKEN] == first["data"][api.KEY_TOKEN]

    # An edit is repaired.
    edited = dict(recreated)
    edited["data"] = {**recreated["data"], "token": base64.b64encode(b"garbage").decode()}
    kube.Resource(env.admin1, kube.SECRETS).replace(edited, "default")
    wait_for(lambda: env.secret("life")["data"]["token"] == recreated["data"]["token"], what="repair")

    kube.Resource(env.admin1, kube.SERVICE_ACCOUNT_IMPORTS).delete("life", "default")
    wait_for(lambda: env.secret("life") is None, what="garbage collection of the Secret")


@pytest.mark.real_tier
def test_secret_name_conflict_is_reported_and_never_overwritten(env: Env) -> None:
    foreign = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "conf-token", "namespace": "default", "labels": {api.IMPORT_LABEL: "conf"}},
        "data": {"mine": base64.b64encode(b"keep me").decode()},
    }
    create_or_get(env.admin1, foreign)
    env.start_controller()
    env.create_import("conf")
    cond = env.wait_ready("conf", "False", api.REASON_SECRET_CONFLICT)
    assert "conf-token" in cond["message"]
    assert env.secret("conf")["data"] == foreign["data"]
    kube.Resource(env.admin1, kube.SECRETS).delete("conf-token", "default")
    env.wait_ready("conf")


def test_remote_service_account_deleted_then_recreated(make_env) -> None:
    env = make_env(max_token_expiration_seconds=4)
    bootstrap_source(env)
    env.start_controller(source_kubeconfig=None)
    env.create_import("gone")
    env.wait_ready("gone")
    kube.Resource(env.admin2, kube.SERVICE_ACCOUNTS).delete("pod-lister", "default")
    cond = env.wait_ready("gone", "False", api.REASON_REMOTE_SERVICE_ACCOUNT_NOT_FOUND)
    assert "default/pod-lister" in cond["message"] and "cluster2" in cond["message"]
    assert env.secret("gone") is not None  # the last Secret stays

    def warned() -> bool:  # the Event follows the status write
        events = kube.Resource(env.admin1, kube.EVENTS).list("default")["items"]
        reason = api.REASON_REMOTE_SERVICE_ACCOUNT_NOT_FOUND
        return any(e["type"] == "Warning" and e["reason"] == reason for e in events)

    wait_for(warned, what="the RemoteServiceAccountNotFound Warning")
    create_or_get(env.admin2, service_account("default", "pod-lister"))
    env.wait_ready("gone")


@pytest.mark.real_tier
def test_unknown_cluster_then_added_to_source_kubeconfig(env: Env) -> None:
    env.start_controller()
    env.create_import("far", clusterName="cluster3")
    cond = env.wait_ready("far", "False", api.REASON_UNKNOWN_CLUSTER)
    assert "cluster3" in cond["message"] and "cluster2" in cond["message"]
    env.c2.write_kubeconfig(env.source_kubeconfig, context="cluster3", token=env.remote_token)
    env.wait_ready("far")


@pytest.mark.real_tier
def test_remote_forbidden_then_granted(env: Env) -> None:
    create_or_get(env.admin2, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}})
    create_or_get(env.admin2, service_account("other", "reader"))
    env.start_controller()
    env.create_import("nope", namespace="other", name="reader")
    cond = env.wait_ready("nope", "False", api.REASON_FORBIDDEN)
    assert "serviceaccounts/token" in cond["message"]
    for obj in role("other", "token-requester", TOKEN_RULES, "default", REMOTE_SA):
        create_or_get(env.admin2, obj)
    env.wait_ready("nope")


@pytest.mark.real_tier
def test_remote_unauthorized(env: Env) -> None:
    env.c2.write_kubeconfig(env.source_kubeconfig, context="cluster2", token="not-a-valid-token")
    env.start_controller(exports=False)
    env.create_import("unauth")
    cond = env.wait_ready("unauth", "False", api.REASON_UNAUTHORIZED)
    assert "not-a-valid-token" not in cond["message"]
    env.c2.write_kubeconfig(env.source_kubeconfig, context="cluster2", token=env.remote_token)
    env.wait_ready("unauth")


@pytest.mark.real_tier
def test_invalid_spec(env: Env) -> None:
    env.start_controller()
    env.create_import("bad", namespace="Not_A_Namespace")
    cond = env.wait_ready("bad", "False", api.REASON_INVALID_SPEC)
    assert "spec.namespace" in cond["message"]


def test_remote_down_then_back(env: Env) -> None:
    env.start_controller()
    env.c2.stop()
    env.create_import("down")
    cond = env.wait_ready("down", "False", api.REASON_REMOTE_UNREACHABLE)
    assert "cluster2" in cond["message"]
    env.c2.start()
    env.wait_ready("down")


# --- sources -----------------------------------------------------------------------------------------------------


def remote_credentials(env: Env) -> Credentials:
    return Credentials(server=env.c2.url, ca_crt=env.c2.ca_pem, token=env.remote_token, namespace="default")


@pytest.mark.real_tier
def test_mounted_import_source_picked_up_while_running(env: Env) -> None:
    imports_dir = env.tmp / "controller-imports"
    imports_dir.mkdir()
    env.start_controller(source_kubeconfig=None, imports_dir=str(imports_dir))
    env.create_import("m", clusterName="mounted2")
    env.wait_ready("m", "False", api.REASON_UNKNOWN_CLUSTER)
    mount({"data": to_secret_data(remote_credentials(env), "mounted2")}, imports_dir / "mounted2")
    env.wait_ready("m")


@pytest.mark.real_tier
@pytest.mark.parametrize("watched", [None, "default"], ids=["all-namespaces", "one-namespace"])
def test_system_namespace_secret_source(env: Env, watched: str | None) -> None:
    env.start_controller(source_kubeconfig=None, namespace=watched)
    env.create_import("s", clusterName="boot2")
    env.wait_ready("s", "False", api.REASON_UNKNOWN_CLUSTER)
    # As bootstrap leaves it: the import boot2 of the system namespace, and its Secret, which it controls.
    bootstrap_source(env, "boot2")
    env.wait_ready("s")


def test_legacy_token_mode(make_env) -> None:
    env = make_env(extra_rules=LEGACY_RULES)
    env.start_controller()
    env.create_import("old", tokenType="Legacy")
    env.wait_ready("old")
    status = env.get_import("old")["status"]
    assert "expirationTimestamp" not in status
    directory = env.tmp / "legacy"
    mount(env.secret("old"), directory)
    remote = new_client_from_config(config_file=str(directory / "config"), persist_config=False)
    assert kube.Resource(remote, kube.PODS).list("default")["items"]


# --- leader election -----------------------------------------------------------------------------------------------


def test_only_the_leader_writes_and_stopping_it_hands_over(env: Env) -> None:
    second_sa = CONTROLLER_SA + "-2"
    create_or_get(env.admin1, service_account(SYSTEM_NS, second_sa, export_to=None))
    for doc in yaml.safe_load_all((MANIFESTS / "controller" / "rbac.yaml").read_text()):
        if doc["kind"] in ("ClusterRoleBinding", "RoleBinding"):
            doc["metadata"]["name"] += "-2"
            doc["subjects"][0]["name"] = second_sa
            create_or_get(env.admin1, doc)
    second_client = env.c1.client_for_token(env.c1.issue_token(SYSTEM_NS, second_sa, expiration_seconds=3600))
    election = {"leader_election": True, "lease_duration": 3.0, "renew_deadline": 2.0, "retry_period": 0.1}
    first = env.start_controller(identity="first", **election)
    wait_for(lambda: first.is_leader, what="first leader")
    second = env.start_controller(second_client, identity="second", **election)
    env.create_import("one")
    env.wait_ready("one")
    second_user = f"system:serviceaccount:{SYSTEM_NS}:{second_sa}"
    assert writes_by(env.c1, env.controller_user)
    assert not second.is_leader
    assert writes_by(env.c1, second_user) == []
    lease = kube.Resource(env.admin1, kube.LEASES).get("service-account-import-controller", SYSTEM_NS)
    assert lease["spec"]["holderIdentity"] == "first"

    first.stop()
    wait_for(lambda: second.is_leader, timeout=10, what="hand-over")
    env.create_import("two")
    env.wait_ready("two")
    assert any(r.resource == "secrets" for r in writes_by(env.c1, second_user))
    lease = kube.Resource(env.admin1, kube.LEASES).get("service-account-import-controller", SYSTEM_NS)
    assert lease["spec"]["holderIdentity"] == "second" and lease["spec"]["leaseTransitions"] >= 1


def test_a_killed_leader_is_replaced_once_its_lease_expires(env: Env) -> None:
    election = {"leader_election": True, "lease_duration": 2.0, "renew_deadline": 1.5, "retry_period": 0.1}
    first = env.start_controller(identity="first", **election)
    wait_for(lambda: first.is_leader, what="first leader")
    second = env.start_controller(identity="second", **election)
    first.elector.stop(release=False)  # a crash: the lease is left held until it expires
    first.stop()
    assert not first.is_leader
    wait_for(lambda: second.is_leader, timeout=15, what="take-over after expiry")
    env.create_import("after-crash")
    env.wait_ready("after-crash")


# --- the process ----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_main_serves_metrics_and_stops_on_sigterm(env: Env) -> None:
    local = env.tmp / "local.kubeconfig"
    env.c1.write_kubeconfig(str(local), token=env.c1.issue_token(SYSTEM_NS, CONTROLLER_SA, expiration_seconds=3600))
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controller",
            "--kubeconfig",
            str(local),
            "--source-kubeconfig",
            env.source_kubeconfig,
            "--metrics-port",
            str(port),
            "--imports-dir",
            str(env.tmp / "none"),
            "--cluster-name",
            "cluster1",
            "--log-level",
            "DEBUG",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, what="/readyz")
        env.create_import("proc")
        env.wait_ready("proc")
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "kubemcsa_controller_tokens_refreshed_total 1.0" in metrics
        assert "kubemcsa_controller_is_leader 1.0" in metrics
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        output = process.stdout.read().decode()
        token = base64.b64decode(env.secret("proc")["data"]["token"]).decode()
        assert token not in output and env.remote_token not in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _granted(*paths: Path) -> set[tuple[str, str, str]]:
    """(verb, resource, subresource) for every rule of the controller's RBAC manifests."""
    granted = set()
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] in ("ClusterRole", "Role"):
                for rule in doc["rules"]:
                    for resource in rule["resources"]:
                        name, _, sub = resource.partition("/")
                        granted |= {(verb, name, sub) for verb in rule["verbs"]}
    return granted


def test_every_permission_in_the_manifests_is_one_the_controller_uses(make_env) -> None:
    """Least privilege, the other way round from the tests above: nothing is granted that the code never calls."""
    env = make_env()
    # Only the imports' tokens live 4 s (so that a refresh comes soon): capped after setup, the controller's own
    # credential for cluster2 (a static kubeconfig, refreshed by no one) keeps its hour. Capped before, it expired
    # 4 s after setup, and a refresh later than that (a loaded machine) was legitimately refused with 401.
    env.c2.max_token_expiration_seconds = 4
    env.c1.reset_requests()

    def controller_calls() -> set[tuple[str, str, str]]:
        return {(r.verb, r.resource, r.subresource) for r in env.c1.requests if r.user == env.controller_user}

    env.start_controller(leader_election=True)
    env.create_import("used")
    env.wait_ready("used")
    wait_for(lambda: ("update", "secrets", "") in controller_calls(), what="a token refresh (Secret update)")
    env.create_import("broken", clusterName="nowhere")
    env.wait_ready("broken", status="False", reason=api.REASON_UNKNOWN_CLUSTER)
    wait_for(lambda: ("create", "events", "") in controller_calls(), what="a Warning event")
    env.create_import("argo", argoCD={})  # dropping spec.argoCD deletes the Argo CD cluster Secret
    secrets = kube.Resource(env.admin1, kube.SECRETS)
    wait_for(lambda: any(s["metadata"]["name"] == "argo-argocd" for s in secrets.list("default")["items"]))
    kube.Resource(env.admin1, kube.SERVICE_ACCOUNT_IMPORTS).patch("argo", {"spec": {"argoCD": None}}, "default")
    wait_for(lambda: ("delete", "secrets", "") in controller_calls(), what="the Argo CD Secret's deletion")
    # A federated import: the controller asks for a token of its own service account to check the source's trust.
    source = federation.FederatedSource("cluster2", env.c2.url, env.c2.ca_pem, "cluster2", "cluster1:")
    create_or_get(env.admin1, federation.source_configmap(source))
    env.create_import("fed", tokenType="Federated")
    env.wait_ready("fed", status="False", reason=api.REASON_FEDERATION_NOT_TRUSTED)
    refused = [(r.verb, r.path) for r in env.c1.requests if r.user == env.controller_user and r.code in (401, 403)]
    assert not refused
    granted = _granted(MANIFESTS / "controller" / "rbac.yaml")
    # The one exception, documented in the manifest: an admission plugin of some clusters checks it.
    assert granted - controller_calls() == {("update", "serviceaccountimports", "finalizers")}


# --- resilience: outages, dead sources, recovery ---------------------------------------------------------------


def token_requests(env: Env) -> list[Any]:
    return [r for r in env.c2.requests if r.subresource == "token" and r.user == env.remote_user]


def all_ready(
    env: Env, names: list[str], status: str = "True", reason: str | None = None, namespace: str = "default"
) -> bool:
    conds = [env.ready(name, namespace) for name in names]
    return all(c and c["status"] == status and (reason is None or c["reason"] == reason) for c in conds)


def test_a_source_down_past_every_expiry_recovers_by_itself(env: Env) -> None:
    """Import tokens live 4 s; the controller's own credential (an hour) outlives the outage: no human needed."""
    env.c2.max_token_expiration_seconds = 4
    env.start_controller()
    names = [f"out-{i}" for i in range(3)]
    for name in names:
        env.create_import(name)
    wait_for(lambda: all_ready(env, names), what="imports Ready")
    env.c2.make_unreachable()
    wait_for(lambda: all_ready(env, names, "False", api.REASON_TOKEN_EXPIRED), what="every token expired")
    cond = env.ready(names[0])
    assert "could not be refreshed" in cond["message"] and "connection was closed" in cond["message"]
    env.c2.make_reachable()
    wait_for(lambda: all_ready(env, names), what="recovery without a bootstrap")


def test_an_expired_source_credential_is_said_on_every_import_with_the_fix(make_env) -> None:
    env = make_env(max_token_expiration_seconds=4)
    bootstrap_source(env)  # the controller's own credential lives 4 s too, refreshed by itself while it can
    env.start_controller(source_kubeconfig=None)
    names = ["exp-a", "exp-b"]
    for name in names:
        env.create_import(name)
    wait_for(lambda: all_ready(env, names), what="imports Ready")
    env.c2.make_unreachable()
    own = base64.b64decode(env.secret("cluster2", SYSTEM_NS)["data"]["token"]).decode()
    wait_for(lambda: all_ready(env, names, "False", api.REASON_TOKEN_EXPIRED), what="every token expired")
    wait_for(lambda: all_ready(env, ["cluster2"], "False", api.REASON_TOKEN_EXPIRED, SYSTEM_NS), what="own expired")
    # The source accepts a token up to a second past its expiry (a JWT leeway, as kube's): wait that out too.
    own_expiry = parse_time(env.get_import("cluster2", SYSTEM_NS)["status"]["expirationTimestamp"])
    wait_for(lambda: time.time() > own_expiry + 2, what="the source's leeway to pass")
    env.c2.make_reachable()
    expired = api.REASON_SOURCE_CREDENTIAL_EXPIRED
    wait_for(lambda: all_ready(env, names, "False", expired), what="SourceCredentialExpired on every import")
    for name in names:
        message = env.ready(name)["message"]
        assert "kubemcsa bootstrap --target-context <this cluster>" in message and "--source-name cluster2" in message
        assert own not in message
    assert env.ready("cluster2", SYSTEM_NS)["reason"] == expired


def test_a_dead_source_costs_a_bounded_number_of_connections_whatever_the_number_of_imports(make_env) -> None:
    """While a source is down, its imports wait and one probe at a time tests it: the attempts do not grow with
    the number of imports.

    Bound, for a window of T seconds from the first import: the first wave (at most the 4 workers' calls in
    flight when the circuit opens), then one probe per backoff interval, 0.1 s doubling to 1 s, each at least
    halved by jitter: 4 ramp steps (0.05 + 0.1 + 0.2 + 0.4 s), then at most one per 0.5 s.
    """
    workers, ramp, backoff_max = 4, 4, 1.0
    for n in (4, 40):
        env = make_env()
        env.c2.make_unreachable()
        env.start_controller(backoff_base=0.1, backoff_max=backoff_max, exports=False)
        before = env.c2.connection_attempts
        started = time.monotonic()
        names = [f"dead-{n}-{i}" for i in range(n)]
        for name in names:
            env.create_import(name)
        wait_for(lambda names=names, env=env: all_ready(env, names, "False", api.REASON_REMOTE_UNREACHABLE), what="all")
        # Reset by the dead source's address (unreachable from the start: as its export watch found it).
        assert "connection was closed" in env.ready(names[0])["message"]
        # A rate needs a duration: the window is the measurement, not a wait for a condition.
        wait_for(lambda started=started: time.monotonic() >= started + 4.0, what="the measured window")
        attempts = env.c2.connection_attempts - before
        elapsed = time.monotonic() - started
        bound = workers + ramp + int(elapsed / (backoff_max / 2)) + 1
        assert attempts <= bound, (n, attempts, elapsed)


def test_on_recovery_token_requests_never_exceed_the_sources_rate_limit(env: Env) -> None:
    qps, burst = 10.0, 5
    env.c2.stop()
    controller = env.start_controller(
        backoff_base=0.1, backoff_max=0.5, source_qps=qps, source_burst=burst, exports=False
    )
    # How long a call takes to reach the source once the gate let it go (measured around the real call).
    flights: list[float] = []
    fetch = controller.reconciler.token_source

    def timed_fetch(*args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return fetch(*args, **kwargs)
        finally:
            flights.append(time.monotonic() - started)

    controller.reconciler.token_source = timed_fetch
    names = [f"rec-{i}" for i in range(30)]
    for name in names:
        env.create_import(name)
    wait_for(lambda: all_ready(env, names, "False", api.REASON_REMOTE_UNREACHABLE), what="all waiting")
    assert "connection refused" in env.ready(names[0])["message"]  # the cause, named
    env.c2.start()
    wait_for(lambda: all_ready(env, names), what="all Ready after recovery")
    times = sorted(r.at for r in token_requests(env))
    assert len(times) >= len(names)
    # The gate hands out tokens as a bucket does: in any T seconds, at most burst + qps * T of them (the probe's
    # included; tests/test_controller_gates.py checks that exactly). The source sees each call later than its
    # token was handed out: by the wait for a busy worker to spend it (the gate's grant_lag) and by the call's own
    # flight. So the calls that reach it within T seconds had their tokens within T + lag + flight seconds, and a
    # busy machine widens the bound by the delay it caused, measured (the flight as the call's whole duration).
    window = 1.0
    lag = controller.gates.gate("cluster2").grant_lag() + max(flights)
    worst = max(sum(1 for t in times if start <= t <= start + window) for start in times)
    assert worst <= burst + qps * (window + lag), (worst, lag)
    assert times[-1] - times[0] >= (len(names) - burst) / qps * 0.9  # and the whole recovery took its time


def test_a_source_whose_ca_changed_says_its_certificate_is_not_trusted(env: Env) -> None:
    config = yaml.safe_load(Path(env.source_kubeconfig).read_text())
    config["clusters"][0]["cluster"]["certificate-authority-data"] = base64.b64encode(env.c1.ca_pem).decode()
    Path(env.source_kubeconfig).write_text(yaml.safe_dump(config))
    env.start_controller(exports=False)
    env.create_import("tls")
    cond = env.wait_ready("tls", "False", api.REASON_REMOTE_CERTIFICATE_UNTRUSTED)
    assert "not signed by the CA the controller holds" in cond["message"]
    assert "--source-kubeconfig" in cond["message"]


def test_a_source_whose_name_does_not_resolve_says_dns(env: Env) -> None:
    config = yaml.safe_load(Path(env.source_kubeconfig).read_text())
    config["clusters"][0]["cluster"]["server"] = "https://source.invalid:6443"  # RFC 6761: never resolves
    Path(env.source_kubeconfig).write_text(yaml.safe_dump(config))
    env.start_controller(exports=False)
    env.create_import("dns")
    cond = env.wait_ready("dns", "False", api.REASON_REMOTE_UNREACHABLE)
    assert "does not resolve (DNS)" in cond["message"] and "source.invalid" in cond["message"]


def test_a_missing_system_namespace_is_one_clear_startup_error(api_server_factory, tmp_path: Path) -> None:
    c1 = api_server_factory(name="laptop")
    create_file(c1.admin_client(), MANIFESTS / "crd" / "serviceaccountimports.yaml")  # only the CRD
    local = tmp_path / "local.kubeconfig"
    c1.write_kubeconfig(str(local))
    process = subprocess.run(
        [sys.executable, "-m", "controller", "--kubeconfig", str(local), "--imports-dir", str(tmp_path / "none")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == 2
    assert process.stderr.count("the namespace multicluster-service-account does not exist") == 2  # log + exit
    assert "kubectl create namespace multicluster-service-account" in process.stderr
    assert "NotFound" not in process.stderr


def list_ready(env: Env) -> int:
    items = kube.Resource(env.admin1, kube.SERVICE_ACCOUNT_IMPORTS).list("default")["items"]
    return sum(
        1
        for imp in items
        for c in (imp.get("status") or {}).get("conditions") or []
        if c.get("type") == "Ready" and c.get("status") == "True"
    )


def reconciled(text: str) -> float:
    """The sum of kubemcsa_controller_reconciles_total over its results, from a /metrics page."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("kubemcsa_controller_reconciles_total{")
    )


def test_restarts_and_kills_change_nothing(env: Env) -> None:
    """10 graceful restarts and 2 SIGKILLs with 200 Ready imports: no token request, no status write, no Event."""
    count = 200
    fast = {"source_qps": 1000.0, "source_burst": 1000}
    first = env.start_controller(**fast)
    for i in range(count):
        env.create_import(f"r-{i}")
    wait_for(lambda: list_ready(env) == count, timeout=120, what="200 imports Ready")
    wait_for(lambda: _cached_ready(first) == count, what="the status writes' echo in the controller's cache")
    first.stop()
    env.c1.reset_requests()
    env.c2.reset_requests()

    for _ in range(10):
        controller = env.start_controller(**fast)  # returns once every cache has synced
        wait_for(lambda c=controller: sum(m.get() for m in _reconciles(c)) >= count, what="every import looked at")
        controller.stop()

    local = env.tmp / "local.kubeconfig"
    env.c1.write_kubeconfig(str(local), token=env.c1.issue_token(SYSTEM_NS, CONTROLLER_SA, expiration_seconds=3600))
    for _ in range(2):
        port = free_port()
        argv = [sys.executable, "-m", "controller", "--kubeconfig", str(local)]
        argv += ["--source-kubeconfig", env.source_kubeconfig, "--metrics-port", str(port), "--no-leader-election"]
        argv += ["--imports-dir", str(env.tmp / "none"), "--cluster-name", "cluster1"]
        process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:

            def looked_at_all(port: int = port) -> bool:
                try:
                    return reconciled(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text) >= count
                except httpx.HTTPError:
                    return False

            wait_for(looked_at_all, timeout=60, what="the subprocess controller to look at every import")
        finally:
            process.kill()  # SIGKILL: no cleanup at all
            process.wait()

    assert [r for r in env.c2.requests if r.subresource == "token"] == []
    writes = [(r.verb, r.resource) for r in env.c1.requests if r.verb not in ("get", "list", "watch")]
    assert writes == []  # no status patch (so no condition change), no Secret write, no Event
    events = kube.Resource(env.admin1, kube.EVENTS).list("default")["items"]
    assert not [e for e in events if e["type"] == "Warning"]


def test_twenty_restarts_never_report_a_known_cluster_unknown(env: Env) -> None:
    """Sources of all three kinds (a --source-kubeconfig context, a mounted import, a bootstrapped Secret), and the
    source kubeconfig rewritten in place (truncated, then written) all along: across 20 restarts, not one
    UnknownCluster condition or Event. Workers start only once every declared source is loaded, and a short
    read of the file does not drop its clusters."""
    imports_dir = env.tmp / "controller-imports"
    mount({"data": to_secret_data(remote_credentials(env), "mounted2")}, imports_dir / "mounted2")
    bootstrap_source(env, "boot2")
    names = [f"{cluster}-{i}" for cluster in ("cluster2", "mounted2", "boot2") for i in range(4)]
    for name in names:
        env.create_import(name, clusterName=name.rsplit("-", 1)[0])
    unknown: list[str] = []  # every UnknownCluster condition the imports ever showed
    watcher = Informer(kube.Resource(env.admin1, kube.SERVICE_ACCOUNT_IMPORTS), namespace="default")

    def on_event(kind: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        for cond in (obj.get("status") or {}).get("conditions") or []:
            if cond.get("reason") == api.REASON_UNKNOWN_CLUSTER:
                unknown.append(f"{obj['metadata']['name']}: {cond.get('message')}")

    watcher.add_handler(on_event)
    watcher.start()
    assert watcher.wait_for_sync(WAIT)
    content = Path(env.source_kubeconfig).read_text()
    rewriting = threading.Event()

    def rewrite_in_place() -> None:
        while not rewriting.is_set():
            with open(env.source_kubeconfig, "w") as handle:  # truncated first: an empty file for a moment
                handle.flush()
                os.fsync(handle.fileno())
                rewriting.wait(0.02)
                handle.write(content[: len(content) // 2])  # then half of it: fewer contexts, for a moment
                handle.flush()
                rewriting.wait(0.02)
                handle.write(content[len(content) // 2 :])
            rewriting.wait(1.2)  # a file rewritten more often than once a second would never count as written

    writer = threading.Thread(target=rewrite_in_place, daemon=True)
    writer.start()
    try:
        fast = {"source_qps": 1000.0, "source_burst": 1000, "imports_dir": str(imports_dir)}
        for _ in range(20):
            controller = env.start_controller(**fast)
            wait_for(lambda: all_ready(env, names), what="every import Ready")
            wait_for(
                lambda c=controller: sum(m.get() for m in _reconciles(c)) >= len(names), what="every import looked at"
            )
            controller.stop()
    finally:
        rewriting.set()
        writer.join(5)
        watcher.stop()
    assert unknown == []
    events = kube.Resource(env.admin1, kube.EVENTS).list("default")["items"]
    assert [e["message"] for e in events if e.get("reason") == api.REASON_UNKNOWN_CLUSTER] == []


def _cached_ready(controller: Controller) -> int:
    return sum(
        1
        for imp in controller.imports.list()
        for c in (imp.get("status") or {}).get("conditions") or []
        if c.get("type") == "Ready" and c.get("status") == "True"
    )


def _reconciles(controller: Controller) -> list[Any]:
    metric = controller.metrics.reconciles
    return [metric.labels(result)._value for result in ("success", "error", "skipped", "conflict", "throttled")]


def test_a_token_of_another_account_is_refused_and_the_last_good_secret_kept(env: Env) -> None:
    # Once: whatever token the source answered was written, whoever's it was (a proxy, an impostor in front of it).
    env.start_controller()
    env.create_import("subject")
    env.wait_ready("subject")
    good = env.secret("subject")
    assert good is not None
    env.c2.token_request_answers_as = lambda namespace, name: ("default", REMOTE_SA)
    try:
        # A new spec needs a new token: the source answers one of the controller's own account there.
        imports = kube.Resource(env.admin1, kube.SERVICE_ACCOUNT_IMPORTS)
        imports.patch("subject", {"spec": {"expirationSeconds": 7200}}, "default")
        cond = env.wait_ready("subject", "False", api.REASON_TOKEN_SUBJECT_MISMATCH)
        assert f"system:serviceaccount:default:{REMOTE_SA}" in cond["message"]
        assert "default/pod-lister" in cond["message"] and "not used" in cond["message"]
        kept = env.secret("subject")
        assert kept is not None and kept["data"][api.KEY_TOKEN] == good["data"][api.KEY_TOKEN]
        assert good["data"][api.KEY_TOKEN] not in cond["message"]
    finally:
        env.c2.token_request_answers_as = None
    env.wait_ready("subject")
    assert env.secret("subject")["data"][api.KEY_TOKEN] != good["data"][api.KEY_TOKEN]
