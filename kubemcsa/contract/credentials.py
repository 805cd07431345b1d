"""The format of an imported service account's credentials: the Secret's five keys and its kubeconfig.

Pure functions only: they take data and return data, so the controller, `kubemcsa export` and the client
helpers all write and read exactly the same thing.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import yaml

from kubemcsa.contract import api


class CredentialsError(ValueError):
    """Credentials are missing or malformed; the message says which and never contains a secret value."""


@dataclass(frozen=True, slots=True)  # slots: the controller holds one per import, 10,000s at fleet scale
class Credentials:
    """Everything a client needs to call a remote API server as one service account."""

    server: str
    ca_crt: bytes
    token: str
    namespace: str

    def __repr__(self) -> str:  # never show the token, even in a traceback or a debugger
        return f"Credentials(server={self.server!r}, namespace={self.namespace!r}, token=<redacted>)"


def build_kubeconfig(creds: Credentials, cluster_name: str, user_name: str | None = None) -> str:
    """A complete kubeconfig for `creds`, with one context named after the cluster.

    The token is written inline, and also as `tokenFile: token`, a path relative to the kubeconfig's own
    directory. Mounted from the Secret, that is the sibling `token` file the kubelet updates on each
    rotation: client-go (kubectl, Go operators) re-reads it, so long-running clients survive rotation.
    Elsewhere the file is absent and clients use the inline token (the Python client always does; use
    `kubemcsa.config` for a Python client that follows rotation).
    """
    if _is_plain_token(creds.token):
        # Every import of a source and namespace has the same kubeconfig but for the token: dump it once with a
        # stand-in and put the token in its place (a token the emitter writes as is, so the bytes are the same).
        template = _token_template(creds.server, creds.ca_crt, creds.namespace, cluster_name, user_name)
        if template.count(_TOKEN_STAND_IN) == 1:
            return template.replace(_TOKEN_STAND_IN, creds.token)
    user = {"token": creds.token, "tokenFile": api.KEY_TOKEN}
    return _kubeconfig(creds.server, creds.ca_crt, creds.namespace, cluster_name, user_name, user)


_TOKEN_STAND_IN = "kubemcsaTokenStandIn0"
# Tokens as API servers issue them (JWTs, legacy tokens): a letter, then letters, digits, dots, dashes and
# underscores. The emitter writes those as plain scalars, unchanged, unless they read as another type: starting
# with a letter, only the booleans and nulls (yes, Off, null, ...; five letters at most) do.
_PLAIN_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9._-]{5,}")


def _is_plain_token(token: str) -> bool:
    return _PLAIN_TOKEN.fullmatch(token) is not None


@functools.lru_cache(maxsize=1024)
def _token_template(server: str, ca_crt: bytes, namespace: str, cluster_name: str, user_name: str | None) -> str:
    user = {"token": _TOKEN_STAND_IN, "tokenFile": api.KEY_TOKEN}
    return _kubeconfig(server, ca_crt, namespace, cluster_name, user_name, user)


def build_token_file_kubeconfig(
    server: str, ca_crt: bytes, namespace: str, cluster_name: str, user_name: str | None = None
) -> str:
    """A kubeconfig like build_kubeconfig's but with no token at all: its user reads `tokenFile: token`, the
    sibling file a projected serviceAccountToken source writes (federated imports)."""
    return _kubeconfig(server, ca_crt, namespace, cluster_name, user_name, {"tokenFile": api.KEY_TOKEN})


def _kubeconfig(
    server: str, ca_crt: bytes, namespace: str, cluster_name: str, user_name: str | None, user: dict[str, str]
) -> str:
    user_entry = user_name or f"{cluster_name}-{namespace}"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": cluster_name,
                "cluster": {"server": server, "certificate-authority-data": base64.b64encode(ca_crt).decode()},
            }
        ],
        "users": [{"name": user_entry, "user": user}],
        "contexts": [
            {"name": cluster_name, "context": {"cluster": cluster_name, "user": user_entry, "namespace": namespace}}
        ],
        "current-context": cluster_name,
        "preferences": {},
    }
    return dump_kubeconfig(config)


# libyaml's emitter writes the same bytes as PyYAML's pure one for printable ASCII (tests/test_credentials.py
# proves it with a property test), in a tenth of the time; other text (control characters, non-ASCII, which
# the two fold differently in double quotes) goes through the pure emitter.
_FAST_DUMPER = getattr(yaml, "CSafeDumper", None)


def _printable_ascii(value: object) -> bool:
    if isinstance(value, str):
        return value.isascii() and value.isprintable()
    if isinstance(value, dict):
        return all(_printable_ascii(k) and _printable_ascii(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_printable_ascii(item) for item in value)
    return True


def dump_kubeconfig(config: dict[str, object]) -> str:
    """`yaml.safe_dump(config, sort_keys=False)`, byte for byte, with libyaml's emitter where that is the same."""
    dumper = _FAST_DUMPER if _FAST_DUMPER is not None and _printable_ascii(config) else yaml.SafeDumper
    return yaml.dump(config, Dumper=dumper, sort_keys=False)


def federated_secret_data(server: str, ca_crt: bytes, namespace: str, cluster_name: str) -> dict[str, str]:
    """The base64 `data` of a federated import's Secret: the five keys less `token`, which the pod's projected
    service-account token supplies beside them."""
    plain = {
        api.KEY_CA_CRT: ca_crt,
        api.KEY_NAMESPACE: namespace.encode(),
        api.KEY_SERVER: server.encode(),
        api.KEY_CONFIG: build_token_file_kubeconfig(server, ca_crt, namespace, cluster_name).encode(),
    }
    return {key: base64.b64encode(value).decode() for key, value in plain.items()}


def to_secret_data(creds: Credentials, cluster_name: str) -> dict[str, str]:
    """The base64-encoded `data` of a Secret holding `creds`: the five keys of the original project."""
    plain = {
        api.KEY_CA_CRT: creds.ca_crt,
        api.KEY_NAMESPACE: creds.namespace.encode(),
        api.KEY_TOKEN: creds.token.encode(),
        api.KEY_SERVER: creds.server.encode(),
        api.KEY_CONFIG: build_kubeconfig(creds, cluster_name).encode(),
    }
    return {key: base64.b64encode(value).decode() for key, value in plain.items()}


def from_secret_data(
    data: dict[str, str] | None,
    where: str = "the Secret",
    *,
    require_token: bool = True,
    decoded_token: str | None = None,
) -> Credentials:
    """Read credentials back from a Secret's base64 `data`; raise CredentialsError naming what is wrong.

    `require_token=False` reads a federated import's Secret, which has no token (its token is empty then);
    `decoded_token` is the token already decoded, in place of data's (as the controller's Secret cache keeps it)."""
    data = data or {}
    needed = (
        (api.KEY_CA_CRT, api.KEY_NAMESPACE, api.KEY_TOKEN, api.KEY_SERVER)
        if require_token
        else api.FEDERATED_SECRET_KEYS
    )
    missing = [key for key in needed if key not in data]
    if missing:
        raise CredentialsError(
            f"{where} lacks the key(s) {', '.join(missing)}; re-create it with the controller or kubemcsa export."
        )
    try:
        # Only what credentials are made of: `config` (a kubeconfig, the largest value) is not read back.
        wanted = (api.KEY_CA_CRT, api.KEY_NAMESPACE, api.KEY_TOKEN, api.KEY_SERVER)
        if decoded_token is not None:
            wanted = wanted[:2] + wanted[3:]
        decoded: dict[str, bytes | str] = {
            key: base64.b64decode(data[key], validate=True) for key in wanted if key in data
        }
    except (binascii.Error, ValueError, TypeError):
        raise CredentialsError(f"{where} holds a value that is not valid base64; re-create it.") from None
    if decoded_token is not None:
        decoded[api.KEY_TOKEN] = decoded_token
    return _from_plain(decoded, where, require_token)


def read_mounted(directory: str | os.PathLike[str]) -> Credentials:
    """Read credentials from a mounted import directory (the files `ca.crt`, `namespace`, `token`, `server`)."""
    where = f"the mounted import at {os.fspath(directory)}"
    plain: dict[str, bytes] = {}
    for key in (api.KEY_CA_CRT, api.KEY_NAMESPACE, api.KEY_TOKEN, api.KEY_SERVER):
        path = os.path.join(directory, key)
        try:
            with open(path, "rb") as handle:
                plain[key] = handle.read()
        except FileNotFoundError:
            raise CredentialsError(
                f"{where} has no file {key!r}; check that its Secret exists and has all keys."
            ) from None
    return _from_plain(plain, where)


def _from_plain(plain: Mapping[str, bytes | str], where: str, require_token: bool = True) -> Credentials:
    """`plain`: each value as read; the token may be text already (then the very string is kept, unless padded)."""
    try:
        # Every import of a source names the same server and, mostly, namespace: one copy of each, not one per import.
        server = _shared(_text(plain[api.KEY_SERVER]).strip())
        namespace = _shared(_text(plain[api.KEY_NAMESPACE]).strip())
        token = _text(plain.get(api.KEY_TOKEN, b"")).strip()
    except UnicodeDecodeError:
        raise CredentialsError(f"{where} holds a server, namespace or token that is not UTF-8 text.") from None
    if not server.startswith("https://"):
        raise CredentialsError(f"{where} has a server that is not an https:// URL; re-create it.")
    if not token and require_token:
        raise CredentialsError(f"{where} has an empty token; wait for the controller to fill it in.")
    ca_crt = plain[api.KEY_CA_CRT]
    if not isinstance(ca_crt, bytes) or b"-----BEGIN CERTIFICATE-----" not in ca_crt:
        raise CredentialsError(f"{where} has a ca.crt that is not a PEM certificate; re-create it.")
    return Credentials(server=server, ca_crt=ca_crt, token=token, namespace=namespace)


def _shared(text: str) -> str:
    return sys.intern(text) if len(text) <= 256 else text


def _text(value: bytes | str) -> str:
    return value if isinstance(value, str) else value.decode()
