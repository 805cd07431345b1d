"""Argo CD's declarative cluster Secret (kubemcsa.contract.argocd), field by field against Argo CD's documented format,
and spec.argoCD (parsing, and the CRD's schema as the API server enforces it).

Argo CD's operator manual, "Declarative Setup" > "Clusters": a Secret labelled
`argocd.argoproj.io/secret-type: cluster` whose data has `name`, `server`, `config` (JSON: `bearerToken`,
`execProviderConfig` {command, args, env, apiVersion, installHint}, `tlsClientConfig` {caData, certData, keyData,
insecure, serverName}, ...) and the optional `namespaces` (comma-separated), `clusterResources` ("true"/"false")
and `project`. `caData` is base64 PEM.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kubernetes.client.exceptions import ApiException

from kubemcsa.client import kube
from kubemcsa.contract import api, argocd
from kubemcsa.contract.spec import SpecError, parse_spec
from kubemcsa.contract.timefmt import parse_time
from kubemcsa_testing import crd_manifest

ROOT = Path(__file__).resolve().parent.parent
CA = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
SERVER = "https://10.0.0.1:6443"
# Every key Argo CD documents for a cluster Secret's data, and for its config JSON.
ARGOCD_DATA_KEYS = {"name", "server", "config", "namespaces", "clusterResources", "project"}
ARGOCD_CONFIG_KEYS = {
    "username",
    "password",
    "bearerToken",
    "awsAuthConfig",
    "execProviderConfig",
    "proxyUrl",
    "tlsClientConfig",
    "disableCompression",
}
ARGOCD_TLS_KEYS = {"caData", "certData", "insecure", "keyData", "serverName"}
ARGOCD_EXEC_KEYS = {"command", "args", "env", "apiVersion", "installHint"}


def plain(data: dict[str, str]) -> dict[str, str]:
    return {key: base64.b64decode(value).decode() for key, value in data.items()}


def test_bearer_token_secret_has_exactly_argo_cds_keys_and_format():
    data = argocd.cluster_secret_data(
        argocd.ArgoCDCluster(name="prod-eu"), SERVER, argocd.bearer_token_config("tok.en", CA)
    )
    decoded = plain(data)
    assert set(decoded) == {"name", "server", "config"}
    assert decoded["name"] == "prod-eu"
    assert decoded["server"] == SERVER
    config = json.loads(decoded["config"])
    assert set(config) == {"bearerToken", "tlsClientConfig"} and set(config) <= ARGOCD_CONFIG_KEYS
    assert config["bearerToken"] == "tok.en"
    assert set(config["tlsClientConfig"]) == {"caData", "insecure"} <= ARGOCD_TLS_KEYS
    assert config["tlsClientConfig"]["insecure"] is False
    # caData is a Go []byte: base64 of the PEM bundle itself.
    assert base64.b64decode(config["tlsClientConfig"]["caData"], validate=True) == CA
    assert argocd.CLUSTER_LABELS == {"argocd.argoproj.io/secret-type": "cluster"}


def test_optional_keys_are_written_as_argo_cd_reads_them():
    cluster = argocd.ArgoCDCluster(name="c", namespaces=("team-a", "team-b"), cluster_resources=True, project="p1")
    decoded = plain(argocd.cluster_secret_data(cluster, SERVER, argocd.bearer_token_config("t", CA)))
    assert set(decoded) == ARGOCD_DATA_KEYS
    assert decoded["namespaces"] == "team-a,team-b"
    assert decoded["clusterResources"] == "true"
    assert decoded["project"] == "p1"
    off = argocd.ArgoCDCluster(name="c", namespaces=("a",), cluster_resources=False)
    assert plain(argocd.cluster_secret_data(off, SERVER, {}))["clusterResources"] == "false"
    # clusterResources means nothing without namespaces: never written alone.
    alone = argocd.ArgoCDCluster(name="c", cluster_resources=True)
    assert "clusterResources" not in plain(argocd.cluster_secret_data(alone, SERVER, {}))


def test_the_secret_data_is_stable_so_an_unchanged_secret_is_never_rewritten():
    cluster = argocd.ArgoCDCluster(name="c", namespaces=("a",), project="p")
    first = argocd.cluster_secret_data(cluster, SERVER, argocd.bearer_token_config("t", CA))
    assert first == argocd.cluster_secret_data(cluster, SERVER, argocd.bearer_token_config("t", CA))


def test_token_file_config_is_an_exec_provider_that_prints_the_files_current_token(tmp_path):
    token_file = tmp_path / "dir with 'quotes' and $(spaces)" / "token"
    token_file.parent.mkdir()
    token_file.write_text("eyJhbGciOi.first\n")
    config = argocd.token_file_config(str(token_file), CA)
    assert set(config) == {"execProviderConfig", "tlsClientConfig"}
    exec_config = config["execProviderConfig"]
    assert set(exec_config) <= ARGOCD_EXEC_KEYS
    assert exec_config["apiVersion"] == "client.authentication.k8s.io/v1"
    assert base64.b64decode(config["tlsClientConfig"]["caData"]) == CA

    def run_plugin() -> dict:  # as client-go runs an exec plugin: command, args, stdout is an ExecCredential
        out = subprocess.run(
            [exec_config["command"], *exec_config["args"]], capture_output=True, text=True, check=True, timeout=10
        )
        return json.loads(out.stdout)

    before = time.time()
    credential = run_plugin()
    assert credential["apiVersion"] == "client.authentication.k8s.io/v1"
    assert credential["kind"] == "ExecCredential"
    assert set(credential["status"]) == {"token", "expirationTimestamp"}
    assert credential["status"]["token"] == "eyJhbGciOi.first"
    # client-go runs the plugin again once this passes: the file is read anew at least once a minute.
    expiry = parse_time(credential["status"]["expirationTimestamp"])
    assert before + argocd.EXEC_CACHE_SECONDS - 2 <= expiry <= time.time() + argocd.EXEC_CACHE_SECONDS + 1
    token_file.write_text("eyJhbGciOi.rotated")  # the kubelet rotates the file: the next call reads the new token
    assert run_plugin()["status"]["token"] == "eyJhbGciOi.rotated"
    token_file.unlink()  # no file: the plugin fails, and client-go reports it, instead of an empty token
    with pytest.raises(subprocess.CalledProcessError):
        run_plugin()


def test_read_back_as_argo_cd_reads_it():
    cluster = argocd.ArgoCDCluster(name="c", namespaces=("a", "b"), cluster_resources=False, project="p")
    secret = argocd.read_cluster_secret_data(
        argocd.cluster_secret_data(cluster, SERVER, argocd.bearer_token_config("tok", CA))
    )
    assert (secret.name, secret.server, secret.bearer_token, secret.ca_pem) == ("c", SERVER, "tok", CA)
    assert (secret.namespaces, secret.cluster_resources, secret.project) == (("a", "b"), False, "p")
    assert "tok" not in repr(secret)


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        ({}, "lacks the key(s) name, server, config"),
        ({"name": "eA==", "server": "eA=="}, "lacks the key(s) config"),
        ({"name": "!!", "server": "eA==", "config": "e30="}, "'name'"),
        ({"name": "eA==", "server": "eA==", "config": base64.b64encode(b"sec{ret").decode()}, "not JSON"),
        ({"name": "eA==", "server": "eA==", "config": base64.b64encode(b"[1]").decode()}, "not a JSON object"),
    ],
)
def test_unreadable_secrets_say_which_key(data, complaint):
    with pytest.raises(argocd.ArgoCDSecretError) as info:
        argocd.read_cluster_secret_data(data)
    assert complaint in str(info.value)
    assert "sec{ret" not in str(info.value)


@given(token=st.text(min_size=1), ca=st.binary(), name=st.text(min_size=1), server=st.text())
def test_any_credentials_round_trip(token, ca, name, server):
    data = argocd.cluster_secret_data(argocd.ArgoCDCluster(name=name), server, argocd.bearer_token_config(token, ca))
    secret = argocd.read_cluster_secret_data(data)
    assert (secret.name, secret.server, secret.bearer_token, secret.ca_pem) == (name, server, token, ca)


# --- spec.argoCD -------------------------------------------------------------------------------------------------


def spec(**argocd_spec) -> dict:
    return {"spec": {"clusterName": "cluster2", "namespace": "ns", "name": "sa", "argoCD": argocd_spec}}


def test_argocd_is_optional_and_its_name_defaults_to_the_cluster_name():
    assert parse_spec({"spec": {"clusterName": "c", "namespace": "n", "name": "s"}}).argocd is None
    assert parse_spec({"spec": {"clusterName": "c", "namespace": "n", "name": "s", "argoCD": None}}).argocd is None
    assert parse_spec(spec()).argocd == argocd.ArgoCDCluster(name="cluster2")
    parsed = parse_spec(spec(name="prod-eu", namespaces=["a", "b", "a"], clusterResources=True, project="p"))
    assert parsed.argocd == argocd.ArgoCDCluster(
        name="prod-eu", namespaces=("a", "b"), cluster_resources=True, project="p"
    )


def test_argocd_does_not_change_what_the_token_depends_on():
    with_argocd = parse_spec(spec(name="x"))
    without = parse_spec({"spec": {"clusterName": "cluster2", "namespace": "ns", "name": "sa"}})
    assert with_argocd.fingerprint_fields() == without.fingerprint_fields()


@pytest.mark.parametrize(
    ("argocd_spec", "field"),
    [
        ("prod", "spec.argoCD must be an object"),
        ({"name": ""}, "spec.argoCD.name"),
        ({"name": 3}, "spec.argoCD.name"),
        ({"project": "Not A Name"}, "spec.argoCD.project"),
        ({"namespaces": "a,b"}, "spec.argoCD.namespaces"),
        ({"namespaces": ["UPPER"]}, "spec.argoCD.namespaces"),
        ({"namespaces": ["a"], "clusterResources": "yes"}, "spec.argoCD.clusterResources"),
        ({"clusterResources": True}, "only applies with spec.argoCD.namespaces"),
    ],
)
def test_bad_argocd_specs_say_what_to_fix(argocd_spec, field):
    obj = {"spec": {"clusterName": "c", "namespace": "n", "name": "s", "argoCD": argocd_spec}}
    with pytest.raises(SpecError) as info:
        parse_spec(obj)
    assert field in str(info.value)


ARGOCD_FIELDS = st.sampled_from(["name", "project", "namespaces", "clusterResources", "x"])


@given(st.dictionaries(ARGOCD_FIELDS, st.from_type(object)))
def test_any_argocd_value_parses_or_raises_spec_error(value):
    try:
        parse_spec({"spec": {"clusterName": "c", "namespace": "n", "name": "s", "argoCD": value}})
    except SpecError:
        pass


# --- the CRD's schema, enforced by the API server ------------------------------------------------------------------


@pytest.fixture
def imports(cluster1):
    admin = cluster1.admin_client()
    kube.Resource(admin, kube.resource_type_of(crd_manifest())).create(crd_manifest())
    return kube.Resource(admin, kube.SERVICE_ACCOUNT_IMPORTS)


def an_import(name: str, argocd_spec: object) -> dict:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterName": "cluster2", "namespace": "ns", "name": "sa", "argoCD": argocd_spec},
    }


def test_the_crd_accepts_argo_cds_fields(imports):
    full = {"name": "prod-eu", "namespaces": ["a", "b"], "clusterResources": True, "project": "team.p"}
    created = imports.create(an_import("full", full), "default")
    assert created["spec"]["argoCD"] == full
    assert imports.create(an_import("empty", {}), "default")["spec"]["argoCD"] == {}


@pytest.mark.parametrize(
    ("argocd_spec", "field"),
    [
        ({"name": ""}, "spec.argoCD.name"),
        ({"namespaces": []}, "spec.argoCD.namespaces"),
        ({"namespaces": ["a", "a"]}, "spec.argoCD.namespaces[1]"),
        ({"namespaces": ["Team_A"]}, "spec.argoCD.namespaces[0]"),
        ({"project": "Bad Project"}, "spec.argoCD.project"),
        ({"clusterResources": "true", "namespaces": ["a"]}, "spec.argoCD.clusterResources"),
        ({"clusterResources": True}, "only applies with spec.argoCD.namespaces"),
        ("prod-eu", "spec.argoCD"),
    ],
)
def test_the_crd_rejects_what_argo_cd_would_not_take(imports, argocd_spec, field):
    with pytest.raises(ApiException) as info:
        imports.create(an_import("bad", argocd_spec), "default")
    assert info.value.status == 422
    assert field in info.value.body
