"""`kubemcsa federate` against two in-memory clusters, and the pure federation helpers.

cluster1 is the target (its pods call out with their own tokens), cluster2 the source (it trusts cluster1's
issuer once its administrator adds the printed AuthenticationConfiguration).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from kubernetes.client.exceptions import ApiException

from kubemcsa import cli
from kubemcsa.client import kube
from kubemcsa.contract import api, federation
from kubemcsa.contract.federation import FederatedSource, FederationError
from kubemcsa_testing.oidc import parse_authentication_configuration

SYSTEM = api.SYSTEM_NAMESPACE
FAKE_CA = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


@pytest.fixture
def clusters(cluster1, cluster2, kubeconfig_paths: dict[str, Path]) -> dict[str, Any]:
    return {"cluster1": cluster1, "cluster2": cluster2, "paths": kubeconfig_paths}


def federate_argv(clusters: dict[str, Any], *extra: str) -> list[str]:
    return [
        "federate",
        "--target-context",
        "cluster1",
        "--target-kubeconfig",
        str(clusters["paths"]["cluster1"]),
        "--source-context",
        "cluster2",
        "--source-kubeconfig",
        str(clusters["paths"]["cluster2"]),
        *extra,
    ]


def printed_configuration(out: str) -> dict[str, Any]:
    """The AuthenticationConfiguration federate printed, as the administrator would copy it."""
    start = out.index("apiVersion: apiserver.config.k8s.io")
    end = out.index("\n\n", start)
    return yaml.safe_load(out[start:end])


def test_federate_records_the_source_binds_discovery_and_prints_a_configuration_cluster2_accepts(
    clusters, capsys
) -> None:
    c1, c2 = clusters["cluster1"], clusters["cluster2"]
    assert cli.main(federate_argv(clusters, "--check")) == 1  # nothing trusted yet
    assert "does not trust target cluster 'cluster1' yet" in capsys.readouterr().out

    assert cli.main(federate_argv(clusters)) == 0
    out = capsys.readouterr().out
    assert f"ClusterRoleBinding {federation.DISCOVERY_BINDING_NAME} created" in out
    assert "--no-discovery-binding" in out
    assert f"ConfigMap {SYSTEM}/federated-cluster2 created" in out
    assert f"ServiceAccount {SYSTEM}/{api.TRUST_CHECK_SERVICE_ACCOUNT} created" in out
    assert "cluster1:system:serviceaccount:<namespace>:<service account>" in out
    recorded = federation.source_from_configmap(
        kube.Resource(c1.admin_client(), kube.CONFIG_MAPS).get("federated-cluster2", SYSTEM)
    )
    assert recorded == FederatedSource("cluster2", c2.url, c2.ca_pem, "cluster2", "cluster1:", c1.authority.issuer)
    config = printed_configuration(out)
    assert config["jwt"][0]["issuer"]["url"] == c1.authority.issuer
    assert config["jwt"][0]["issuer"]["audiences"] == ["cluster2"]
    assert config["jwt"][0]["claimMappings"] == {"username": {"claim": "sub", "prefix": "cluster1:"}}
    assert "--oidc-issuer-url=" in out  # the issuer is the API URL: the old flags suffice here
    assert not re.search(r"eyJ[\w-]{8,}\.eyJ[\w-]{8,}\.", out)  # no token printed (a CA may hold "eyJ")

    c2.configure_authentication(config)  # what the administrator of cluster2 does
    assert cli.main(federate_argv(clusters, "--check")) == 0
    # The check's token is of the trust-check account, bound to nothing here (never default/default, which may
    # hold RBAC in some clusters).
    check_user = f"cluster1:system:serviceaccount:{SYSTEM}:{api.TRUST_CHECK_SERVICE_ACCOUNT}"
    assert f"is user '{check_user}' there" in (capsys.readouterr().out)

    before = kube.Resource(c1.admin_client(), kube.CONFIG_MAPS).get("federated-cluster2", SYSTEM)
    assert cli.main(federate_argv(clusters)) == 0  # a second run changes nothing
    assert "updated" not in capsys.readouterr().out.replace("--", "")
    after = kube.Resource(c1.admin_client(), kube.CONFIG_MAPS).get("federated-cluster2", SYSTEM)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


def test_flags_change_audience_prefix_and_skip_the_binding(clusters, capsys) -> None:
    c1, c2 = clusters["cluster1"], clusters["cluster2"]
    argv = federate_argv(clusters, "--audience", "c2.example", "--user-prefix", "east:", "--no-discovery-binding")
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "ClusterRoleBinding" not in out
    with pytest.raises(ApiException):
        kube.Resource(c1.admin_client(), kube.CLUSTER_ROLE_BINDINGS).get(federation.DISCOVERY_BINDING_NAME)
    config = printed_configuration(out)
    assert config["jwt"][0]["issuer"]["audiences"] == ["c2.example"]
    c2.configure_authentication(config)
    # Without the binding cluster2 cannot fetch cluster1's keys: the check says it is not trusted.
    assert cli.main(federate_argv(clusters, "--check")) == 1
    capsys.readouterr()
    kube.Resource(c1.admin_client(), kube.CLUSTER_ROLE_BINDINGS).create(federation.discovery_binding())

    def trusted() -> bool:
        return cli.main(federate_argv(clusters, "--check")) == 0

    from kubemcsa_testing.wait import wait_for

    wait_for(trusted, "cluster2 to trust cluster1", timeout=10)
    assert f"'east:system:serviceaccount:{SYSTEM}:{api.TRUST_CHECK_SERVICE_ACCOUNT}'" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--user-prefix", "system:"], "does not start with system:"),
        (["--audience", "a b"], "audience without spaces"),
        (["--source-server", "http://plain"], "not an https:// URL"),
        (["--source-name", "Bad_Name"], "not a valid Kubernetes name"),
    ],
)
def test_bad_flags_are_one_sentence_errors(clusters, capsys, extra: list[str], message: str) -> None:
    assert cli.main(federate_argv(clusters, *extra)) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_an_unreachable_target_is_a_clear_error(clusters, capsys) -> None:
    clusters["cluster1"].stop()
    assert cli.main(federate_argv(clusters)) == cli.EXIT_ERROR
    assert "cannot reach target cluster 'cluster1'" in capsys.readouterr().err


# --- pure helpers ------------------------------------------------------------------------------------------


def source(**overrides: Any) -> FederatedSource:
    values = {
        "cluster_name": "cluster2",
        "server": "https://c2.example:6443",
        "ca_pem": FAKE_CA,
        "audience": "cluster2",
        "user_prefix": "cluster1:",
        **overrides,
    }
    return FederatedSource(**values)


def test_the_configmap_round_trips_and_holds_nothing_secret() -> None:
    obj = federation.source_configmap(source(issuer="https://c1.example"))
    assert obj["metadata"]["labels"] == {federation.FEDERATED_SOURCE_LABEL: "true"}
    assert set(obj["data"]) == {"clusterName", "server", "ca.crt", "audience", "userPrefix", "issuer"}
    assert federation.source_from_configmap(obj) == source(issuer="https://c1.example")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("server", "http://x", "https"),
        ("ca.crt", "nope", "PEM"),
        ("audience", "", "audience"),
        ("userPrefix", "", "prefix"),
        ("clusterName", "Not Valid", "valid Kubernetes name"),
    ],
)
def test_a_broken_configmap_names_the_field_and_the_fix(key: str, value: str, message: str) -> None:
    obj = federation.source_configmap(source())
    obj["data"][key] = value
    with pytest.raises(FederationError, match=message) as info:
        federation.source_from_configmap(obj)
    assert "kubemcsa federate" in str(info.value)


def test_a_configmap_missing_keys_says_which() -> None:
    with pytest.raises(FederationError, match="lacks clusterName, server"):
        federation.source_from_configmap({"metadata": {"name": "x"}, "data": {"ca.crt": "x"}})


def test_discovery_url_only_when_the_issuer_is_not_the_api_url() -> None:
    same = federation.authentication_configuration("https://c1:6443", "https://c1:6443/", FAKE_CA, source())
    assert "discoveryURL" not in same["jwt"][0]["issuer"]
    assert federation.oidc_flags("https://c1:6443", "https://c1:6443", source(), "/ca") is not None
    other = federation.authentication_configuration(
        "https://kubernetes.default.svc", "https://c1:6443", FAKE_CA, source()
    )
    assert other["jwt"][0]["issuer"]["discoveryURL"] == "https://c1:6443/.well-known/openid-configuration"
    assert federation.oidc_flags("https://kubernetes.default.svc", "https://c1:6443", source(), "/ca") is None


@given(
    prefix=st.from_regex(r"[a-z][a-z0-9-]{0,20}:", fullmatch=True),
    audience=st.from_regex(r"[a-z][a-z0-9.-]{0,30}", fullmatch=True),
)
def test_every_printed_configuration_is_one_kube_apiserver_accepts(prefix: str, audience: str) -> None:
    config = federation.authentication_configuration(
        "https://kubernetes.default.svc", "https://c1:6443", FAKE_CA, source(user_prefix=prefix, audience=audience)
    )
    text = federation.render_authentication_configuration(config)
    (issuer,) = parse_authentication_configuration(text)
    assert issuer.username_prefix == prefix and issuer.audiences == (audience,)


def test_configmap_names_stay_valid_for_long_cluster_names() -> None:
    name = federation.configmap_name("a" * 253)
    assert len(name) <= 253 and api.is_dns_subdomain(name)
    assert re.fullmatch(r"federated-a+-[0-9a-f]{8}", name)


def test_several_audiences_are_recorded_and_trusted_the_first_being_the_default(clusters, capsys) -> None:
    """Only an admin chooses where a token may go: each --audience is one imports of the source may ask for."""
    c1, c2 = clusters["cluster1"], clusters["cluster2"]
    assert cli.main(federate_argv(clusters, "--audience", "c2.example", "--audience", "c2-ci")) == 0
    out = capsys.readouterr().out
    data = kube.Resource(c1.admin_client(), kube.CONFIG_MAPS).get("federated-cluster2", SYSTEM)["data"]
    assert (data["audience"], data["audiences"]) == ("c2.example", "c2.example,c2-ci")
    config = printed_configuration(out)
    assert config["jwt"][0]["issuer"]["audiences"] == ["c2.example", "c2-ci"]
    assert config["jwt"][0]["issuer"]["audienceMatchPolicy"] == "MatchAny"
    assert "--oidc-issuer-url=" not in out  # the old flags take one audience only
    c2.configure_authentication(config)  # kube-apiserver's rules: several audiences need MatchAny
    assert cli.main(federate_argv(clusters, "--check")) == 0


@pytest.mark.parametrize("audience", ["<issuer>", "https://kubernetes.default.svc"])
def test_an_audience_of_the_target_itself_is_refused(clusters, capsys, audience: str) -> None:
    """A token for it would be valid in the target too: recording it would let a source's admins replay it here."""
    if audience == "<issuer>":
        audience = clusters["cluster1"].authority.issuer
    assert cli.main(federate_argv(clusters, "--audience", "cluster2", "--audience", audience)) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "API audience of target cluster 'cluster1'" in err and err.count("\n") == 1
    with pytest.raises(ApiException):
        kube.Resource(clusters["cluster1"].admin_client(), kube.CONFIG_MAPS).get("federated-cluster2", SYSTEM)


def test_an_audience_list_with_blanks_or_commas_is_refused() -> None:
    with pytest.raises(FederationError, match="space or comma"):
        federation.check_source(source(audiences=("a,b",)))
    with pytest.raises(FederationError, match="more than 16"):
        federation.check_source(source(audiences=tuple(f"a{i}" for i in range(16))))
