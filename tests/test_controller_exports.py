"""Who may import what, end to end and as an attacker would try it: two clusters (in memory, and real ones with
KUBEBUILDER_ASSETS), RBAC enforced.

cluster1 runs the controller with its own service account bound to manifests/controller's RBAC, and the webhook's
service account exists with manifests/webhook's RBAC (to play the attacker). cluster2 is the source, bootstrapped
with the real `kubemcsa bootstrap` (no open grant). In cluster2, `kube-system/admin-bot` is bound to cluster-admin
and `team-x/bot` may list pods in team-x. In cluster1, `alice` may only create and read imports and read Secrets
in `team-a`.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from controller.options import Options
from controller.run import Controller
from kubemcsa import cli
from kubemcsa.client import kube
from kubemcsa.contract import api
from kubemcsa.contract.credentials import Credentials, from_secret_data, to_secret_data
from kubemcsa_testing import ApiServer
from kubemcsa_testing.objects import create_or_get
from kubemcsa_testing.wait import wait_for

# On both tiers: the clusters are fresh in-memory servers or the session's real control planes, reset.
pytestmark = pytest.mark.real_tier

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
SYSTEM = api.SYSTEM_NAMESPACE
RBAC = "rbac.authorization.k8s.io"
CONTROLLER_SA = "service-account-import-controller"
WEBHOOK_SA = "service-account-import-admission-controller"
CERT_JOB_SA = "service-account-import-admission-controller-certs"
CONSUMER_USER = api.consumer_username("cluster1")  # the controller's identity in cluster2


def apply(client: ApiClient, *objs: dict[str, Any]) -> None:
    for obj in objs:
        if obj:
            create_or_get(client, obj)


def grant(namespace: str, name: str, rules: list[dict], subject: tuple[str, str]) -> list[dict[str, Any]]:
    meta = {"name": name, "namespace": namespace}
    return [
        {"apiVersion": f"{RBAC}/v1", "kind": "Role", "metadata": meta, "rules": rules},
        {
            "apiVersion": f"{RBAC}/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": RBAC, "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "namespace": subject[0], "name": subject[1]}],
        },
    ]


def namespace(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def service_account(ns: str, name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}}


class Env:
    def __init__(self, c1: Any, c2: Any, tmp: Path, *bootstrap_flags: str) -> None:
        self.c1, self.c2, self.tmp = c1, c2, tmp
        self.admin1, self.admin2 = c1.admin_client(), c2.admin_client()
        for path in ("crd/serviceaccountimports.yaml", "crd/user-roles.yaml", "namespace.yaml"):
            apply(self.admin1, *yaml.safe_load_all((MANIFESTS / path).read_text()))
        for component in ("controller", "webhook"):
            for path in ("serviceaccount.yaml", "rbac.yaml"):
                apply(self.admin1, *yaml.safe_load_all((MANIFESTS / component / path).read_text()))
        for ns in ("team-a", "team-b"):
            apply(self.admin1, namespace(ns))
        # alice: only import rights in team-a (and reading its Secrets, to use what she imports).
        apply(self.admin1, service_account("team-a", "alice"))
        rules = [
            {"apiGroups": [api.GROUP], "resources": [api.PLURAL], "verbs": ["create", "get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]},
        ]
        apply(self.admin1, *grant("team-a", "importer", rules, ("team-a", "alice")))
        self.alice = self.as_user1("team-a", "alice")

        apply(self.admin2, namespace("team-x"))
        apply(self.admin2, service_account("kube-system", "admin-bot"), service_account("team-x", "bot"))
        admin_binding = {
            "apiVersion": f"{RBAC}/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "admin-bot"},
            "roleRef": {"apiGroup": RBAC, "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"kind": "ServiceAccount", "namespace": "kube-system", "name": "admin-bot"}],
        }
        apply(self.admin2, admin_binding)
        pods = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
        apply(self.admin2, *grant("team-x", "pod-lister", pods, ("team-x", "bot")))

        self.kubeconfigs = {}
        for server in (c1, c2):
            self.kubeconfigs[server.name] = str(tmp / f"{server.name}.yaml")
            server.write_kubeconfig(self.kubeconfigs[server.name], context=server.name)
        argv = ["bootstrap", "--target-context", "cluster1", "--target-kubeconfig", self.kubeconfigs["cluster1"]]
        argv += ["--source-context", "cluster2", "--source-kubeconfig", self.kubeconfigs["cluster2"]]
        self.bootstrap_argv = [*argv, *bootstrap_flags]
        assert cli.main(self.bootstrap_argv) == 0
        self.controller: Controller | None = None

    def as_user1(self, ns: str, name: str) -> ApiClient:
        return self.c1.client_for_token(self.c1.issue_token(ns, name))

    def start(self, **options: Any) -> Controller:
        settings = {"leader_election": False, "file_poll_seconds": 0.1, "backoff_base": 0.1, "backoff_max": 1.0}
        self.controller = Controller(self.as_user1(SYSTEM, CONTROLLER_SA), Options(**{**settings, **options}))
        self.controller.start()
        assert self.controller.wait_until_ready(30)
        wait_for(lambda: self.controller.exports.has_synced("cluster2"), what="cluster2's export watch")
        return self.controller

    def controller_credential(self) -> str:
        """The controller's own token for cluster2, as bootstrap stored it (what a compromised controller has)."""
        secret = kube.Resource(self.admin1, kube.SECRETS).get(api.secret_name_for_import("cluster2"), SYSTEM)
        return from_secret_data(secret["data"]).token

    def allow(self, verb: str, *args: str) -> None:
        """`kubemcsa allow|disallow bot -n team-x --context cluster2 ARGS`, as the source's admin runs it."""
        where = ["--context", "cluster2", "--kubeconfig", self.kubeconfigs["cluster2"]]
        assert cli.main([verb, "bot", "-n", "team-x", *where, *args]) == 0

    def create_import(self, import_name: str, ns: str = "team-a", client: ApiClient | None = None, **spec: Any) -> dict:
        body = {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "metadata": {"name": import_name, "namespace": ns},
            "spec": {"clusterName": "cluster2", "namespace": "team-x", "name": "bot", **spec},
        }
        return kube.Resource(client or self.admin1, kube.SERVICE_ACCOUNT_IMPORTS).create(body, ns)

    def ready(self, name: str, ns: str = "team-a") -> dict[str, Any] | None:
        status = kube.Resource(self.admin1, kube.SERVICE_ACCOUNT_IMPORTS).get(name, ns).get("status") or {}
        return next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)

    def wait_ready(self, name: str, status: str = "True", reason: str | None = None, ns: str = "team-a") -> dict:
        def check() -> dict[str, Any] | None:
            cond = self.ready(name, ns)
            return cond if cond and cond["status"] == status and reason in (None, cond["reason"]) else None

        return wait_for(check, what=f"import {ns}/{name} Ready={status} {reason or ''}")

    def secret(self, name: str, ns: str = "team-a") -> dict[str, Any] | None:
        try:
            return kube.Resource(self.admin1, kube.SECRETS).get(api.secret_name_for_import(name), ns)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def token_in(self, name: str, ns: str = "team-a") -> str | None:
        data = (self.secret(name, ns) or {}).get("data") or {}
        return base64.b64decode(data[api.KEY_TOKEN]).decode() if api.KEY_TOKEN in data else None

    def events(self, ns: str, reason: str) -> list[dict[str, Any]]:
        return [e for e in kube.Resource(self.admin1, kube.EVENTS).list(ns)["items"] if e["reason"] == reason]


@pytest.fixture
def make_env(cluster1, cluster2, tmp_path: Path, capsys) -> Iterator[Any]:
    envs: list[Env] = []

    def make(*bootstrap_flags: str) -> Env:
        envs.append(Env(cluster1, cluster2, tmp_path, *bootstrap_flags))
        capsys.readouterr()
        return envs[-1]

    yield make
    for env in envs:
        if env.controller is not None:
            env.controller.stop()


@pytest.fixture
def env(make_env) -> Env:
    return make_env()


def forbidden(call: Any) -> ApiException:
    with pytest.raises(ApiException) as info:
        call()
    assert info.value.status == 403
    return info.value


# What manifests/webhook and manifests/certs granted in the system namespace before the certificate moved to a
# namespace of its own: an upgrade that forgets to delete these Roles leaves the webhook (or the job) able to
# create Secrets where source credentials live. The credential pins make that harmless too.
LEFTOVER_CERT_RULES = [
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
    {
        "apiGroups": [""],
        "resources": ["secrets"],
        "resourceNames": ["service-account-import-admission-controller-cert"],
        "verbs": ["get", "update"],
    },
]


def labelled_secret(name: str, cluster: str, data: dict[str, str], owner_uid: str | None = None) -> dict[str, Any]:
    """A Secret of the system namespace that looks like the credential of `cluster` (controlled by its import)."""
    meta: dict[str, Any] = {"name": name, "namespace": SYSTEM, "labels": {api.IMPORT_LABEL: cluster}}
    if owner_uid:
        ref = {"apiVersion": api.API_VERSION, "kind": api.KIND, "name": cluster, "uid": owner_uid}
        meta["ownerReferences"] = [{**ref, "controller": True}]
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "data": data}


def jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


# --- the attack of the issue -------------------------------------------------------------------------------------


def test_a_team_a_user_gets_no_token_of_an_account_nobody_exported(env: Env) -> None:
    env.start()
    env.create_import("admin", client=env.alice, namespace="kube-system", name="admin-bot")
    env.create_import("controller", client=env.alice, namespace=SYSTEM, name="cluster1")
    env.create_import("bot", client=env.alice)
    for name, what in (("admin", "kube-system/admin-bot"), ("controller", f"{SYSTEM}/cluster1"), ("bot", "team-x/bot")):
        cond = env.wait_ready(name, "False", api.REASON_NOT_EXPORTED)
        assert f"Service account {what} in cluster cluster2 is not exported" in cond["message"]
        assert "kubemcsa allow" in cond["message"]
        assert env.token_in(name) is None
    wait_for(lambda: env.events("team-a", api.REASON_NOT_EXPORTED), what="the Events saying why")
    # alice cannot take the controller's credential either.
    forbidden(lambda: kube.Resource(env.alice, kube.SECRETS).get(api.secret_name_for_import("cluster2"), SYSTEM))

    # Bypassing the controller's check: its own credential, sent straight to cluster2, is refused by cluster2.
    as_controller = kube.Resource(env.c2.client_for_token(env.controller_credential()), kube.SERVICE_ACCOUNTS)
    refused = forbidden(lambda: as_controller.create_subresource("admin-bot", "token", {"spec": {}}, "kube-system"))
    assert kube.error_message(refused) == (
        f'serviceaccounts "admin-bot" is forbidden: User "{CONSUMER_USER}" cannot create resource '
        '"serviceaccounts/token" in API group "" in the namespace "kube-system"'
    )
    forbidden(lambda: as_controller.create_subresource("bot", "token", {"spec": {}}, "team-x"))
    forbidden(lambda: as_controller.create_subresource("default", "token", {"spec": {}}, "kube-system"))
    # Its own account it may rotate, and only its own.
    assert as_controller.create_subresource("cluster1", "token", {"spec": {}}, SYSTEM)["status"]["token"]
    # And the bootstrap import, its own credential, stays Ready.
    assert env.wait_ready("cluster2", ns=SYSTEM)["reason"] == api.REASON_TOKEN_ISSUED


def test_allow_then_import_works_only_where_allowed_and_withdrawing_removes_the_token(env: Env) -> None:
    controller = env.start(resync_seconds=0.2)
    env.allow("allow", "--to", "cluster1/team-a")
    env.create_import("bot", client=env.alice)
    assert env.wait_ready("bot")["reason"] == api.REASON_TOKEN_ISSUED
    token = env.token_in("bot")
    assert jwt_claims(token)["sub"] == "system:serviceaccount:team-x:bot"
    as_bot = env.c2.client_for_token(token)
    assert kube.Resource(as_bot, kube.PODS).list("team-x")["items"] == []
    forbidden(lambda: kube.Resource(as_bot, kube.SECRETS).list("team-x"))

    # Allowed to cluster1/team-a: team-b of the same cluster may not import it.
    env.create_import("bot", ns="team-b")
    cond = env.wait_ready("bot", "False", api.REASON_NOT_EXPORTED, ns="team-b")
    assert "is exported to 'cluster1/team-a', not to cluster1/team-b" in cond["message"]
    assert env.token_in("bot", "team-b") is None

    # The steady state: reconciles (resyncs every 0.2 s) from the caches alone, no API call in either cluster.
    # Settled: the Secret, and team-b's refusal written with its Event (the Event is recorded after the status).
    wait_for(lambda: env.secret("bot") and env.events("team-b", api.REASON_NOT_EXPORTED), what="settled")
    counted = isinstance(env.c1, ApiServer)  # only the in-memory server records each request
    if counted:
        env.c1.reset_requests()
        env.c2.reset_requests()
        done = controller.metrics.reconciles.labels("success")._value.get()
        wait_for(lambda: controller.metrics.reconciles.labels("success")._value.get() >= done + 10, what="resyncs")
        controller_user = f"system:serviceaccount:{SYSTEM}:{CONTROLLER_SA}"
        assert [r for r in env.c1.requests if r.user == controller_user] == []
        assert [r for r in env.c2.requests if r.user == CONSUMER_USER] == []

    # Withdrawn: the import turns NotExported and its Secret loses the token (and the kubeconfig that holds it).
    env.allow("disallow", "--all")
    cond = env.wait_ready("bot", "False", api.REASON_NOT_EXPORTED)
    assert "Secret bot-token holds no token of it; tokens already issued stay valid" in cond["message"]
    secret = env.secret("bot")
    assert api.KEY_TOKEN not in secret["data"] and api.KEY_CONFIG not in secret["data"]
    assert {api.KEY_CA_CRT, api.KEY_NAMESPACE, api.KEY_SERVER} <= set(secret["data"])
    said = lambda: [e for e in env.events("team-a", api.REASON_NOT_EXPORTED) if "holds no token" in e["message"]]  # noqa: E731
    wait_for(said, what="the Event saying why")  # recorded just after the status
    # No new token request was made for it: only the probe that tells a withdrawn export from a deleted account.
    if counted:
        asked = [(r.verb, r.resource, r.subresource) for r in env.c2.requests if r.user == CONSUMER_USER]
        assert ("create", "serviceaccounts", "token") not in asked

    # Allowed again: a fresh token.
    env.allow("allow", "--to", "cluster1/team-a")
    env.wait_ready("bot")
    assert env.token_in("bot")


def test_a_deleted_or_recreated_service_account(env: Env) -> None:
    env.start()
    env.allow("allow", "--to", "cluster1/team-a")
    env.create_import("bot", client=env.alice)
    env.wait_ready("bot")
    first_uid = jwt_claims(env.token_in("bot"))["kubernetes.io"]["serviceaccount"]["uid"]

    kube.Resource(env.admin2, kube.SERVICE_ACCOUNTS).delete("bot", "team-x")
    cond = env.wait_ready("bot", "False", api.REASON_REMOTE_SERVICE_ACCOUNT_NOT_FOUND)
    assert "team-x/bot in cluster cluster2 does not exist" in cond["message"]
    assert env.token_in("bot") is None

    # Re-created under the same name, not exported: another account, which nobody exported (unlabelled, the watch
    # does not see it, so the import keeps saying RemoteServiceAccountNotFound: either way, no token).
    apply(env.admin2, service_account("team-x", "bot"))
    assert env.ready("bot")["status"] == "False" and env.token_in("bot") is None
    # Its owner exports it: the import gets a token of the new account (the old one's died with it).
    env.allow("allow", "--to", "cluster1/team-a")
    env.wait_ready("bot")
    claims = jwt_claims(env.token_in("bot"))
    assert claims["kubernetes.io"]["serviceaccount"]["uid"] != first_uid


def test_an_owner_relabelling_in_place_changes_the_import_at_once(env: Env) -> None:
    """GitOps: the label and annotation, edited by hand, are what the controller follows (with RBAC from allow)."""
    env.start()
    env.allow("allow", "--to", "cluster1/team-b")
    env.create_import("bot", client=env.alice)
    env.wait_ready("bot", "False", api.REASON_NOT_EXPORTED)
    accounts = kube.Resource(env.admin2, kube.SERVICE_ACCOUNTS)
    accounts.patch("bot", {"metadata": {"annotations": {api.EXPORT_TO_ANNOTATION: "cluster1/team-*"}}}, "team-x")
    env.wait_ready("bot")
    accounts.patch("bot", {"metadata": {"labels": {api.EXPORTED_LABEL: "false"}}}, "team-x")
    env.wait_ready("bot", "False", api.REASON_NOT_EXPORTED)


# --- the rogue Secret --------------------------------------------------------------------------------------------


def test_a_rogue_credential_secret_made_with_the_webhooks_identity_changes_nothing(
    env: Env, api_server_factory
) -> None:
    foreign = api_server_factory(name="foreign")
    env.start()
    env.allow("allow", "--to", "cluster1/team-a")
    env.create_import("bot", client=env.alice)
    env.wait_ready("bot")
    env.create_import("evil", clusterName="evil")
    env.wait_ready("evil", "False", api.REASON_UNKNOWN_CLUSTER)
    bot_secret = env.secret("bot")
    bootstrap_secret = env.secret("cluster2", SYSTEM)
    bootstrap_import = kube.Resource(env.admin1, kube.SERVICE_ACCOUNT_IMPORTS).get("cluster2", SYSTEM)

    # The shipped webhook may create no Secret here any more (its certificate lives in a namespace of its own);
    # the Role an older version gave it, left behind by an upgrade, still may: play that.
    shipped = kube.Resource(env.as_user1(SYSTEM, WEBHOOK_SA), kube.SECRETS)
    forbidden(lambda: shipped.create(labelled_secret("evil-token", "evil", {}), SYSTEM))
    apply(env.admin1, *grant(SYSTEM, "leftover-webhook-cert", LEFTOVER_CERT_RULES, (SYSTEM, WEBHOOK_SA)))
    as_webhook = kube.Resource(env.as_user1(SYSTEM, WEBHOOK_SA), kube.SECRETS)
    rogue = Credentials(server=foreign.url, ca_crt=foreign.ca_pem, token=foreign.admin_token, namespace="team-x")

    def labelled(name: str, cluster: str, owner_uid: str | None = None) -> dict[str, Any]:
        return labelled_secret(name, cluster, to_secret_data(rogue, cluster), owner_uid)

    # A new cluster, a look-alike of cluster2 (even claiming the bootstrap import as its controller), and the
    # bootstrap Secret's own name (taken: 409).
    as_webhook.create(labelled(api.secret_name_for_import("evil"), "evil"), SYSTEM)
    as_webhook.create(labelled("cluster2-token-2", "cluster2", bootstrap_import["metadata"]["uid"]), SYSTEM)
    with pytest.raises(ApiException) as info:
        as_webhook.create(labelled(api.secret_name_for_import("cluster2"), "cluster2"), SYSTEM)
    assert info.value.status == 409
    # The webhook may not replace the bootstrap Secret either.
    forbidden(lambda: as_webhook.replace({**bootstrap_secret, "data": labelled("x", "cluster2")["data"]}, SYSTEM))

    # Nothing changed: evil stays unknown, bot keeps its Secret, and the foreign server heard nothing.
    env.create_import("bot2", client=env.alice)  # the legitimate credential keeps working for new imports
    env.wait_ready("bot2")
    cond = env.wait_ready("evil", "False", api.REASON_UNKNOWN_CLUSTER)
    assert "known: cluster2)" in cond["message"]
    assert env.secret("bot")["metadata"]["resourceVersion"] == bot_secret["metadata"]["resourceVersion"]
    assert env.ready("bot")["status"] == "True"
    assert not [r for r in foreign.requests if r.user != "admin"]

    # Deleting the rogue Secrets (an admin's clean-up) forgets no real cluster.
    secrets = kube.Resource(env.admin1, kube.SECRETS)
    secrets.delete(api.secret_name_for_import("evil"), SYSTEM)
    secrets.delete("cluster2-token-2", SYSTEM)
    env.create_import("bot3", client=env.alice)
    env.wait_ready("bot3")
    assert env.controller.sources.names() == ["cluster2"]


def _without_its_credential(env: Env, foreign: Any) -> tuple[str, dict[str, Any], str]:
    """cluster2's bootstrap credential deleted (by an admin, say) while team-a/bot holds a token of it; returns bot's
    token, a forged credential of cluster2 controlled by its import and pointing at `foreign`, and cluster2's server."""
    env.start()
    env.allow("allow", "--to", "cluster1/team-a")
    env.create_import("bot", client=env.alice)
    env.wait_ready("bot")
    server = from_secret_data(env.secret("bot")["data"]).server
    uid = kube.Resource(env.admin1, kube.SERVICE_ACCOUNT_IMPORTS).get("cluster2", SYSTEM)["metadata"]["uid"]
    kube.Resource(env.admin1, kube.SECRETS).delete(api.secret_name_for_import("cluster2"), SYSTEM)
    wait_for(lambda: env.controller.sources.get("cluster2") is None, what="cluster2 forgotten with its credential")
    rogue = Credentials(server=foreign.url, ca_crt=foreign.ca_pem, token=foreign.admin_token, namespace=SYSTEM)
    forged = labelled_secret(api.secret_name_for_import("cluster2"), "cluster2", to_secret_data(rogue, "cluster2"), uid)
    return env.token_in("bot"), forged, server


def _nothing_changed(env: Env, foreign: Any, bot_token: str, server: str) -> None:
    """No import was pointed at another server, none lost its token, and the foreign server heard nothing."""
    assert env.controller.sources.get("cluster2") is None
    assert env.token_in("bot") == bot_token
    assert from_secret_data(env.secret("bot")["data"]).server == server
    assert not [r for r in foreign.requests if r.user != "admin"]


def test_with_its_credential_deleted_neither_the_webhook_nor_the_cert_job_can_make_one(
    env: Env, api_server_factory
) -> None:
    foreign = api_server_factory(name="foreign")
    for path in ("serviceaccount.yaml", "rbac.yaml"):
        apply(env.admin1, *yaml.safe_load_all((MANIFESTS / "certs" / path).read_text()))
    bot_token, forged, server = _without_its_credential(env, foreign)
    name = forged["metadata"]["name"]
    look_alike = {**forged, "metadata": {**forged["metadata"], "name": "cluster2-token-2"}}
    for identity in (WEBHOOK_SA, CERT_JOB_SA):
        secrets = kube.Resource(env.as_user1(SYSTEM, identity), kube.SECRETS)
        forbidden(lambda secrets=secrets: secrets.create(forged, SYSTEM))
        forbidden(lambda secrets=secrets: secrets.replace(forged, SYSTEM))
        forbidden(lambda secrets=secrets: secrets.patch(name, {"data": forged["data"]}, SYSTEM))
        forbidden(lambda secrets=secrets: secrets.create(look_alike, SYSTEM))
    env.create_import("bot2", client=env.alice)
    env.wait_ready("bot2", "False", api.REASON_UNKNOWN_CLUSTER)
    _nothing_changed(env, foreign, bot_token, server)


def test_a_credential_that_its_writer_did_not_pin_is_not_used_and_bootstrap_makes_it_good_again(
    env: Env, api_server_factory
) -> None:
    foreign = api_server_factory(name="foreign")
    bot_token, forged, server = _without_its_credential(env, foreign)
    # Whoever may still create Secrets in the system namespace (the Role an older version gave the webhook, left
    # behind by an upgrade) makes the credential again, as the controller would have it, but pointing elsewhere.
    apply(env.admin1, *grant(SYSTEM, "leftover-webhook-cert", LEFTOVER_CERT_RULES, (SYSTEM, WEBHOOK_SA)))
    kube.Resource(env.as_user1(SYSTEM, WEBHOOK_SA), kube.SECRETS).create(forged, SYSTEM)
    (event,) = wait_for(lambda: env.events(SYSTEM, api.REASON_UNTRUSTED_CREDENTIAL), what="the Warning on cluster2")
    assert event["type"] == "Warning" and event["involvedObject"]["name"] == "cluster2"
    assert "re-run kubemcsa bootstrap for cluster cluster2" in event["message"]
    assert all(value not in event["message"] for value in forged["data"].values())
    env.create_import("bot2", client=env.alice)
    cond = env.wait_ready("bot2", "False", api.REASON_UNKNOWN_CLUSTER)
    assert "written neither by the controller nor by kubemcsa bootstrap" in cond["message"]
    _nothing_changed(env, foreign, bot_token, server)

    # An admin's bootstrap replaces it with one it writes and pins: cluster2 is back, at its own address.
    assert cli.main(env.bootstrap_argv) == 0
    env.wait_ready("bot2")
    assert from_secret_data(env.secret("bot2")["data"]).server == server
    assert env.controller.sources.get("cluster2").server == server
    assert not [r for r in foreign.requests if r.user != "admin"]


def test_a_credential_changed_behind_the_controllers_back_is_not_used_and_the_last_good_one_stays(
    env: Env, api_server_factory
) -> None:
    foreign = api_server_factory(name="foreign")
    env.start()
    env.allow("allow", "--to", "cluster1/team-a")
    env.create_import("bot", client=env.alice)
    env.wait_ready("bot")
    server = env.controller.sources.get("cluster2").server
    # Someone who may update it (here an admin, by hand: no pin) points the credential at another server.
    secrets = kube.Resource(env.admin1, kube.SECRETS)
    credential = secrets.get(api.secret_name_for_import("cluster2"), SYSTEM)
    rogue = Credentials(server=foreign.url, ca_crt=foreign.ca_pem, token=foreign.admin_token, namespace=SYSTEM)
    secrets.replace({**credential, "data": to_secret_data(rogue, "cluster2")}, SYSTEM)
    wait_for(lambda: env.events(SYSTEM, api.REASON_UNTRUSTED_CREDENTIAL), what="the Warning on cluster2")
    # The controller keeps the credential it had, serves new imports with it, and writes its own back.
    assert env.controller.sources.get("cluster2").server == server
    env.create_import("bot2", client=env.alice)
    env.wait_ready("bot2")
    wait_for(
        lambda: from_secret_data(secrets.get(api.secret_name_for_import("cluster2"), SYSTEM)["data"]).server == server,
        what="the controller's own credential written back",
    )
    assert env.wait_ready("cluster2", ns=SYSTEM)["reason"] == api.REASON_TOKEN_ISSUED
    assert not [r for r in foreign.requests if r.user != "admin"]


# --- narrower and wider grants ----------------------------------------------------------------------------------


def test_source_namespaces_narrow_the_watch_to_those_namespaces(make_env) -> None:
    env = make_env("--source-namespaces", "team-x")
    apply(env.admin2, namespace("team-y"), service_account("team-y", "bot"))
    env.start()
    assert env.controller.exports._watches["cluster2"].cluster_wide is False
    env.allow("allow", "--to", "cluster1/team-a")
    env.create_import("bot", client=env.alice)
    env.wait_ready("bot")
    env.create_import("elsewhere", namespace="team-y")
    cond = env.wait_ready("elsewhere", "False", api.REASON_FORBIDDEN)
    assert "may not list service accounts in namespace team-y of cluster cluster2" in cond["message"]


def test_the_open_grant_is_warned_about_and_exports_still_decide(make_env, caplog) -> None:
    env = make_env("--allow-all-service-accounts")
    with caplog.at_level(logging.WARNING, logger="controller.export_watches"):
        env.start()
        wait_for(lambda: "ANY service account of source cluster cluster2" in caplog.text, what="the warning")
    env.create_import("admin", namespace="kube-system", name="admin-bot")
    env.wait_ready("admin", "False", api.REASON_NOT_EXPORTED)
    assert env.token_in("admin") is None
