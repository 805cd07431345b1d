"""No confused deputy in federated trust checks: whatever a namespace user writes in an import, no token of the
controller's identity, or of any identity with RBAC in the consumer cluster, reaches a source.

cluster1 is the consumer: the controller runs there with a token bound to the manifests' RBAC. cluster2 and
cluster3 are federated sources, recorded by `kubemcsa federate` (each allows its own name as audience) and trusting
cluster1's issuer. Every in-memory server records what each request's bearer JWT claims to be (issuer, subject,
audiences; never the token), so the tests see every token that reached a source, accepted or not.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from controller.options import Options
from controller.run import Controller
from kubemcsa.cli import federate
from kubemcsa.client import apply, kube
from kubemcsa.contract import api, federation
from kubemcsa_testing.objects import create_file, create_or_get
from kubemcsa_testing.server import ApiServer, BearerToken
from kubemcsa_testing.wait import wait_for

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
SYSTEM = api.SYSTEM_NAMESPACE
TEAM = "team-a"  # the only namespace the attacker has rights in
CONTROLLER_USER = f"system:serviceaccount:{SYSTEM}:service-account-import-controller"
CHECK_USER = f"system:serviceaccount:{SYSTEM}:{api.TRUST_CHECK_SERVICE_ACCOUNT}"


@dataclass
class World:
    c1: ApiServer
    sources: dict[str, ApiServer]
    admin1: ApiClient
    controller: Controller

    def record(self, source: ApiServer, *audiences: str) -> None:
        """What a cluster admin does: `kubemcsa federate`, then the source's admin adds the printed configuration."""
        wanted = federation.FederatedSource(
            source.name, source.url, source.ca_pem, audiences[0] if audiences else source.name, "cluster1:",
            audiences=audiences,
        )  # fmt: skip
        target = apply.Cluster("target", "cluster1", self.admin1, self.c1.url, self.c1.ca_pem)
        issuer, _ = federate.apply(wanted, target, report=lambda _: None)
        source.configure_authentication(
            federation.authentication_configuration(issuer.url, self.c1.url, self.c1.ca_pem, wanted)
        )

    def ready(self, name: str) -> dict[str, Any] | None:
        imp = kube.Resource(self.admin1, kube.SERVICE_ACCOUNT_IMPORTS).get(name, TEAM)
        return next((c for c in (imp.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"), None)

    def wait_ready(self, name: str, status: str, reason: str) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            cond = self.ready(name)
            return cond if cond and (cond["status"], cond["reason"]) == (status, reason) else None

        return wait_for(check, f"import {name} Ready={status} {reason}", timeout=30)

    def tokens_at_sources(self) -> list[tuple[str, BearerToken]]:
        """Every bearer JWT of cluster1 that reached a source, as (source, what it claims)."""
        issuer = self.c1.authority.issuer
        return [
            (name, r.token)
            for name, server in self.sources.items()
            for r in server.requests
            if r.token is not None and r.token.issuer == issuer
        ]


@pytest.fixture
def world(api_server_factory) -> Iterator[World]:
    c1 = api_server_factory(name="cluster1")
    sources = {name: api_server_factory(name=name) for name in ("cluster2", "cluster3")}
    admin1 = c1.admin_client()
    for part in ("namespace.yaml", "crd/serviceaccountimports.yaml", "crd/user-roles.yaml"):
        create_file(admin1, MANIFESTS / part)
    for part in ("serviceaccount.yaml", "rbac.yaml"):
        create_file(admin1, MANIFESTS / "controller" / part)
    create_or_get(
        admin1,
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": TEAM, "labels": {api.NAMESPACE_LABEL: api.NAMESPACE_LABEL_VALUE}},
        },
    )
    controller_client = c1.client_for_token(c1.issue_token(SYSTEM, "service-account-import-controller"))
    options = Options(leader_election=False, remote_timeout=3.0, backoff_base=0.1, backoff_max=1.0,
                      untrusted_recheck_seconds=0.3)  # fmt: skip
    controller = Controller(controller_client, options)
    the_world = World(c1, sources, admin1, controller)
    for source in sources.values():
        the_world.record(source)
    controller.start()
    try:
        assert controller.wait_until_ready(30)
        wait_for(lambda: len(controller.federated_sources.list()) == 2, "the controller to see both sources")
        for server in (c1, *sources.values()):
            server.reset_requests()
        yield the_world
    finally:
        controller.stop()


def namespace_user(c1: ApiServer, role: str) -> ApiClient:
    """A user with `role` (the aggregated edit or admin) in TEAM only, through a RoleBinding, with its own token."""
    admin = c1.admin_client()
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "mallory", "namespace": TEAM}}
    create_or_get(admin, account)
    create_or_get(
        admin,
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": f"mallory-{role}", "namespace": TEAM},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": "mallory", "namespace": TEAM}],
        },
    )
    return c1.client_for_token(c1.issue_token(TEAM, "mallory"))


def federated_import(name: str, cluster: str, audiences: list[str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"clusterName": cluster, "namespace": "default", "tokenType": "Federated"}
    if audiences is not None:
        spec["audiences"] = audiences
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name}, "spec": spec}


def bindings_naming(c1: ApiServer, namespace: str, name: str) -> list[str]:
    """The RoleBindings and ClusterRoleBindings of cluster1 that grant service account namespace/name anything,
    directly or through its groups, beyond Kubernetes' own defaults that every identity holds (discovery, the
    public issuer keys: labelled kubernetes.io/bootstrapping=rbac-defaults)."""
    groups = {"system:serviceaccounts", f"system:serviceaccounts:{namespace}"}
    found = []
    admin = c1.admin_client()
    for rtype in (kube.ROLE_BINDINGS, kube.CLUSTER_ROLE_BINDINGS):
        for binding in kube.Resource(admin, rtype).list().get("items") or []:
            if (binding["metadata"].get("labels") or {}).get("kubernetes.io/bootstrapping") == "rbac-defaults":
                continue
            for subject in binding.get("subjects") or []:
                is_it = subject.get("kind") == "ServiceAccount" and (
                    subject.get("namespace"), subject.get("name")) == (namespace, name)  # fmt: skip
                if is_it or (subject.get("kind") == "Group" and subject.get("name") in groups):
                    meta = binding["metadata"]
                    found.append(f"{rtype.kind} {meta.get('namespace', '')}/{meta['name']}")
    return found


def assert_worth_nothing_in_the_consumer(c1: ApiServer, subject: str) -> None:
    """A token of `subject` (a cluster1 service account) may do nothing in cluster1: no binding names it, and a
    fresh token of it is refused what a token of the controller may do, and what a namespace user may."""
    assert subject != CONTROLLER_USER, "the controller's own token reached a source"
    namespace, _, name = subject.removeprefix("system:serviceaccount:").partition(":")
    assert subject.startswith("system:serviceaccount:") and namespace and name, subject
    assert bindings_naming(c1, namespace, name) == [], f"{subject} holds RBAC in the consumer cluster"
    client = c1.client_for_token(c1.issue_token(namespace, name))
    probes = [
        lambda: kube.Resource(client, kube.SECRETS).list(),
        lambda: kube.Resource(client, kube.SECRETS).list(TEAM),
        lambda: kube.Resource(client, kube.SECRETS).list(SYSTEM),
        lambda: kube.Resource(client, kube.CONFIG_MAPS).list(SYSTEM),
        lambda: kube.Resource(client, kube.SERVICE_ACCOUNT_IMPORTS).list(),
        lambda: kube.Resource(client, kube.PODS).list(TEAM),
        lambda: kube.Resource(client, kube.SERVICE_ACCOUNTS).create_subresource(
            "service-account-import-controller", "token", {"spec": {}}, SYSTEM
        ),
    ]
    for probe in probes:
        with pytest.raises(ApiException) as info:
            probe()
        assert info.value.status == 403


@pytest.mark.parametrize("role", ["edit", "admin"])
def test_a_namespace_user_cannot_aim_a_trust_check_token_at_any_audience(world: World, role: str) -> None:
    """Audiences an attacker may choose: the consumer's own API audience (a token of the controller for it lists
    every Secret here), another source's recorded audience (a token that source accepts), garbage. None is used:
    each import says AudienceNotAllowed with the fix, and no check token carries it anywhere."""
    mallory = kube.Resource(namespace_user(world.c1, role), kube.SERVICE_ACCOUNT_IMPORTS)
    attacks = {
        "own-api-audience": list(world.c1.authority.api_audiences),
        "other-source": ["cluster3"],
        "garbage": ["garbage"],
        "allowed-then-own": ["cluster2", world.c1.authority.api_audiences[0]],
    }
    for name, audiences in attacks.items():
        mallory.create(federated_import(name, "cluster2", audiences), TEAM)
    mallory.create(federated_import("honest", "cluster2"), TEAM)  # the record's audience: checked, as it should be

    for name in attacks:
        cond = world.wait_ready(name, "False", api.REASON_AUDIENCE_NOT_ALLOWED)
        assert "allows the audience cluster2 only" in cond["message"]
        assert "remove spec.audiences" in cond["message"]
        assert "kubemcsa federate --source-context <cluster2> --audience cluster2 --audience" in cond["message"]
    world.wait_ready("honest", "True", api.REASON_FEDERATED)

    received = world.tokens_at_sources()
    assert received, "the honest import's trust check reached cluster2"
    for source, token in received:
        # Only the record's audience, for the source it was recorded for; only the trust-check identity.
        assert (source, token.audiences) == ("cluster2", ("cluster2",))
        assert token.subject == CHECK_USER
    # No import of the attacker made the controller mint anything of its own, or for the attacker's audiences.
    minted = [r for r in world.c1.requests if r.subresource == "token" and r.user == CONTROLLER_USER]
    assert {r.name for r in minted} == {api.TRUST_CHECK_SERVICE_ACCOUNT}
    for subject in {token.subject for _, token in received}:
        assert_worth_nothing_in_the_consumer(world.c1, subject)


def test_in_the_normal_flow_the_controllers_own_token_never_leaves_the_consumer(world: World) -> None:
    """Federated imports of both sources, with the default audience and with one an admin allowed later: the
    sources see tokens of the trust-check identity only, and the controller never mints a token of its own."""
    admin = kube.Resource(world.admin1, kube.SERVICE_ACCOUNT_IMPORTS)
    admin.create(federated_import("c2", "cluster2"), TEAM)
    admin.create(federated_import("c3", "cluster3"), TEAM)
    admin.create(federated_import("c2-ci", "cluster2", ["cluster2-ci"]), TEAM)
    world.wait_ready("c2", "True", api.REASON_FEDERATED)
    world.wait_ready("c3", "True", api.REASON_FEDERATED)
    cond = world.wait_ready("c2-ci", "False", api.REASON_AUDIENCE_NOT_ALLOWED)
    assert "--audience cluster2 --audience cluster2-ci" in cond["message"]
    # A cluster admin follows the message: the import turns Ready by itself, with its own audience.
    world.record(world.sources["cluster2"], "cluster2", "cluster2-ci")
    cond = world.wait_ready("c2-ci", "True", api.REASON_FEDERATED)
    assert "for audience cluster2-ci" in cond["message"]

    received = world.tokens_at_sources()
    assert {(source, token.audiences) for source, token in received} == {
        ("cluster2", ("cluster2",)),
        ("cluster3", ("cluster3",)),
        ("cluster2", ("cluster2-ci",)),
    }
    assert {token.subject for _, token in received} == {CHECK_USER}
    # The controller asked cluster1 for tokens of the trust-check account only, never of itself.
    minted = [r for r in world.c1.requests if r.subresource == "token"]
    assert minted and {(r.user, r.name) for r in minted} == {(CONTROLLER_USER, api.TRUST_CHECK_SERVICE_ACCOUNT)}
    assert_worth_nothing_in_the_consumer(world.c1, CHECK_USER)
    # And it may not: its RBAC grants tokens of the trust-check account alone.
    with pytest.raises(ApiException) as info:
        kube.Resource(world.controller.trust_checks.local_client, kube.SERVICE_ACCOUNTS).create_subresource(
            "service-account-import-controller", "token", {"spec": {"audiences": ["cluster2"]}}, SYSTEM
        )
    assert info.value.status == 403


def test_the_trust_check_identity_of_the_manifests_is_bound_to_nothing() -> None:
    """The manifests create it without a token mounted anywhere, and no manifest binds a role to it."""
    import yaml

    docs = [d for p in MANIFESTS.rglob("*.yaml") for d in yaml.safe_load_all(p.read_text()) if isinstance(d, dict)]
    (account,) = [d for d in docs if d.get("kind") == "ServiceAccount"
                  and d["metadata"]["name"] == api.TRUST_CHECK_SERVICE_ACCOUNT]  # fmt: skip
    expected = federation.trust_check_service_account()
    assert account["automountServiceAccountToken"] is False is expected["automountServiceAccountToken"]
    assert account["metadata"]["namespace"] == expected["metadata"]["namespace"]
    for doc in docs:
        if doc.get("kind") in ("RoleBinding", "ClusterRoleBinding"):
            names = [s.get("name") for s in doc.get("subjects") or []]
            assert api.TRUST_CHECK_SERVICE_ACCOUNT not in names, doc["metadata"]["name"]
            assert not {"system:serviceaccounts", f"system:serviceaccounts:{SYSTEM}"} & set(names)
