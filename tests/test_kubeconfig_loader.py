"""kubemcsa.client.kubeconfig, the one kubeconfig loader: secrets stay in memory, paths follow the file,
tokenFile rotates."""

from __future__ import annotations

import base64
import contextlib
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from kubemcsa.client import kube
from kubemcsa.client.kubeconfig import (
    ConfigError,
    configuration_for,
    load_api_client,
    load_kubeconfig_dict,
    referenced_files,
    resolve_context,
)


def kubeconfig_doc(cluster: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    return {
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "ns"}}],
        "current-context": "x",
    }


def write(path: Path, doc: dict[str, Any]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_certificate_data_stays_in_memory(tmp_path: Path) -> None:
    cert, key = b"-----BEGIN CERTIFICATE-----\ncert\n", b"-----BEGIN PRIVATE KEY-----\nkey\n"
    doc = kubeconfig_doc(
        {"server": "https://c:6443", "certificate-authority-data": base64.b64encode(b"the CA").decode()},
        {"client-certificate-data": base64.b64encode(cert).decode(), "client-key-data": base64.b64encode(key).decode()},
    )
    configuration = configuration_for(resolve_context(doc))
    assert configuration.host == "https://c:6443"
    assert configuration.ca_cert_data == "the CA" and configuration.ssl_ca_cert is None
    if hasattr(os, "memfd_create"):
        assert configuration.cert_file.startswith("/proc/self/fd/")
        assert configuration.key_file.startswith("/proc/self/fd/")
    assert Path(configuration.cert_file).read_bytes() == cert
    assert Path(configuration.key_file).read_bytes() == key


def test_paths_are_relative_to_the_kubeconfig_that_names_them(tmp_path: Path) -> None:
    (tmp_path / "a" / "certs").mkdir(parents=True)
    (tmp_path / "a" / "certs" / "ca.crt").write_bytes(b"CA of a")
    first = write(
        tmp_path / "a" / "config",
        kubeconfig_doc({"server": "https://a", "certificate-authority": "certs/ca.crt"}, {"tokenFile": "token"}),
    )
    doc = load_kubeconfig_dict(first)
    assert referenced_files(doc) == sorted([str(tmp_path / "a" / "certs" / "ca.crt"), str(tmp_path / "a" / "token")])
    context = resolve_context(doc)
    assert (context.ca_pem, context.namespace) == (b"CA of a", "ns")
    with pytest.raises(ConfigError, match=r"cannot read the tokenFile .*/a/token of context 'x'"):
        configuration_for(context)


@pytest.mark.parametrize(
    ("cluster", "user", "message"),
    [
        ({"server": "https://c", "certificate-authority-data": "%%%"}, {}, "not base64"),
        ({"server": "https://c", "certificate-authority": "/nonexistent/ca"}, {}, "cannot read the CA file"),
        ({"server": "https://c"}, {"client-key-data": "%%%"}, "client-key-data is not base64"),
    ],
)
def test_unusable_material_is_one_sentence(cluster: dict, user: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        configuration_for(resolve_context(kubeconfig_doc(cluster, user)))
    assert "%%%" not in str(info.value)


def test_a_token_file_is_followed_when_it_rotates(cluster1: Any, tmp_path: Path) -> None:
    kube.Resource(cluster1.admin_client(), kube.SERVICE_ACCOUNTS).create({"metadata": {"name": "reader"}}, "default")
    doc = cluster1.kubeconfig()
    doc["users"][0]["user"] = {"token": "inline-token-is-not-used", "tokenFile": "token"}
    token = tmp_path / "token"
    token.write_text(cluster1.issue_token("default", "reader"))
    client = load_api_client(write(tmp_path / "config", doc))
    cluster1.reset_requests()

    def user_of_a_request() -> str:
        with contextlib.suppress(ApiException):  # allowed or not, the request is recorded with its user
            kube.Resource(client, kube.NAMESPACES).list()
        return cluster1.requests[-1].user

    assert user_of_a_request() == "system:serviceaccount:default:reader"
    token.write_text(cluster1.admin_token)  # rotated: the same client now sends the new token
    assert user_of_a_request() != "system:serviceaccount:default:reader"


def test_an_absent_token_file_falls_back_to_the_inline_token(cluster1: Any, tmp_path: Path) -> None:
    doc = cluster1.kubeconfig()
    doc["users"][0]["user"] = {"token": cluster1.admin_token, "tokenFile": "token"}
    client = load_api_client(write(tmp_path / "config", doc))
    assert kube.Resource(client, kube.NAMESPACES).list()["items"]
