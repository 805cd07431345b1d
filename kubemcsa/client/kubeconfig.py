"""Kubeconfig files, read as kubectl reads them, into clients that keep certificates and keys in memory.

The one kubeconfig loader of the project: `kubemcsa.config`, `kubemcsa.client.connect.local_api_client` and the
controller's
--source-kubeconfig all use it. The official client's loader writes certificate-authority-data,
client-certificate-data and client-key-data to temporary files; on a read-only root filesystem without a /tmp
that fails ("No usable temporary directory found"), and elsewhere it leaves key material on disk. Here:
- the CA is handed to the TLS layer as data (urllib3's `ca_cert_data`), never as a file;
- client certificates and keys given as data go through anonymous memory files (Linux `memfd_create`; a temporary
  file only where that does not exist); files named in the kubeconfig are used in place;
- paths are relative to the kubeconfig file that names them, as in kubectl;
- a `tokenFile` is re-read whenever it changes (client-go's behaviour), so a long-lived client follows rotation;
  while it cannot be read, the inline `token` is used, as kubectl does outside a pod.
Auth providers and exec plugins are left to the official loader.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes.client import ApiClient, Configuration
from kubernetes.config.config_exception import ConfigException
from kubernetes.config.kube_config import KubeConfigLoader

from kubemcsa.contract.credentials import CredentialsError

DEFAULT_KUBECONFIG = "~/.kube/config"
# Keys of a kubeconfig's cluster and user entries that name files.
CLUSTER_FILE_KEYS = ("certificate-authority",)
USER_FILE_KEYS = ("client-certificate", "client-key", "tokenFile")


class ConfigError(CredentialsError):
    """No usable client configuration was found; the message says where we looked and what to do."""


class LocalFilesystemError(OSError):
    """This machine's filesystem, not the configuration, refused what a client needs (e.g. no memory file)."""


# --- reading and merging files ---------------------------------------------------------------------------------


def default_kubeconfig_path() -> str:
    """The kubeconfig kubectl would use: $KUBECONFIG (possibly a ':'-separated list), else ~/.kube/config."""
    return os.environ.get("KUBECONFIG") or os.path.expanduser(DEFAULT_KUBECONFIG)


def kubeconfig_files(path: str) -> list[str]:
    """The files of a kubeconfig path, which may be a ':'-separated list as in $KUBECONFIG."""
    return [os.path.expanduser(p) for p in path.split(os.pathsep) if p]


def kubeconfig_exists(kubeconfig: str | None = None) -> bool:
    """True if at least one of the kubeconfig files exists."""
    return any(os.path.isfile(p) for p in kubeconfig_files(kubeconfig or default_kubeconfig_path()))


def _list_of_dicts(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _dict_of(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def absolutize(doc: dict[str, Any], base_dir: str) -> dict[str, Any]:
    """A copy of a kubeconfig dict whose file paths are absolute: relative ones are relative to `base_dir`."""

    def resolved(section: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
        result = dict(section)
        for key in keys:
            if isinstance(result.get(key), str) and result[key]:
                result[key] = os.path.join(base_dir, os.path.expanduser(result[key]))
        return result

    result = dict(doc)
    for kind, inner, keys in (("clusters", "cluster", CLUSTER_FILE_KEYS), ("users", "user", USER_FILE_KEYS)):
        if isinstance(doc.get(kind), list):
            result[kind] = [
                dict(entry, **{inner: resolved(_dict_of(entry.get(inner)), keys)}) if isinstance(entry, dict) else entry
                for entry in doc[kind]
            ]
    return result


def referenced_files(doc: dict[str, Any], base_dir: str = "") -> list[str]:
    """The files a kubeconfig refers to (CA, client certificate and key, token file), as absolute paths."""
    doc = absolutize(doc, base_dir)
    paths = []
    for kind, inner, keys in (("clusters", "cluster", CLUSTER_FILE_KEYS), ("users", "user", USER_FILE_KEYS)):
        for entry in _list_of_dicts(doc.get(kind)):
            section = _dict_of(entry.get(inner))
            paths += [section[key] for key in keys if isinstance(section.get(key), str) and section[key]]
    return sorted(set(paths))


def load_kubeconfig_dict(kubeconfig: str | None = None) -> dict[str, Any]:
    """The kubeconfig as a dict with absolute paths, merged as kubectl does when a list names several files.

    The first file that defines a cluster, user or context wins, and so does the first current-context.
    """
    path = kubeconfig or default_kubeconfig_path()
    merged: dict[str, Any] = {"clusters": [], "users": [], "contexts": [], "current-context": ""}
    found = False
    for file in kubeconfig_files(path):
        if not os.path.isfile(file):
            continue
        found = True
        try:
            with open(file) as handle:
                doc = yaml.safe_load(handle) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read kubeconfig {file} ({type(exc).__name__}); fix or replace it.") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"kubeconfig {file} is not a YAML mapping; fix or replace it.")
        doc = absolutize(doc, os.path.dirname(os.path.abspath(file)))
        for key in ("clusters", "users", "contexts"):
            seen = {item.get("name") for item in merged[key]}
            merged[key].extend(item for item in _list_of_dicts(doc.get(key)) if item.get("name") not in seen)
        merged["current-context"] = merged["current-context"] or doc.get("current-context") or ""
    if not found:
        raise ConfigError(f"no kubeconfig found at {path}; pass --kubeconfig or set KUBECONFIG.")
    return merged


# --- one context -----------------------------------------------------------------------------------------------


def kubeconfig_context(kubeconfig_dict: dict[str, Any], context: str | None = None) -> dict[str, Any]:
    """The `context` mapping (cluster, user, namespace) of a context, the current one by default."""
    name = context or kubeconfig_dict.get("current-context")
    if not name:
        raise ConfigError("the kubeconfig has no current context; pass a context name.")
    for item in _list_of_dicts(kubeconfig_dict.get("contexts")):
        if item.get("name") == name:
            return dict(_dict_of(item.get("context")), name=name)
    raise ConfigError(f"context {name!r} is not in the kubeconfig; list them with `kubectl config get-contexts`.")


def kubeconfig_cluster(kubeconfig_dict: dict[str, Any], cluster_name: str) -> dict[str, Any]:
    """The `cluster` mapping (server, certificate-authority[-data]) of a cluster entry of the kubeconfig."""
    for item in _list_of_dicts(kubeconfig_dict.get("clusters")):
        if item.get("name") == cluster_name:
            return dict(_dict_of(item.get("cluster")))
    raise ConfigError(f"cluster {cluster_name!r} is not in the kubeconfig; fix the context that names it.")


def _kubeconfig_user(kubeconfig_dict: dict[str, Any], user_name: str) -> dict[str, Any]:
    for item in _list_of_dicts(kubeconfig_dict.get("users")):
        if item.get("name") == user_name:
            return dict(_dict_of(item.get("user")))
    return {}  # as kubectl: a context without a known user makes anonymous requests


@dataclass(frozen=True)
class KubeconfigContext:
    """One context of a kubeconfig (absolute paths), resolved: its cluster entry, CA and user, ready for a client."""

    name: str
    cluster_name: str
    server: str
    ca_pem: bytes = field(repr=False)  # b"" when the kubeconfig gives no CA (the system's trust store applies)
    namespace: str
    cluster: dict[str, Any] = field(repr=False, compare=False)
    user: dict[str, Any] = field(repr=False, compare=False)
    where: str = "the kubeconfig"

    def files(self) -> list[str]:
        """The files this context refers to; a change to one of them may change the credentials."""
        return referenced_files({"clusters": [{"cluster": self.cluster}], "users": [{"user": self.user}]})


def resolve_context(
    kubeconfig_dict: dict[str, Any], context: str | None = None, where: str = "the kubeconfig"
) -> KubeconfigContext:
    """The context `context` (the current one by default) of a kubeconfig dict with absolute paths.

    Reads the CA (certificate-authority-data, else the certificate-authority file) into memory. Raises ConfigError
    with one sentence naming `where` if the context, its cluster or its CA cannot be used.
    """
    ctx = kubeconfig_context(kubeconfig_dict, context)
    cluster_name = str(ctx.get("cluster") or "")
    cluster = kubeconfig_cluster(kubeconfig_dict, cluster_name)
    ca_pem = b""
    if cluster.get("certificate-authority-data"):
        try:
            ca_pem = base64.b64decode(cluster["certificate-authority-data"], validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise ConfigError(
                f"cluster {cluster_name!r} in {where} has certificate-authority-data that is not base64; fix it."
            ) from None
    elif cluster.get("certificate-authority"):
        ca_path = str(cluster["certificate-authority"])
        try:
            ca_pem = Path(ca_path).read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the CA file {ca_path} of cluster {cluster_name!r} in {where} "
                f"({exc.strerror or type(exc).__name__}); check that the file exists and is readable."
            ) from None
    return KubeconfigContext(
        name=ctx["name"],
        cluster_name=cluster_name,
        server=str(cluster.get("server") or "").rstrip("/"),
        ca_pem=ca_pem,
        namespace=str(ctx.get("namespace") or "default"),
        cluster=cluster,
        user=_kubeconfig_user(kubeconfig_dict, str(ctx.get("user") or "")),
        where=where,
    )


# --- a client for a context ------------------------------------------------------------------------------------


class TokenFileRefresher:
    """A refresh_api_key_hook that re-reads a token file whenever it changed (one stat per request).

    The kubelet updates a Secret volume by swapping the `..data` symlink, which changes the inode, size or mtime
    seen through the `token` symlink. While the file is absent or empty (a swap or a write in progress), the token
    the configuration has is kept.
    """

    def __init__(self, token_path: str, *, loaded: bool = True) -> None:
        self._path = token_path
        self._lock = threading.Lock()
        self._signature = self._stat() if loaded else None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(self._path)
        except OSError:
            return None
        return (stat.st_ino, stat.st_size, stat.st_mtime_ns)

    def __call__(self, configuration: Configuration) -> None:
        signature = self._stat()
        if signature is None or signature == self._signature:
            return  # unchanged, or briefly absent during a swap: keep the token we have
        with self._lock:
            try:
                token = Path(self._path).read_text().strip()
            except (OSError, UnicodeDecodeError):
                return
            if token:  # an empty file is a write in progress; try again on the next request
                set_bearer_token(configuration, token)
                self._signature = signature

    def __repr__(self) -> str:
        return f"TokenFileRefresher({self._path!r})"


def set_bearer_token(configuration: Configuration, token: str) -> None:
    """Make `configuration` send `Authorization: Bearer <token>`."""
    configuration.api_key["BearerToken"] = token
    configuration.api_key_prefix["BearerToken"] = "Bearer"


class _MemoryFile:
    """Bytes that OpenSSL can open by path but that never reach a disk: an anonymous memory file (Linux).

    urllib3 loads a client certificate and key by path for every new connection, so the file lives as long as the
    Configuration that names it (closed by a finalizer). Where memfd_create does not exist, a private temporary file
    stands in, deleted with it.
    """

    def __init__(self, content: bytes, what: str) -> None:
        if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
            try:
                fd = os.memfd_create(f"kubemcsa-{what}", os.MFD_CLOEXEC)
            except OSError as exc:
                raise LocalFilesystemError(
                    exc.errno, f"cannot create a memory file for the {what} ({exc.strerror})"
                ) from None
            os.write(fd, content)
            self.path = f"/proc/self/fd/{fd}"
            self._finalizer = weakref.finalize(self, os.close, fd)
            return
        try:
            fd, self.path = tempfile.mkstemp(prefix=f"kubemcsa-{what}-")
        except OSError as exc:
            raise LocalFilesystemError(
                exc.errno,
                f"cannot write the {what} to a temporary file ({exc.strerror}); set TMPDIR to a writable directory",
            ) from None
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
        self._finalizer = weakref.finalize(self, os.unlink, self.path)

    def __deepcopy__(self, memo: dict[int, Any]) -> _MemoryFile:
        return self  # immutable content: a copied Configuration shares the file


def _user_material(user: dict[str, Any], key: str) -> tuple[str | None, bytes | None]:
    """(path, None) for a file key, (None, bytes) for its `-data` twin, (None, None) if absent."""
    if user.get(f"{key}-data"):
        try:
            return None, base64.b64decode(user[f"{key}-data"], validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise ConfigError(f"{key}-data is not base64") from None
    if isinstance(user.get(key), str) and user[key]:
        return str(user[key]), None
    return None, None


def configuration_for(context: KubeconfigContext) -> Configuration:
    """A Configuration of the official client for `context`, writing nothing to the local filesystem.

    Raises ConfigError (the kubeconfig cannot be used: one sentence, never a secret) or LocalFilesystemError.
    """
    cluster = {k: v for k, v in context.cluster.items() if not k.startswith("certificate-authority")}
    user = dict(context.user)
    token_file = user.get("tokenFile") if isinstance(user.get("tokenFile"), str) else None
    if "auth-provider" in user:
        token_file = None  # the provider's token wins, as in the official loader
    inline_token = user.get("token") if token_file else None
    material = {}
    for key in ("client-certificate", "client-key"):
        try:
            material[key] = _user_material(user, key)
        except ConfigError as exc:
            raise ConfigError(f"user of context {context.name!r} in {context.where}: {exc}; fix it.") from None
        user.pop(key, None)
        user.pop(f"{key}-data", None)
    if token_file:
        user.pop("tokenFile", None)
        user.pop("token", None)
    # The official loader does the rest (server, insecure-skip-tls-verify, tls-server-name, proxy-url, inline
    # token, basic auth, auth providers, exec plugins); nothing left in these dicts makes it write a file.
    single = {
        "clusters": [{"name": "cluster", "cluster": cluster}],
        "users": [{"name": "user", "user": user}],
        "contexts": [{"name": "context", "context": {"cluster": "cluster", "user": "user"}}],
        "current-context": "context",
    }
    configuration = Configuration()
    try:
        KubeConfigLoader(config_dict=single).load_and_set(configuration)
    except ConfigException as exc:
        raise ConfigError(f"cannot load context {context.name!r} from {context.where}: {exc}") from None
    if "exec" not in user and "auth-provider" not in user:
        # The loader's hook re-reads the whole context before every request so that exec plugins and auth
        # providers can renew their tokens; for a static token it sets the same values again (host included, which
        # looks up the proxy environment), at a cost per request above the controller's own work per import.
        configuration.refresh_api_key_hook = None
    if context.ca_pem:
        configuration.ca_cert_data = context.ca_pem.decode(errors="replace")
    keep: list[_MemoryFile] = []
    for key, attribute in (("client-certificate", "cert_file"), ("client-key", "key_file")):
        path, data = material[key]
        if data is not None:
            keep.append(_MemoryFile(data, key))
            path = keep[-1].path
        setattr(configuration, attribute, path)
    if keep:
        configuration.kubemcsa_memory_files = keep  # lives (and closes) with the configuration
    if token_file:
        _use_token_file(configuration, context, token_file, inline_token)
    return configuration


def _use_token_file(configuration: Configuration, context: KubeconfigContext, path: str, inline: Any) -> None:
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        if not inline:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise ConfigError(
                f"cannot read the tokenFile {path} of context {context.name!r} in {context.where} ({reason}); "
                "check that the file exists and is readable."
            ) from None
        token = ""
    set_bearer_token(configuration, token or str(inline))
    configuration.refresh_api_key_hook = TokenFileRefresher(path, loaded=bool(token))


def api_client_for(context: KubeconfigContext) -> ApiClient:
    """A new ApiClient for `context` (see configuration_for)."""
    return ApiClient(configuration_for(context))


def load_api_client(kubeconfig: str | None = None, context: str | None = None) -> ApiClient:
    """An ApiClient for a context (the current one by default) of a kubeconfig file (default: as kubectl finds it)."""
    path = kubeconfig or default_kubeconfig_path()
    return api_client_for(resolve_context(load_kubeconfig_dict(path), context, where=path))
