"""The in-memory server trusting another's service-account tokens (AuthenticationConfiguration), SelfSubjectReview,
and the kubelet stand-in's projected tokens; behaviour from the facts file, "A cluster that trusts another cluster's
service-account tokens"."""

from __future__ import annotations

import base64
import json
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from kubemcsa_testing import ApiServer
from kubemcsa_testing.kubelet import Kubelet, VolumeError
from kubemcsa_testing.oidc import ConfigurationError, parse_authentication_configuration
from kubemcsa_testing.tokens import decode_unverified
from kubemcsa_testing.wait import wait_for

DISCOVERY_BINDING = {
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "ClusterRoleBinding",
    "metadata": {"name": "anonymous-issuer-discovery"},
    "roleRef": {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "system:service-account-issuer-discovery",
    },
    "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:unauthenticated"}],
}


def trust(issuer: ApiServer, audience: str = "cluster2", prefix: str = "cluster1:") -> dict[str, Any]:
    """The AuthenticationConfiguration of the facts file, trusting `issuer`."""
    return {
        "apiVersion": "apiserver.config.k8s.io/v1beta1",
        "kind": "AuthenticationConfiguration",
        "jwt": [
            {
                "issuer": {
                    "url": issuer.authority.issuer,
                    "discoveryURL": f"{issuer.url}/.well-known/openid-configuration",
                    "audiences": [audience],
                    "certificateAuthority": issuer.ca_pem.decode(),
                },
                "claimMappings": {"username": {"claim": "sub", "prefix": prefix}},
            }
        ],
    }


def who(server: ApiServer, token: str) -> dict[str, Any]:
    api = client.AuthenticationV1Api(server.client_for_token(token))
    review = api.create_self_subject_review({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
    return review.status.user_info.to_dict()


def sa(server: ApiServer, name: str, namespace: str = "default") -> None:
    client.CoreV1Api(server.admin_client()).create_namespaced_service_account(namespace, {"metadata": {"name": name}})


@pytest.fixture
def pair(api_server_factory: Any) -> tuple[ApiServer, ApiServer]:
    c1 = api_server_factory(name="cluster1")
    c2 = api_server_factory(name="cluster2")
    client.RbacAuthorizationV1Api(c1.admin_client()).create_cluster_role_binding(DISCOVERY_BINDING)
    c2.configure_authentication(trust(c1))
    sa(c1, "fed")
    return c1, c2


def test_self_subject_review_names_the_caller_with_groups_and_uid(cluster1: ApiServer) -> None:
    sa(cluster1, "me")
    user = who(cluster1, cluster1.issue_token("default", "me"))
    assert user["username"] == "system:serviceaccount:default:me"
    assert user["groups"] == ["system:serviceaccounts", "system:serviceaccounts:default", "system:authenticated"]
    assert user["uid"]


def test_a_trusted_token_is_prefixed_user_with_only_the_authenticated_group(pair: tuple[ApiServer, ApiServer]) -> None:
    c1, c2 = pair
    user = who(c2, c1.issue_token("default", "fed", audiences=["cluster2"]))
    assert user["username"] == "cluster1:system:serviceaccount:default:fed"
    assert user["groups"] == ["system:authenticated"]
    assert user.get("uid") is None


def test_the_federated_user_gets_cluster2s_rbac_and_nothing_more(pair: tuple[ApiServer, ApiServer]) -> None:
    c1, c2 = pair
    core = client.CoreV1Api(c2.client_for_token(c1.issue_token("default", "fed", audiences=["cluster2"])))
    with pytest.raises(ApiException) as info:
        core.list_namespaced_pod("default")
    assert info.value.status == 403
    message = json.loads(info.value.body)["message"]
    assert 'User "cluster1:system:serviceaccount:default:fed" cannot list resource "pods"' in message
    rbac = client.RbacAuthorizationV1Api(c2.admin_client())
    rbac.create_namespaced_role(
        "default",
        {"metadata": {"name": "lister"}, "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]},
    )
    rbac.create_namespaced_role_binding(
        "default",
        {
            "metadata": {"name": "lister"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "lister"},
            "subjects": [
                {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "User",
                    "name": "cluster1:system:serviceaccount:default:fed",
                }
            ],
        },
    )
    assert core.list_namespaced_pod("default").items == []
    with pytest.raises(ApiException) as info:
        core.list_namespaced_secret("default")
    assert info.value.status == 403


def test_another_audience_or_issuer_or_a_tampered_token_is_401(pair: tuple[ApiServer, ApiServer]) -> None:
    c1, c2 = pair
    default_audience = c1.issue_token("default", "fed")
    assert who(c1, default_audience)["username"] == "system:serviceaccount:default:fed"
    sa(c2, "local")
    for token in (
        default_audience,
        c1.issue_token("default", "fed", audiences=["cluster3"]),
        c2.issue_token("default", "local", audiences=["cluster2"]).rsplit(".", 1)[0] + ".AAAA",
    ):
        with pytest.raises(ApiException) as info:
            who(c2, token)
        assert info.value.status == 401


def test_a_deleted_service_accounts_token_works_until_it_expires(pair: tuple[ApiServer, ApiServer]) -> None:
    c1, c2 = pair
    token = c1.issue_token("default", "fed", audiences=["cluster2"])
    client.CoreV1Api(c1.admin_client()).delete_namespaced_service_account("fed", "default")
    assert who(c2, token)["username"] == "cluster1:system:serviceaccount:default:fed"
    payload = decode_unverified(token)
    jwt = c2._auth.jwt  # the authenticator itself, asked with a clock around the expiry
    assert jwt.authenticate(token, now=payload["exp"] - 60) is not None
    assert jwt.authenticate(token, now=payload["exp"] + 60) is None


def test_without_the_anonymous_discovery_binding_the_trust_fails_then_recovers(
    api_server_factory: Any,
) -> None:
    c1 = api_server_factory(name="cluster1")
    c2 = api_server_factory(name="cluster2")
    c2.configure_authentication(trust(c1))
    sa(c1, "fed")
    token = c1.issue_token("default", "fed", audiences=["cluster2"])
    with pytest.raises(ApiException) as info:
        who(c2, token)
    assert info.value.status == 401
    anonymous = [r for r in c1.requests if r.path == "/.well-known/openid-configuration"]
    assert anonymous and anonymous[0].user == "system:anonymous" and anonymous[0].code == 403
    client.RbacAuthorizationV1Api(c1.admin_client()).create_cluster_role_binding(DISCOVERY_BINDING)

    def trusted() -> bool:
        try:
            return who(c2, token)["username"] == "cluster1:system:serviceaccount:default:fed"
        except ApiException:
            return False

    assert wait_for(trusted, timeout=10)


def test_a_discovery_document_naming_another_issuer_is_not_trusted(api_server_factory: Any) -> None:
    c1 = api_server_factory(name="cluster1")
    c2 = api_server_factory(name="cluster2")
    client.RbacAuthorizationV1Api(c1.admin_client()).create_cluster_role_binding(DISCOVERY_BINDING)
    config = trust(c1)
    config["jwt"][0]["issuer"]["url"] = "https://elsewhere.example"
    c2.configure_authentication(config)
    sa(c1, "fed")
    with pytest.raises(ApiException) as info:
        who(c2, c1.issue_token("default", "fed", audiences=["cluster2"]))
    assert info.value.status == 401


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c.update(kind="Other"), "AuthenticationConfiguration"),
        (lambda c: c["jwt"][0]["issuer"].update(url="http://plain"), "https"),
        (lambda c: c["jwt"][0]["issuer"].update(audiences=[]), "audiences"),
        (lambda c: c["jwt"][0]["issuer"].update(audiences=["a", "b"]), "MatchAny"),
        (lambda c: c["jwt"][0]["claimMappings"]["username"].pop("prefix"), "prefix"),
        (lambda c: c["jwt"][0].update(claimValidationRules=[]), "does not support"),
        (lambda c: c["jwt"].append(dict(c["jwt"][0])), "Duplicate"),
    ],
)
def test_a_configuration_kube_apiserver_would_refuse_is_refused(cluster1: ApiServer, mutate: Any, message: str) -> None:
    config = trust(cluster1)
    mutate(config)
    with pytest.raises(ConfigurationError, match=message):
        parse_authentication_configuration(config)


def test_the_configuration_is_read_from_yaml_too(cluster1: ApiServer) -> None:
    import yaml

    issuers = parse_authentication_configuration(yaml.safe_dump(trust(cluster1)))
    assert issuers[0].audiences == ("cluster2",) and issuers[0].username_prefix == "cluster1:"


# --- the kubelet stand-in ----------------------------------------------------------------------------------


def projected_pod(audience: str | None = "cluster2", expiration: int | None = 3600) -> dict[str, Any]:
    token_source: dict[str, Any] = {"path": "token"}
    if audience:
        token_source["audience"] = audience
    if expiration:
        token_source["expirationSeconds"] = expiration
    return {
        "metadata": {"name": "p"},
        "spec": {
            "serviceAccountName": "fed",
            "containers": [
                {"name": "c", "image": "x", "volumeMounts": [{"name": "creds", "mountPath": "/var/run/creds"}]}
            ],
            "volumes": [
                {
                    "name": "creds",
                    "projected": {
                        "sources": [
                            {"secret": {"name": "files", "items": [{"key": "server", "path": "server"}]}},
                            {"serviceAccountToken": token_source},
                        ]
                    },
                }
            ],
        },
    }


def test_the_kubelet_writes_a_projected_token_and_secret_keys_and_rotates(
    pair: tuple[ApiServer, ApiServer], tmp_path: Path
) -> None:
    c1, c2 = pair
    core = client.CoreV1Api(c1.admin_client())
    core.create_namespaced_secret("default", {"metadata": {"name": "files"}, "stringData": {"server": c2.url}})
    core.create_namespaced_pod("default", projected_pod())
    kubelet = Kubelet(c1, tmp_path)
    kubelet.mount("default", "p")
    files = kubelet.container_root("default", "p", "c") / "var/run/creds"
    assert (files / "server").read_text() == c2.url
    first = (files / "token").read_text()
    claims = decode_unverified(first)
    assert claims["aud"] == ["cluster2"] and claims["sub"] == "system:serviceaccount:default:fed"
    assert claims["exp"] - claims["iat"] == 3600
    entries = os.listdir(files)
    assert {e for e in entries if not e.startswith("..2")} == {"..data", "server", "token"}
    assert (files / "token").is_symlink() and os.readlink(files / "token") == "..data/token"
    assert who(c2, first)["username"] == "cluster1:system:serviceaccount:default:fed"
    assert kubelet.rotate(force=False) == 0
    assert kubelet.rotate(now=claims["exp"], force=False) == 2  # this volume and the kube-api-access one
    # Tokens issued within the same second are identical: rotate until the clock has moved on.
    wait_for(lambda: kubelet.rotate() and (files / "token").read_text() != first, "a new token", timeout=10)
    assert len([d for d in os.listdir(files) if d.startswith("..2")]) == 1  # the old generation is gone


def test_the_kubelet_refuses_a_missing_secret_as_the_pod_would_stay_creating(
    pair: tuple[ApiServer, ApiServer], tmp_path: Path
) -> None:
    c1, _ = pair
    client.CoreV1Api(c1.admin_client()).create_namespaced_pod("default", projected_pod(audience=None))
    with pytest.raises(VolumeError, match='secret "files" not found'):
        Kubelet(c1, tmp_path).mount("default", "p")


def test_the_command_line_trusts_an_authentication_config_file_and_reloads_it(
    api_server_factory: Any, tmp_path: Path
) -> None:
    import subprocess
    import sys

    import yaml

    c1 = api_server_factory(name="cluster1")
    client.RbacAuthorizationV1Api(c1.admin_client()).create_cluster_role_binding(DISCOVERY_BINDING)
    sa(c1, "fed")
    config_file = tmp_path / "authn.yaml"
    config_file.write_text(yaml.safe_dump(trust(c1, audience="other")))
    kubeconfig = tmp_path / "kc"
    process = subprocess.Popen(
        [sys.executable, "-m", "kubemcsa_testing", "--name", "cluster2", "--kubeconfig-out", str(kubeconfig),
         "--authentication-config", str(config_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert "serving" in process.stdout.readline()
        cluster = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]
        server = cluster["server"]
        context = ssl.create_default_context(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
        token = c1.issue_token("default", "fed", audiences=["cluster2"])

        def status() -> int:
            request = urllib.request.Request(
                f"{server}/apis/authentication.k8s.io/v1/selfsubjectreviews",
                data=b'{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}',
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, context=context, timeout=5) as response:
                    return response.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert status() == 401  # another audience
        config_file.write_text(yaml.safe_dump(trust(c1)))
        assert "reloaded" in process.stdout.readline()
        assert wait_for(lambda: status() == 201, "the reloaded configuration", timeout=10)
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
