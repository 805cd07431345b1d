"""Who may touch which Secrets, asked of the API server and compared with the README's table.

Every shipped identity (each ServiceAccount of manifests/, with a token bound to the manifests' RBAC as applied to the
in-memory server, and namespace owners holding the aggregated admin, edit and view roles) asks the server, with a
SelfSubjectAccessReview, whether it may get, list, create, update, patch and delete Secrets in every place Secrets
matter: the system namespace (where the controller's source credentials live), the webhook certificate's namespace,
and an ordinary user namespace. The answers must be exactly the README's table ("Security: who can do what"), so the
promise and the manifests cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from kubemcsa.client import kube
from kubemcsa.contract import api
from kubemcsa_testing import ApiServer

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
VERBS = ("get", "list", "create", "update", "patch", "delete")
USER_NAMESPACE = "team-a"
LOCATIONS = (api.SYSTEM_NAMESPACE, api.CERT_NAMESPACE, USER_NAMESPACE)
CERT_SECRET = "service-account-import-admission-controller-cert"
# Namespace owners, as kube's aggregated roles make them (manifests/crd/user-roles.yaml adds imports to them).
AGGREGATED = ("admin", "edit", "view")
BY_NAME = "¹"  # in the README: this verb only on the certificate Secret, by name
KINDS_APPLIED = {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}


def _documents(kustomization: Path) -> list[dict[str, Any]]:
    """The documents of a kustomization's resources (the base and the certs component, as applied)."""
    resources = yaml.safe_load(kustomization.read_text())["resources"]
    docs = []
    for resource in resources:
        docs += [doc for doc in yaml.safe_load_all((kustomization.parent / resource).read_text()) if doc]
    return docs


def shipped() -> list[dict[str, Any]]:
    docs = _documents(MANIFESTS / "kustomization.yaml") + _documents(MANIFESTS / "certs" / "kustomization.yaml")
    return [doc for doc in docs if doc["kind"] in KINDS_APPLIED]


def readme_table() -> dict[str, dict[str, str]]:
    """identity -> namespace -> the cell of the README's table of who may touch which Secrets."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Who may touch which Secrets", 1)[1]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    header, body = rows[0], [row for row in rows[2:] if row]
    namespaces = [re.search(r"`([^`]+)`", cell).group(1) for cell in header[1:]]
    table = {}
    for row in body:
        if len(row) != len(header):
            break  # the table ended
        identity = re.search(r"`([^`]+)`", row[0]).group(1)  # the first name in backquotes
        table[identity] = dict(zip(namespaces, row[1:], strict=True))
    return table


def expected(cell: str) -> dict[str, tuple[bool, bool]]:
    """verb -> (allowed on any Secret, allowed on the certificate Secret by name), from one cell of the table."""
    listed = {} if cell in ("—", "-", "") else {v.strip().rstrip(BY_NAME): v.strip() for v in cell.split(",")}
    unknown = set(listed) - set(VERBS)
    assert not unknown, f"the README's table names verbs the test does not ask about: {sorted(unknown)}"
    return {verb: (verb in listed and not listed[verb].endswith(BY_NAME), verb in listed) for verb in VERBS}


def can(
    api_client: client.ApiClient,
    verb: str,
    namespace: str,
    name: str = "",
    *,
    group: str = "",
    resource: str = "secrets",
    subresource: str = "",
) -> bool:
    """The server's answer to a SelfSubjectAccessReview of this client's identity (`kubectl auth can-i`)."""
    attributes = client.V1ResourceAttributes(
        verb=verb,
        group=group,
        resource=resource,
        subresource=subresource or None,
        namespace=namespace,
        name=name or None,
    )
    review = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(resource_attributes=attributes))
    answer = client.AuthorizationV1Api(api_client).create_self_subject_access_review(review)
    return bool(answer.status.allowed)


@pytest.fixture(scope="module")
def identities(matrix_server) -> dict[str, client.ApiClient]:
    """A client per shipped identity, with a token of its own service account (or namespace owner's)."""
    server = matrix_server
    admin = server.admin_client()
    docs = shipped()
    for doc in sorted(docs, key=lambda d: d["kind"] != "Namespace"):
        kube.Resource(admin, kube.resource_type_of(doc)).create(doc, doc["metadata"].get("namespace"))
    kube.Resource(admin, kube.NAMESPACES).create({"metadata": {"name": USER_NAMESPACE}})
    accounts = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in docs if d["kind"] == "ServiceAccount"}
    assert (api.SYSTEM_NAMESPACE, api.TRUST_CHECK_SERVICE_ACCOUNT) in accounts  # bound to nothing, and shipped
    for role in AGGREGATED:  # a namespace owner: kube's role bound in their own namespace
        kube.Resource(admin, kube.SERVICE_ACCOUNTS).create({"metadata": {"name": f"{role}-user"}}, USER_NAMESPACE)
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": f"{role}-user", "namespace": USER_NAMESPACE},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": f"{role}-user", "namespace": USER_NAMESPACE}],
        }
        kube.Resource(admin, kube.ROLE_BINDINGS).create(binding, USER_NAMESPACE)
    clients = {name: server.client_for_token(server.issue_token(ns, name)) for ns, name in accounts}
    clients.update(
        {role: server.client_for_token(server.issue_token(USER_NAMESPACE, f"{role}-user")) for role in AGGREGATED}
    )
    return clients


@pytest.fixture(scope="module")
def matrix_server() -> Iterator[ApiServer]:
    server = ApiServer(name="rbac-matrix").start()
    yield server
    server.stop()


def test_the_readme_names_every_shipped_identity_and_every_secret_location(identities) -> None:
    table = readme_table()
    assert set(table) == set(identities), "the README's table and the shipped identities differ"
    for identity, cells in table.items():
        assert set(cells) == set(LOCATIONS), f"row {identity} of the README's table"


def test_what_each_identity_may_do_to_secrets_is_what_the_readme_says(identities) -> None:
    table = readme_table()
    mismatches = []
    for identity, api_client in sorted(identities.items()):
        for namespace in LOCATIONS:
            for verb, (any_secret, by_name) in expected(table[identity][namespace]).items():
                asked = (can(api_client, verb, namespace), can(api_client, verb, namespace, CERT_SECRET))
                if asked != (any_secret, by_name):
                    mismatches.append(
                        f"{identity} {verb} secrets in {namespace}: server {asked}, README {(any_secret, by_name)}"
                    )
    assert not mismatches, "\n".join(mismatches)


def test_only_the_controller_may_write_the_credential_pins(identities) -> None:
    """The pins live in the imports' status: no shipped identity but the controller may write it, namespace owners
    included (the aggregated roles grant serviceaccountimports, not serviceaccountimports/status)."""
    writers = {
        identity
        for identity, api_client in identities.items()
        for namespace in LOCATIONS
        for verb in ("update", "patch")
        if can(api_client, verb, namespace, group=api.GROUP, resource=api.PLURAL, subresource="status")
    }
    assert writers == {"service-account-import-controller"}
