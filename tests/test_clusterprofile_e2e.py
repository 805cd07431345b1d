"""spec.clusterProfile publishes an import as a ClusterProfile that fleet controllers use unchanged, end to end on
two in-memory clusters over HTTPS (RBAC enforced: the controller runs with manifests/controller and
manifests/clusterprofile, the consumer with `get` on one Secret).

The consumer is built as the cluster-inventory-api's pkg/access builds one (access.Config.BuildConfigFromCP): a
provider file, the ClusterProfile's matching accessProviders entry (credentialProviders as the fallback), a rest
config of its server and CA, and the exec plugin run as a subprocess with KUBERNETES_EXEC_INFO carrying the
`client.authentication.k8s.io/exec` extension; credentials are cached until their expirationTimestamp and fetched
again after a 401, as client-go's exec authenticator does.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from controller.options import Options
from controller.outputs import clusterprofile as cp
from controller.run import Controller
from controller.runtime.leader import LEASE_NAME
from kubemcsa import cli
from kubemcsa.client import connect, kube
from kubemcsa.contract import api, federation
from kubemcsa.contract.credentials import Credentials
from kubemcsa_testing.kubelet import Kubelet
from kubemcsa_testing.objects import create_file, create_or_get
from kubemcsa_testing.wait import wait_for

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
SECRETREADER = Path(__file__).resolve().parent / "kubeconfig_secretreader.py"
FLEET = "fleet"  # the consumer's namespace in cluster1, where the imports and their ClusterProfiles are
CONSUMER = "consumer"  # the fleet controller's service account there
CONTROLLER = (api.SYSTEM_NAMESPACE, "service-account-import-controller")
CLUSTER_PROFILES = kube.ResourceType(cp.API_VERSION, cp.PLURAL, cp.KIND)
EXEC_API = "client.authentication.k8s.io/v1"


def rule(group: str, resource: str, *verbs: str, names: list[str] | None = None) -> dict[str, Any]:
    found: dict[str, Any] = {"apiGroups": [group], "resources": [resource], "verbs": list(verbs)}
    if names:
        found["resourceNames"] = names
    return found


def grant(namespace: str, name: str, subject: dict[str, Any], rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rbac = "rbac.authorization.k8s.io"
    meta = {"name": name, "namespace": namespace}
    ref = {"apiGroup": rbac, "kind": "Role", "name": name}
    return [
        {"apiVersion": f"{rbac}/v1", "kind": "Role", "metadata": meta, "rules": rules},
        {"apiVersion": f"{rbac}/v1", "kind": "RoleBinding", "metadata": meta, "roleRef": ref, "subjects": [subject]},
    ]


def sa_subject(namespace: str, name: str) -> dict[str, Any]:
    return {"kind": "ServiceAccount", "namespace": namespace, "name": name}


class Env:
    def __init__(self, make_server: Callable[..., Any], tmp: Path, *, crd: bool = True, lifetime: int = 8) -> None:
        self.tmp = tmp
        self.c1 = make_server(name="cluster1")
        self.c2 = make_server(name="cluster2")
        self.admin1, self.admin2 = self.c1.admin_client(), self.c2.admin_client()
        for part in ("crd/serviceaccountimports.yaml", "crd/user-roles.yaml", "namespace.yaml"):
            create_file(self.admin1, MANIFESTS / part)
        for part in ("serviceaccount.yaml", "rbac.yaml"):
            create_file(self.admin1, MANIFESTS / "controller" / part)
        if crd:
            self.install_component()
        for ns in (FLEET, "team-a", "team-b"):
            create_or_get(self.admin1, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        self.controller_user = "system:serviceaccount:{}:{}".format(*CONTROLLER)
        self.controller_client = self.c1.client_for_token(self.c1.issue_token(*CONTROLLER))
        sa = {"apiVersion": "v1", "kind": "ServiceAccount"}
        create_or_get(self.admin1, {**sa, "metadata": {"name": CONSUMER, "namespace": FLEET}})
        # cluster2: `deployer` may list pods in default and nothing else; its owner exports it to cluster1.
        exported = {"labels": {api.EXPORTED_LABEL: "true"}, "annotations": {api.EXPORT_TO_ANNOTATION: "cluster1/*"}}
        create_or_get(self.admin2, {**sa, "metadata": {"name": "deployer", "namespace": "default", **exported}})
        for obj in grant("default", "deployer", sa_subject("default", "deployer"), [rule("", "pods", "list")]):
            create_or_get(self.admin2, obj)
        create_or_get(self.admin2, {**sa, "metadata": {"name": "importer", "namespace": "default"}})
        importer = [rule("", "serviceaccounts/token", "create"), rule("", "serviceaccounts", "list", "watch")]
        for obj in grant("default", "importer", sa_subject("default", "importer"), importer):
            create_or_get(self.admin2, obj)
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "default"}}
        create_or_get(self.admin2, {**pod, "spec": {"containers": [{"name": "web", "image": "nginx"}]}})
        token = self.c2.issue_token("default", "importer")
        self.sources = self.c2.write_kubeconfig(tmp / "sources", context="cluster2", token=token)
        # Only the imports' tokens live `lifetime`: the controller's own credential (a static kubeconfig nobody
        # refreshes) is issued before the cap, or a test longer than that on a loaded machine would meet a 401.
        self.c2.max_token_expiration_seconds = lifetime
        self.imports = kube.Resource(self.admin1, kube.SERVICE_ACCOUNT_IMPORTS)
        self.profiles = kube.Resource(self.admin1, CLUSTER_PROFILES)
        self.controller: Controller | None = None

    def install_component(self) -> None:
        for part in ("crd.yaml", "rbac.yaml"):
            create_file(self.admin1, MANIFESTS / "clusterprofile" / part)

    def start(self, **extra: Any) -> Controller:
        settings = {"leader_election": False, "file_poll_seconds": 0.1, "backoff_base": 0.1, "backoff_max": 1.0}
        options = Options(source_kubeconfig=self.sources, cluster_name="cluster1", **{**settings, **extra})
        self.controller = Controller(self.controller_client, options).start()
        assert self.controller.wait_until_ready(30)
        return self.controller

    def consumer_kubeconfig(self, secret: str) -> str:
        """The fleet controller's own kubeconfig in cluster1 (its token), allowed to get that one Secret."""
        rules = [rule("", "secrets", "get", names=[secret])]
        for obj in grant(FLEET, f"read-{secret}", sa_subject(FLEET, CONSUMER), rules):
            create_or_get(self.admin1, obj)
        token = self.c1.issue_token(FLEET, CONSUMER)
        path = self.tmp / f"consumer-{secret}.kubeconfig"
        return self.c1.write_kubeconfig(path, context="cluster1", token=token)

    def create_import(
        self, import_name: str, namespace: str = FLEET, client: ApiClient | None = None, **spec: Any
    ) -> dict[str, Any]:
        body = {"clusterName": "cluster2", "namespace": "default", "name": "deployer", "clusterProfile": {}, **spec}
        body = {key: value for key, value in body.items() if value is not None}
        obj = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": import_name}, "spec": body}
        return kube.Resource(client or self.admin1, kube.SERVICE_ACCOUNT_IMPORTS).create(obj, namespace)

    def condition(self, name: str, kind: str, namespace: str = FLEET) -> dict[str, Any] | None:
        status = self.imports.get(name, namespace).get("status") or {}
        return next((c for c in status.get("conditions") or [] if c["type"] == kind), None)

    def wait_condition(self, name: str, kind: str, status: str, reason: str, namespace: str = FLEET) -> dict:
        def holds() -> dict[str, Any] | None:
            found = self.condition(name, kind, namespace)
            return found if found and (found["status"], found["reason"]) == (status, reason) else None

        return wait_for(holds, what=f"{namespace}/{name}: {kind}={status} {reason}")

    def profile(self, name: str, namespace: str = FLEET) -> dict[str, Any] | None:
        try:
            return self.profiles.get(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def controller_calls(self) -> set[tuple[str, str, str]]:
        return {(r.verb, r.resource, r.subresource) for r in self.c1.requests if r.user == self.controller_user}


@pytest.fixture
def make_env(api_server_factory, tmp_path) -> Iterator[Callable[..., Env]]:
    envs: list[Env] = []

    def make(**kwargs: Any) -> Env:
        envs.append(Env(api_server_factory, tmp_path, **kwargs))
        return envs[-1]

    yield make
    for env in envs:
        if env.controller is not None:
            env.controller.stop()


# --- a consumer as pkg/access builds one -------------------------------------------------------------------------


def provider_file(path: Path, name: str, command: str, args: list[str], env: dict[str, str]) -> Path:
    """A consumer's --clusterprofile-provider-file (pkg/access Config), as MultiKueue or Argo CD configure it."""
    exec_config = {
        "apiVersion": EXEC_API,
        "command": command,
        "args": args,
        "env": [{"name": key, "value": value} for key, value in env.items()],
        "provideClusterInfo": True,
    }
    path.write_text(json.dumps({"providers": [{"name": name, "execConfig": exec_config}]}))
    return path


class ExecClient:
    """What access.Config.BuildConfigFromCP makes of a ClusterProfile, driven like client-go's exec authenticator."""

    def __init__(self, provider_path: Path, profile: dict[str, Any], clock: Callable[[], float] = time.time):
        providers = json.loads(provider_path.read_text())["providers"]
        status = profile.get("status") or {}
        # credentialProviders first, then accessProviders over them (the deprecated name loses on a tie).
        by_name = {p["name"]: p for p in status.get("credentialProviders") or []}
        by_name.update({p["name"]: p for p in status.get("accessProviders") or []})
        chosen = next((p for p in providers if p["name"] in by_name), None)
        assert chosen is not None, "no matching cluster accessor found"
        self.exec_config = chosen["execConfig"]
        self.cluster = by_name[chosen["name"]]["cluster"]
        self.server = self.cluster["server"]
        self.ca_pem = base64.b64decode(self.cluster["certificate-authority-data"])
        extensions = {e["name"]: e["extension"] for e in self.cluster.get("extensions") or []}
        self.extension = extensions.get(cp.EXEC_EXTENSION)
        self.clock = clock
        self.token: str | None = None
        self.expires_at: float | None = None
        self.runs = 0

    def exec_info(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"interactive": False}
        if self.exec_config.get("provideClusterInfo"):
            cluster = {"server": self.server, "certificate-authority-data": self.cluster["certificate-authority-data"]}
            if self.extension is not None:
                cluster["config"] = self.extension
            spec["cluster"] = cluster
        return {"apiVersion": self.exec_config["apiVersion"], "kind": "ExecCredential", "spec": spec}

    def run_plugin(self) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **{e["name"]: e["value"] for e in self.exec_config.get("env") or []}}
        env["KUBERNETES_EXEC_INFO"] = json.dumps(self.exec_info())
        argv = [self.exec_config["command"], *(self.exec_config.get("args") or [])]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)

    def credential(self) -> str:
        if self.token is not None and (self.expires_at is None or self.clock() < self.expires_at):
            return self.token
        done = self.run_plugin()
        self.runs += 1
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert (answer["apiVersion"], answer["kind"]) == (EXEC_API, "ExecCredential")
        self.token = answer["status"]["token"]
        expiry = answer["status"].get("expirationTimestamp")
        from kubemcsa.contract.timefmt import parse_time

        self.expires_at = parse_time(expiry) if expiry else None
        return self.token

    def call(self, request: Callable[[ApiClient], Any]) -> Any:
        """One request; after a 401 the credential is fetched again and the request retried once (client-go)."""
        for attempt in (1, 2):
            client = connect.client_for_credentials(Credentials(self.server, self.ca_pem, self.credential(), "default"))
            try:
                return request(client)
            except ApiException as exc:
                if exc.status != 401 or attempt == 2:
                    raise
                self.token = None
            finally:
                client.close()
        raise AssertionError("unreachable")

    def list_pods(self, namespace: str) -> list[str]:
        answer = self.call(lambda client: kube.Resource(client, kube.PODS).list(namespace))
        return [item["metadata"]["name"] for item in answer["items"]]

    def status_of(self, request: Callable[[ApiClient], Any]) -> int:
        try:
            self.call(request)
        except ApiException as exc:
            return exc.status
        return 200


def lists_exactly_what_it_may(client: ExecClient) -> None:
    assert client.list_pods("default") == ["web"]
    assert client.status_of(lambda c: kube.Resource(c, kube.PODS).list("kube-system")) == 403
    assert client.status_of(lambda c: kube.Resource(c, kube.SECRETS).list("default")) == 403
    assert client.status_of(lambda c: kube.Resource(c, kube.PODS).get("web", "default")) == 403


def kubemcsa_command() -> tuple[str, list[str]]:
    return sys.executable, ["-m", "kubemcsa.cli", "credentials"]


# --- TokenRequest imports -----------------------------------------------------------------------------------------


def test_a_cluster_profile_works_with_kubeconfig_secretreader_and_kubemcsa_and_survives_rotation(make_env) -> None:
    env = make_env()
    env.start()
    env.create_import("prod")
    env.wait_condition("prod", "Ready", "True", api.REASON_TOKEN_ISSUED)
    cond = env.wait_condition("prod", cp.CONDITION_CLUSTER_PROFILE, "True", cp.REASON_WRITTEN)
    assert "kubeconfig-secretreader" in cond["message"]
    profile = wait_for(lambda: env.profile("prod"), what="the ClusterProfile")
    meta = profile["metadata"]
    assert meta["labels"][cp.CLUSTER_MANAGER_LABEL] == cp.CLUSTER_MANAGER == profile["spec"]["clusterManager"]["name"]
    owner = meta["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == (api.KIND, "prod", True)
    status = profile["status"]
    assert status["accessProviders"] == status["credentialProviders"]
    assert {p["name"] for p in status["accessProviders"]} == {cp.PROVIDER_SECRETREADER, cp.PROVIDER_KUBEMCSA}
    assert status["version"]["kubernetes"] == "v1.36.0-kubemcsa"
    healthy = next(c for c in status["conditions"] if c["type"] == cp.CONDITION_HEALTHY)
    assert healthy["status"] == "True" and healthy["lastTransitionTime"]
    for provider in status["accessProviders"]:
        assert provider["cluster"]["server"] == env.c2.url
        assert base64.b64decode(provider["cluster"]["certificate-authority-data"]) == env.c2.ca_pem
    secret_token = base64.b64decode(kube.Resource(env.admin1, kube.SECRETS).get("prod-token", FLEET)["data"]["token"])
    assert secret_token.decode() not in json.dumps(profile)  # no credential in the profile, only where it is

    kubeconfig = env.consumer_kubeconfig("prod-token")
    # The consumer runs outside cluster1's pods here: no in-cluster config, its own kubeconfig instead.
    plain = {"KUBECONFIG": kubeconfig, "KUBERNETES_SERVICE_HOST": ""}
    command, args = kubemcsa_command()
    now = [time.time()]
    clients = {
        "secretreader": ExecClient(
            provider_file(env.tmp / "p1.json", cp.PROVIDER_SECRETREADER, sys.executable, [str(SECRETREADER)], plain),
            profile,
            clock=lambda: now[0],
        ),
        "kubemcsa": ExecClient(
            provider_file(env.tmp / "p2.json", cp.PROVIDER_KUBEMCSA, command, args, plain),
            profile,
            clock=lambda: now[0],
        ),
    }
    assert clients["secretreader"].extension == {"name": "prod-token", "namespace": FLEET, "key": "config"}
    for client in clients.values():
        lists_exactly_what_it_may(client)
    assert clients["secretreader"].expires_at is None  # upstream's plugin gives none: client-go waits for a 401
    assert clients["kubemcsa"].expires_at is not None

    # The controller rotates the token under them: the new one is picked up (at expiry, or after a 401).
    first = clients["kubemcsa"].token
    secrets = kube.Resource(env.admin1, kube.SECRETS)

    def rotated() -> bool:
        data = secrets.get("prod-token", FLEET)["data"]
        return base64.b64decode(data["token"]).decode() != first

    wait_for(rotated, what="a token refresh", timeout=60)
    now[0] = max(now[0], clients["kubemcsa"].expires_at or 0) + 1  # the cached credential's expiry passes
    assert clients["kubemcsa"].list_pods("default") == ["web"]
    assert clients["kubemcsa"].token != first and clients["kubemcsa"].runs == 2
    stale = clients["secretreader"].token
    assert stale is not None
    wait_for(lambda: time.time() > _exp(stale) + 1, what="the first token's expiry", timeout=60)
    assert clients["secretreader"].list_pods("default") == ["web"]  # 401 with the old token, then the new one
    assert clients["secretreader"].token != stale and clients["secretreader"].runs == 2

    # Dropping spec.clusterProfile deletes the ClusterProfile (with preconditions) and the condition.
    env.imports.patch("prod", {"spec": {"clusterProfile": None}}, FLEET)
    wait_for(lambda: env.profile("prod") is None, what="the ClusterProfile's deletion")
    wait_for(lambda: env.condition("prod", cp.CONDITION_CLUSTER_PROFILE) is None, what="the condition to go")
    assert env.condition("prod", "Ready")["status"] == "True"


def test_a_source_down_turns_its_profile_unhealthy_though_no_import_calls_it(make_env) -> None:
    """An import whose token is valid for an hour makes no call to its source, yet its ClusterProfile's health
    follows the source: the controller's watch of the source's exports says when it stops and starts answering.
    The import's token is kept meanwhile (it is still valid)."""
    env = make_env(lifetime=3600)
    env.start(reachability_hold_seconds=0.5)
    env.create_import("prod")
    env.wait_condition("prod", "Ready", "True", api.REASON_TOKEN_ISSUED)

    def health(status: str) -> dict[str, Any] | None:
        profile = env.profile("prod") or {}
        found = [c for c in (profile.get("status") or {}).get("conditions") or [] if c["type"] == cp.CONDITION_HEALTHY]
        return found[0] if found and found[0]["status"] == status else None

    wait_for(lambda: health("True"), what="ControlPlaneHealthy=True")
    secret = kube.Resource(env.admin1, kube.SECRETS).get("prod-token", FLEET)

    env.c2.make_unreachable()
    down = wait_for(lambda: health("False"), what="ControlPlaneHealthy=False while cluster2 is down")
    assert down["reason"] == "Unreachable" and "cluster2 does not answer" in down["message"]
    assert env.condition("prod", "Ready")["status"] == "True"  # its token is still valid: nothing is lost
    assert kube.Resource(env.admin1, kube.SECRETS).get("prod-token", FLEET)["data"] == secret["data"]
    reachable = 'kubemcsa_controller_source_reachable{cluster="cluster2"}'
    assert f"{reachable} 0.0" in env.controller.metrics.exposition().decode()  # what the alert reads

    env.c2.make_reachable()
    up = wait_for(lambda: health("True"), what="ControlPlaneHealthy=True once cluster2 answers again")
    assert up["reason"] == "Reachable"
    assert f"{reachable} 1.0" in env.controller.metrics.exposition().decode()


def test_a_federated_source_down_turns_its_profiles_unhealthy(make_env, capsys, tmp_path) -> None:
    """The controller makes no call to a federated source once its imports are Ready (their pods present their
    own tokens to it), so it asks the source's /version, without credentials, once per federated_probe_seconds
    whatever its number of imports (tests/test_source_versions.py counts the calls), and the imports'
    ClusterProfiles follow the answer. cluster2 is also a token source here: the federated imports' health must
    follow the probe, not the token source's export watch."""
    env = make_env(lifetime=3600)
    federate_cluster2(env, capsys, tmp_path)
    controller = env.start(reachability_hold_seconds=0.5, federated_probe_seconds=0.5)
    names = [f"fed-{i}" for i in range(5)]
    for name in names:
        env.create_import(name, tokenType="Federated", name=None)
    for name in names:
        env.wait_condition(name, cp.CONDITION_CLUSTER_PROFILE, "True", cp.REASON_WRITTEN)

    def health(name: str, status: str) -> dict[str, Any] | None:
        profile = env.profile(name) or {}
        found = [c for c in (profile.get("status") or {}).get("conditions") or [] if c["type"] == cp.CONDITION_HEALTHY]
        return found[0] if found and found[0]["status"] == status else None

    wait_for(lambda: all(health(name, "True") for name in names), what="every ControlPlaneHealthy=True")
    # A namespace user's import cannot aim the probe elsewhere: only recorded federated sources are asked.
    env.create_import("elsewhere", tokenType="Federated", name=None, clusterName="attacker")
    env.wait_condition("elsewhere", "Ready", "False", api.REASON_UNKNOWN_CLUSTER)
    assert [source.cluster_name for source in controller._federated_in_use()] == ["cluster2"]
    reachable = 'kubemcsa_controller_source_reachable{cluster="cluster2"}'
    wait_for(lambda: f"{reachable} 1.0" in controller.metrics.exposition().decode(), what="the metric for cluster2")

    env.c2.make_unreachable()
    for name in names:
        down = wait_for(lambda n=name: health(n, "False"), what=f"{name}'s ControlPlaneHealthy=False")
        assert down["reason"] == "Unreachable" and "cluster2 does not answer" in down["message"]
        assert "eyJ" not in down["message"]
        assert env.condition(name, "Ready")["status"] == "True"  # its pods' tokens are cluster1's: nothing lost
    assert f"{reachable} 0.0" in controller.metrics.exposition().decode()  # what the alert reads

    env.c2.make_reachable()
    for name in names:
        up = wait_for(lambda n=name: health(n, "True"), what=f"{name}'s ControlPlaneHealthy=True again")
        assert up["reason"] == "Reachable"
    assert f"{reachable} 1.0" in controller.metrics.exposition().decode()


def test_a_standby_replica_asks_no_federated_source(make_env, capsys, tmp_path) -> None:
    """The manifests run two replicas: only the leader's probe can reach an import, so a standby asks nothing of
    the federated sources (one anonymous call per source every period would double with the replicas)."""
    env = make_env(lifetime=3600)
    federate_cluster2(env, capsys, tmp_path)
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
    held = {"holderIdentity": "the-leader", "leaseDurationSeconds": 3600, "acquireTime": now, "renewTime": now}
    lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "spec": held}
    lease["metadata"] = {"name": LEASE_NAME, "namespace": api.SYSTEM_NAMESPACE}
    kube.Resource(env.admin1, kube.LEASES).create(lease, api.SYSTEM_NAMESPACE)
    controller = env.start(leader_election=True, federated_probe_seconds=0.1)
    env.create_import("fed", tokenType="Federated", name=None)
    wait_for(controller._federated_in_use, what="the federated import in the standby's caches")
    controller._probe_federated()
    assert not controller.is_leader
    assert controller.reconciler.versions.calls == 0 and controller._probed_federated == frozenset()
    assert env.condition("fed", "Ready") is None  # nor does it write


def _exp(token: str) -> float:
    from kubemcsa.client.tokens import unverified_claims

    return float(unverified_claims(token)["exp"])


def test_kubemcsa_credentials_says_why_in_one_sentence_and_prints_no_token(make_env) -> None:
    env = make_env(lifetime=3600)
    env.start(reachability_hold_seconds=0.5)
    env.create_import("prod")
    env.wait_condition("prod", cp.CONDITION_CLUSTER_PROFILE, "True", cp.REASON_WRITTEN)
    profile = env.profile("prod")
    # Not granted `get` on that Secret: refused, with the way out; no token anywhere in the output.
    token = env.c1.issue_token(FLEET, CONSUMER)
    kubeconfig = env.c1.write_kubeconfig(env.tmp / "nogrant", context="cluster1", token=token)
    command, args = kubemcsa_command()
    plain = {"KUBECONFIG": kubeconfig, "KUBERNETES_SERVICE_HOST": ""}
    client = ExecClient(provider_file(env.tmp / "p.json", cp.PROVIDER_KUBEMCSA, command, args, plain), profile)
    done = client.run_plugin()
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "grant it get on that Secret" in done.stderr
    assert "eyJ" not in done.stderr


# --- a federated import -------------------------------------------------------------------------------------------


def federate_cluster2(env: Any, capsys, tmp_path: Path) -> None:
    """cluster2 trusts cluster1's tokens (`kubemcsa federate`, its printed stanza applied), and the fleet
    controller's account of cluster1 may list pods in cluster2's default."""
    paths = {}
    for server in (env.c1, env.c2):
        paths[server.name] = server.write_kubeconfig(tmp_path / f"{server.name}.admin", context=server.name)
    argv = ["federate", "--target-context", "cluster1", "--target-kubeconfig", paths["cluster1"]]
    assert cli.main([*argv, "--source-context", "cluster2", "--source-kubeconfig", paths["cluster2"]]) == 0
    out = capsys.readouterr().out
    start = out.index("apiVersion: apiserver.config.k8s.io")
    env.c2.configure_authentication(yaml.safe_load(out[start : out.index("\n\n", start)]))
    remote_user = f"cluster1:system:serviceaccount:{FLEET}:{CONSUMER}"
    user = {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": remote_user}
    for obj in grant("default", "fleet-consumer", user, [rule("", "pods", "list")]):
        create_or_get(env.admin2, obj)


def test_a_federated_import_publishes_only_the_kubemcsa_provider_reading_the_projected_token(
    make_env, capsys, tmp_path
) -> None:
    env = make_env(lifetime=3600)
    federate_cluster2(env, capsys, tmp_path)
    env.start()
    env.create_import("fed", tokenType="Federated", name=None)
    env.wait_condition("fed", "Ready", "True", api.REASON_FEDERATED)
    env.wait_condition("fed", cp.CONDITION_CLUSTER_PROFILE, "True", cp.REASON_WRITTEN)
    profile = env.profile("fed")
    (provider,) = profile["status"]["accessProviders"]  # kubeconfig-secretreader cannot read a tokenFile
    assert provider["name"] == cp.PROVIDER_KUBEMCSA
    token_file = api.mount_path_for_import("fed") + "/token"
    assert provider["cluster"]["extensions"] == [{"name": cp.EXEC_EXTENSION, "extension": {"tokenFile": token_file}}]
    assert profile["status"]["version"]["kubernetes"] == "v1.36.0-kubemcsa"  # asked without credentials

    # The fleet controller's pod carries the import's annotation: the webhook mounts the projected token (here as
    # the webhook writes it), the kubelet stand-in writes and rotates it.
    volume_name = api.volume_name_for_import("fed")
    audience = federation.FederatedSource("cluster2", env.c2.url, env.c2.ca_pem, "cluster2", "cluster1:").audience
    mount = {"name": volume_name, "mountPath": api.mount_path_for_import("fed"), "readOnly": True}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "fleet", "namespace": FLEET, "annotations": {api.IMPORT_ANNOTATION: "fed"}},
        "spec": {
            "serviceAccountName": CONSUMER,
            "containers": [{"name": "manager", "image": "fleet", "volumeMounts": [mount]}],
            "volumes": [federation.projected_volume(volume_name, "fed-token", audience, 3600)],
        },
    }
    kube.Resource(env.admin1, kube.PODS).create(pod, FLEET)
    kubelet = Kubelet(env.c1, tmp_path / "kubelet")
    kubelet.mount(FLEET, "fleet")
    container_root = kubelet.container_root(FLEET, "fleet", "manager")
    # The plugin runs in that container: its `/` is the kubelet's container root (the extension's path below it).
    in_container = str(container_root / token_file.lstrip("/"))
    command, args = kubemcsa_command()
    now = [time.time()]
    client = ExecClient(
        provider_file(tmp_path / "p.json", cp.PROVIDER_KUBEMCSA, command, [*args, "--token-file", in_container], {}),
        profile,
        clock=lambda: now[0],
    )
    lists_exactly_what_it_may(client)
    first = client.token
    assert first == Path(in_container).read_text().strip()

    # A new projected token (tokens of the same second are equal: rotate until the file changes); client-go
    # reads it once its cached credential expires.
    wait_for(lambda: kubelet.rotate() and Path(in_container).read_text().strip() != first, what="a rotation")
    now[0] = (client.expires_at or now[0]) + 1
    assert client.list_pods("default") == ["web"]
    assert client.token == Path(in_container).read_text().strip() != first


def test_the_plugin_reads_the_extension_from_kubernetes_exec_info(tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("header.eyJleHAiOjQxMDI0NDQ4MDB9.sig\n")
    info = {"apiVersion": EXEC_API, "kind": "ExecCredential", "spec": {"cluster": {"server": "https://x"}}}
    info["spec"]["cluster"]["config"] = {"tokenFile": str(token_file)}
    env = {**os.environ, "KUBERNETES_EXEC_INFO": json.dumps(info)}
    command, args = kubemcsa_command()
    done = subprocess.run([command, *args], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["status"]["token"] == "header.eyJleHAiOjQxMDI0NDQ4MDB9.sig"
    assert answer["status"]["expirationTimestamp"]


# --- the CRD is optional ------------------------------------------------------------------------------------------


def test_without_the_crd_the_controller_runs_and_the_import_says_why_then_recovers(make_env) -> None:
    env = make_env(crd=False, lifetime=3600)
    env.c1.reset_requests()
    env.start(output_recheck_seconds=1.0)
    env.create_import("prod")
    env.wait_condition("prod", "Ready", "True", api.REASON_TOKEN_ISSUED)
    cond = env.wait_condition("prod", cp.CONDITION_CLUSTER_PROFILE, "False", cp.REASON_CRD_MISSING)
    assert "manifests/clusterprofile" in cond["message"]
    assert not [r for r in env.c1.requests if r.user == env.controller_user and r.resource == cp.PLURAL]
    # Only discovery, asked again once a second here (a minute by default) while an import asks for the output.
    asked = [r for r in env.c1.requests if r.user == env.controller_user and f"/{cp.GROUP}/" in r.path]
    assert 1 <= len(asked) <= 2 + int(time.monotonic() - asked[0].at) and {r.code for r in asked} == {404}
    env.install_component()
    env.wait_condition("prod", cp.CONDITION_CLUSTER_PROFILE, "True", cp.REASON_WRITTEN)
    assert env.profile("prod") is not None


# --- least privilege and the attacker --------------------------------------------------------------------------


def _granted(*paths: Path) -> set[tuple[str, str, str]]:
    granted = set()
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] in ("ClusterRole", "Role"):
                for one in doc["rules"]:
                    for resource in one["resources"]:
                        name, _, sub = resource.partition("/")
                        granted |= {(verb, name, sub) for verb in one["verbs"]}
    return granted


def test_every_verb_the_component_grants_is_one_the_controller_uses(make_env) -> None:
    env = make_env(lifetime=3600)
    env.c1.reset_requests()
    env.start()
    env.create_import("used")
    wait_for(lambda: env.profile("used"), what="the ClusterProfile")
    # Someone strips our label: the controller puts it back (an update); dropping the field deletes it.
    wait_for(lambda: ("update", cp.PLURAL, "status") in env.controller_calls(), what="the status write")
    profile = env.profile("used")
    del profile["metadata"]["labels"][cp.CLUSTER_MANAGER_LABEL]
    env.profiles.replace(profile, FLEET)
    wait_for(lambda: ("update", cp.PLURAL, "") in env.controller_calls(), what="the label restored")
    env.imports.patch("used", {"spec": {"clusterProfile": None}}, FLEET)
    wait_for(lambda: ("delete", cp.PLURAL, "") in env.controller_calls(), what="the deletion")
    refused = [r.path for r in env.c1.requests if r.user == env.controller_user and r.code in (401, 403)]
    assert not refused
    granted = _granted(MANIFESTS / "clusterprofile" / "rbac.yaml")
    assert granted - env.controller_calls() == set()


def test_a_namespace_user_cannot_place_or_take_over_a_cluster_profile(make_env) -> None:
    env = make_env(lifetime=3600)
    rbac = "rbac.authorization.k8s.io"
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "alice", "namespace": "team-a"}}
    create_or_get(env.admin1, sa)
    binding = {
        "apiVersion": f"{rbac}/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "alice-edit", "namespace": "team-a"},
        "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": "edit"},
        "subjects": [sa_subject("team-a", "alice")],
    }
    create_or_get(env.admin1, binding)
    alice_client = env.c1.client_for_token(env.c1.issue_token("team-a", "alice"))
    env.start()
    # A foreign ClusterProfile (another cluster manager's) with the name alice's import will use, and another
    # import's ClusterProfile in team-b.
    foreign = {
        "apiVersion": cp.API_VERSION,
        "kind": cp.KIND,
        "metadata": {"name": "taken", "namespace": "team-a", "labels": {cp.CLUSTER_MANAGER_LABEL: "ocm"}},
        "spec": {"clusterManager": {"name": "ocm"}},
    }
    foreign = env.profiles.create(foreign, "team-a")
    env.create_import("theirs", namespace="team-b")
    wait_for(lambda: env.profile("theirs", "team-b"), what="team-b's ClusterProfile")

    profiles = kube.Resource(alice_client, CLUSTER_PROFILES)
    mine = {**foreign, "metadata": {"name": "direct", "namespace": "team-a"}}
    for namespace in ("team-a", "team-b"):  # no right to write ClusterProfiles at all
        with pytest.raises(ApiException) as info:
            profiles.create({**mine, "metadata": {"name": "direct", "namespace": namespace}}, namespace)
        assert info.value.status == 403
    with pytest.raises(ApiException) as info:  # nor imports outside team-a
        env.create_import("theirs", namespace="team-b", client=alice_client)
    assert info.value.status == 403
    # An import in team-a asking for a namespace elsewhere: its ClusterProfile is in team-a, always.
    env.create_import("mine", namespace="team-a", client=alice_client)
    wait_for(lambda: env.profile("mine", "team-a"), what="alice's ClusterProfile")
    assert env.profile("mine", "team-b") is None
    # Named like the foreign one: never overwritten, and the import says why.
    env.create_import("taken", namespace="team-a", client=alice_client)
    cond = env.wait_condition("taken", cp.CONDITION_CLUSTER_PROFILE, "False", cp.REASON_CONFLICT, namespace="team-a")
    assert "not controlled by this import" in cond["message"]
    after = env.profile("taken", "team-a")
    assert after["metadata"]["resourceVersion"] == foreign["metadata"]["resourceVersion"]
    assert after["spec"]["clusterManager"]["name"] == "ocm"
    # And the cluster manager of a ClusterProfile cannot be changed by anyone (the CRD's CEL rule).
    after["spec"]["clusterManager"]["name"] = cp.CLUSTER_MANAGER
    with pytest.raises(ApiException) as info:
        env.profiles.replace(after, "team-a")
    assert info.value.status == 422


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (pip install -e '.[test]')")
def test_the_component_renders_onto_the_base(tmp_path) -> None:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base, component = (os.path.relpath(MANIFESTS / part, overlay) for part in ("", "clusterprofile"))
    kustomization = {"resources": [base], "components": [component]}
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    rendered = subprocess.run(
        [shutil.which("kubectl") or "kubectl", "kustomize", str(overlay)], capture_output=True, text=True, check=True
    ).stdout
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in yaml.safe_load_all(rendered) if doc}
    assert ("CustomResourceDefinition", f"{cp.PLURAL}.{cp.GROUP}") in kinds
    assert ("ClusterRole", "multicluster-service-account:service-account-import-controller:clusterprofiles") in kinds
