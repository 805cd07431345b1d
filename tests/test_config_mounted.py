"""kubemcsa.config without a cluster: finding mounted imports, kubeconfig parsing, errors, the rotation hook."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
import yaml
from kubernetes.client import Configuration

from kubemcsa import config
from kubemcsa.contract import api
from kubemcsa.contract.credentials import Credentials, CredentialsError, build_kubeconfig

FAKE_CA = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
TOKEN = "header.payload.signature-secret"


def mount(root: Path, name: str, token: str = TOKEN, namespace: str = "default") -> Path:
    """Write an import's files as the kubelet would (without the ..data symlink dance)."""
    directory = root / name
    directory.mkdir(parents=True)
    creds = Credentials(server="https://cluster2.example:6443", ca_crt=FAKE_CA, token=token, namespace=namespace)
    (directory / "ca.crt").write_bytes(FAKE_CA)
    (directory / "namespace").write_text(namespace)
    (directory / "token").write_text(token)
    (directory / "server").write_text(creds.server)
    (directory / "config").write_text(build_kubeconfig(creds, "cluster2"))
    return directory


def test_mounted_import_names_ignores_files_hidden_entries_and_a_missing_root(tmp_path: Path) -> None:
    assert config.mounted_import_names(tmp_path / "absent") == []
    mount(tmp_path, "b")
    mount(tmp_path, "a")
    (tmp_path / "..data").mkdir()
    (tmp_path / "stray-file").write_text("x")
    assert config.mounted_import_names(tmp_path) == ["a", "b"]


def test_named_import_gives_server_ca_namespace_and_token(tmp_path: Path) -> None:
    mount(tmp_path, "cluster2-default-pod-lister", namespace="team-a")
    result = config.import_config_and_namespace("cluster2-default-pod-lister", tmp_path)
    assert result.namespace == "team-a"
    assert result.config.host == "https://cluster2.example:6443"
    assert result.config.ssl_ca_cert == str(tmp_path / "cluster2-default-pod-lister" / "ca.crt")
    assert result.config.get_api_key_with_prefix("BearerToken") == f"Bearer {TOKEN}"


def test_the_only_import_is_picked_without_a_name(tmp_path: Path) -> None:
    mount(tmp_path, "only")
    assert config.import_config_and_namespace(mount_root=tmp_path).namespace == "default"


@pytest.mark.parametrize("names", [[], ["a", "b"]])
def test_none_or_several_imports_without_a_name_is_a_clear_error(tmp_path: Path, names: list[str]) -> None:
    for name in names:
        mount(tmp_path, name)
    with pytest.raises(config.ConfigError, match="no service account import|several service account imports"):
        config.import_config_and_namespace(mount_root=tmp_path)


def test_an_unmounted_name_is_an_error_that_says_how_to_mount_it(tmp_path: Path) -> None:
    mount(tmp_path, "a")
    with pytest.raises(config.ConfigError, match=api.IMPORT_ANNOTATION):
        config.import_config_and_namespace("b", tmp_path)


def test_a_broken_mount_raises_a_credentials_error_without_the_token(tmp_path: Path) -> None:
    directory = mount(tmp_path, "a")
    (directory / "server").write_text("http://plain-http")
    with pytest.raises(CredentialsError) as info:
        config.all_import_configs_and_namespaces(tmp_path)
    assert TOKEN not in str(info.value)


def test_the_repr_never_shows_the_token(tmp_path: Path) -> None:
    mount(tmp_path, "a")
    result = config.import_config_and_namespace("a", tmp_path)
    assert TOKEN not in repr(result)
    assert TOKEN not in repr(result.config.refresh_api_key_hook)


def test_the_hook_rereads_a_changed_token_file_and_keeps_the_old_one_while_it_is_missing(tmp_path: Path) -> None:
    directory = mount(tmp_path, "a")
    cfg = config.import_config_and_namespace("a", tmp_path).config
    # The kubelet swaps a symlink; writing a new file and renaming it over the old one does the same to a stat.
    new = directory / ".token.new"
    new.write_text("rotated-token-longer\n")
    os.replace(new, directory / "token")
    assert cfg.get_api_key_with_prefix("BearerToken") == "Bearer rotated-token-longer"
    (directory / "token").unlink()
    assert cfg.get_api_key_with_prefix("BearerToken") == "Bearer rotated-token-longer"
    (directory / "token").write_text("")  # a write in progress
    assert cfg.get_api_key_with_prefix("BearerToken") == "Bearer rotated-token-longer"
    (directory / "token").write_text("third")
    assert cfg.get_api_key_with_prefix("BearerToken") == "Bearer third"


def write_kubeconfig(path: Path, contexts: dict[str, str | None], current: str | None = None) -> Path:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": f"cl-{name}",
                "cluster": {
                    "server": f"https://{name}.example:6443",
                    "certificate-authority-data": base64.b64encode(FAKE_CA).decode(),
                },
            }
            for name in contexts
        ],
        "users": [{"name": "admin", "user": {"token": "admin-token"}}],
        "contexts": [
            {"name": name, "context": {"cluster": f"cl-{name}", "user": "admin", **({"namespace": ns} if ns else {})}}
            for name, ns in contexts.items()
        ],
        "current-context": current or next(iter(contexts)),
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def test_context_cluster_info_reads_name_server_ca_and_namespace(tmp_path: Path) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "kc", {"one": "ns1", "two": None}, current="two")
    info = config.context_cluster_info(None, str(kubeconfig))
    assert (info.context, info.cluster_name, info.server, info.namespace) == (
        "two",
        "cl-two",
        "https://two.example:6443",
        "default",
    )
    assert info.ca_pem == FAKE_CA
    assert config.context_cluster_info("one", str(kubeconfig)).namespace == "ns1"


def test_context_cluster_info_reads_a_relative_ca_file(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(FAKE_CA)
    doc = {
        "clusters": [{"name": "c", "cluster": {"server": "https://c:1", "certificate-authority": "ca.pem"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c"}}],
        "current-context": "x",
    }
    (tmp_path / "kc").write_text(yaml.safe_dump(doc))
    assert config.context_cluster_info(None, str(tmp_path / "kc")).ca_pem == FAKE_CA


@pytest.mark.parametrize(
    ("content", "context", "message"),
    [
        ("- not a mapping", None, "not a YAML mapping"),
        ("clusters: [}", None, "cannot read kubeconfig"),
        ("contexts: []", None, "no current context"),
        ("contexts: []\ncurrent-context: x", None, "context 'x' is not in the kubeconfig"),
        ("contexts: [{name: x, context: {cluster: c}}]\ncurrent-context: x", None, "cluster 'c' is not"),
        (
            "clusters: [{name: c, cluster: {server: 'http://c'}}]\ncontexts: [{name: x, context: {cluster: c}}]",
            "x",
            "no https:// server",
        ),
        (
            "clusters: [{name: c, cluster: {server: 'https://c'}}]\ncontexts: [{name: x, context: {cluster: c}}]",
            "x",
            "no certificate authority",
        ),
    ],
)
def test_bad_kubeconfigs_give_one_clear_sentence(
    tmp_path: Path, content: str, context: str | None, message: str
) -> None:
    (tmp_path / "kc").write_text(content)
    with pytest.raises(config.ConfigError, match=message):
        config.context_cluster_info(context, str(tmp_path / "kc"))


def test_a_missing_kubeconfig_says_how_to_point_at_one(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="KUBECONFIG"):
        config.load_kubeconfig_dict(str(tmp_path / "nope"))


def test_kubeconfig_lists_merge_with_the_first_file_winning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = write_kubeconfig(tmp_path / "a", {"one": "from-a"})
    second = write_kubeconfig(tmp_path / "b", {"one": "from-b", "two": None})
    monkeypatch.setenv("KUBECONFIG", f"{first}{os.pathsep}{second}")
    doc = config.load_kubeconfig_dict()
    assert [c["name"] for c in doc["contexts"]] == ["one", "two"]
    assert config.kubeconfig_context(doc, "one")["namespace"] == "from-a"
    assert doc["current-context"] == "one"


def test_generic_lookup_prefers_a_mounted_import_then_a_context(tmp_path: Path) -> None:
    mount(tmp_path / "mounts", "cluster2")
    kubeconfig = str(write_kubeconfig(tmp_path / "kc", {"cluster2": "ctx-ns", "other": "other-ns"}))
    by_import = config.config_and_namespace("cluster2", mount_root=tmp_path / "mounts", kubeconfig=kubeconfig)
    assert by_import.config.host == "https://cluster2.example:6443"
    assert by_import.namespace == "default"
    by_context = config.config_and_namespace("other", mount_root=tmp_path / "mounts", kubeconfig=kubeconfig)
    assert (by_context.config.host, by_context.namespace) == ("https://other.example:6443", "other-ns")
    everything = config.all_named_configs_and_namespaces(mount_root=tmp_path / "mounts", kubeconfig=kubeconfig)
    assert sorted(everything) == ["cluster2", "other"]
    assert everything["cluster2"].namespace == "default"  # the import wins over the context of the same name


def test_generic_lookup_with_nothing_anywhere_says_what_it_tried(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="no mounted service account import.*no kubeconfig.*in-cluster"):
        config.config_and_namespace(
            mount_root=tmp_path / "m", kubeconfig=str(tmp_path / "kc"), service_account_dir=tmp_path, environ={}
        )
    with pytest.raises(config.ConfigError, match="neither a mounted"):
        config.config_and_namespace("x", mount_root=tmp_path / "m", kubeconfig=str(tmp_path / "kc"))


def test_in_cluster_outside_a_pod_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="not running in a pod"):
        config.in_cluster_config_and_namespace(tmp_path, environ={})


def test_a_configuration_is_the_official_clients(tmp_path: Path) -> None:
    mount(tmp_path, "a")
    assert isinstance(config.import_config_and_namespace("a", tmp_path).config, Configuration)


def test_the_hook_follows_a_kubelet_style_symlink_swap(tmp_path: Path) -> None:
    from kubemcsa.contract.credentials import to_secret_data
    from kubemcsa_testing.demo import write_secret_files

    def secret(token: str) -> dict:
        creds = Credentials(server="https://c2:6443", ca_crt=FAKE_CA, token=token, namespace="default")
        return {"data": to_secret_data(creds, "cluster2")}

    write_secret_files(secret("first-token"), tmp_path / "imp")
    cfg = config.import_config_and_namespace("imp", tmp_path).config
    assert cfg.get_api_key_with_prefix("BearerToken") == "Bearer first-token"
    write_secret_files(secret("second-token"), tmp_path / "imp")
    assert cfg.get_api_key_with_prefix("BearerToken") == "Bearer second-token"
    assert config.mounted_import_names(tmp_path) == ["imp"]
    assert (
        len([p for p in (tmp_path / "imp").iterdir() if p.name.startswith("..") and p.is_dir() and not p.is_symlink()])
        == 1
    )
