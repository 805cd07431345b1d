import base64

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from kubemcsa.contract import api
from kubemcsa.contract.credentials import (
    Credentials,
    CredentialsError,
    build_kubeconfig,
    from_secret_data,
    read_mounted,
    to_secret_data,
)

CA = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
CREDS = Credentials(server="https://10.0.0.1:6443", ca_crt=CA, token="tok.en.value", namespace="default")


def test_secret_has_the_five_keys_of_the_original():
    data = to_secret_data(CREDS, "cluster2")
    assert sorted(data) == sorted(api.SECRET_KEYS)
    assert base64.b64decode(data["token"]) == b"tok.en.value"
    assert base64.b64decode(data["namespace"]) == b"default"


def test_round_trip_through_secret_data():
    assert from_secret_data(to_secret_data(CREDS, "c")) == CREDS


def test_kubeconfig_is_complete_and_follows_the_mounted_token():
    config = yaml.safe_load(build_kubeconfig(CREDS, "cluster2"))
    context = config["contexts"][0]["context"]
    assert config["current-context"] == "cluster2"
    assert context["namespace"] == "default"
    cluster = config["clusters"][0]["cluster"]
    assert cluster["server"] == CREDS.server
    assert base64.b64decode(cluster["certificate-authority-data"]) == CA
    user = config["users"][0]["user"]
    # Inline for clients that read it once; relative tokenFile so client-go re-reads the rotated mount.
    assert user["token"] == CREDS.token
    assert user["tokenFile"] == "token"


def test_repr_never_shows_the_token():
    assert "tok.en.value" not in repr(CREDS)
    assert "tok.en.value" not in str(CREDS)


def test_read_mounted_directory(tmp_path):
    for key, value in {
        "ca.crt": CA,
        "namespace": b"default",
        "token": b"tok.en.value\n",
        "server": CREDS.server.encode(),
    }.items():
        (tmp_path / key).write_bytes(value)
    assert read_mounted(tmp_path) == CREDS


def test_missing_file_names_it(tmp_path):
    (tmp_path / "token").write_text("x")
    with pytest.raises(CredentialsError, match="no file 'ca.crt'"):
        read_mounted(tmp_path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "lacks the key"),
        ({"ca.crt": "!!", "namespace": "", "token": "", "server": ""}, "not valid base64"),
        (
            {
                k: base64.b64encode(v).decode()
                for k, v in {"ca.crt": CA, "namespace": b"n", "token": b"t", "server": b"http://x"}.items()
            },
            "not an https",
        ),
        (
            {
                k: base64.b64encode(v).decode()
                for k, v in {"ca.crt": b"nope", "namespace": b"n", "token": b"t", "server": b"https://x"}.items()
            },
            "not a PEM",
        ),
        (
            {
                k: base64.b64encode(v).decode()
                for k, v in {"ca.crt": CA, "namespace": b"n", "token": b"", "server": b"https://x"}.items()
            },
            "empty token",
        ),
    ],
)
def test_bad_secret_data_is_refused_with_a_reason(data, message):
    with pytest.raises(CredentialsError, match=message) as info:
        from_secret_data(data)
    assert "tok.en" not in str(info.value)


@given(
    st.dictionaries(st.sampled_from(["ca.crt", "namespace", "token", "server", "config", "x"]), st.text(max_size=40))
)
def test_arbitrary_secret_data_never_crashes(data):
    try:
        from_secret_data(data)
    except CredentialsError:
        pass


# Any text at all (control characters, non-ASCII): the kubeconfig is PyYAML's pure safe_dump's, byte for byte.
_any_text = st.text(max_size=200)
# Printable ASCII, long enough to fold: the range where libyaml's emitter is used.
_ascii = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=400)


def _kubeconfig_text(server: str, ca: bytes, token: str, namespace: str, cluster: str, user: str | None) -> str:
    return build_kubeconfig(Credentials(server=server, ca_crt=ca, token=token, namespace=namespace), cluster, user)


def _pure(server: str, ca: bytes, token: str, namespace: str, cluster: str, user: str | None) -> str:
    user_entry = user or f"{cluster}-{namespace}"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": cluster,
                "cluster": {"server": server, "certificate-authority-data": base64.b64encode(ca).decode()},
            }
        ],
        "users": [{"name": user_entry, "user": {"token": token, "tokenFile": api.KEY_TOKEN}}],
        "contexts": [{"name": cluster, "context": {"cluster": cluster, "user": user_entry, "namespace": namespace}}],
        "current-context": cluster,
        "preferences": {},
    }
    return yaml.dump(config, Dumper=yaml.SafeDumper, sort_keys=False)


@settings(max_examples=500)
@given(_ascii, st.binary(max_size=3000), _ascii, _ascii, _ascii, st.none() | _ascii)
def test_kubeconfig_is_the_pure_emitters_byte_for_byte_in_printable_ascii(server, ca, token, namespace, cluster, user):
    assert _kubeconfig_text(server, ca, token, namespace, cluster, user) == _pure(
        server, ca, token, namespace, cluster, user
    )


# Tokens as API servers issue them (the emitter's shortcut: a template with the token put in its place).
_tokens = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._+/=-]{0,1200}", fullmatch=True) | st.sampled_from(
    ["true", "null", "e1", "E5", "yes", "Off", "FALSE", "inf", "nan", "0x1f", "e1.5", "NULL", "on"]
)


@settings(max_examples=500)
@given(_ascii, st.binary(max_size=2000), _tokens, _ascii, _ascii, st.none() | _ascii)
def test_kubeconfig_is_the_pure_emitters_byte_for_byte_for_issued_tokens(server, ca, token, namespace, cluster, user):
    assert _kubeconfig_text(server, ca, token, namespace, cluster, user) == _pure(
        server, ca, token, namespace, cluster, user
    )


@settings(max_examples=300)
@given(_any_text, st.binary(max_size=100), _any_text, _any_text, _any_text, st.none() | _any_text)
def test_kubeconfig_is_the_pure_emitters_byte_for_byte_for_any_text(server, ca, token, namespace, cluster, user):
    assert _kubeconfig_text(server, ca, token, namespace, cluster, user) == _pure(
        server, ca, token, namespace, cluster, user
    )
