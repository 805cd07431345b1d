"""Client configuration for programs that call other clusters: the Python counterpart of the original's pkg/config.

Inside an annotated pod, each mounted ServiceAccountImport is a directory under `kubemcsa.api.MOUNT_ROOT` with the
files `ca.crt`, `namespace`, `token`, `server` and `config`. These helpers turn them into
`kubernetes.client.Configuration` objects of the official client, with the remote namespace::

    from kubemcsa import config
    from kubernetes import client

    cfg = config.import_config_and_namespace("cluster2-default-pod-lister")
    pods = client.CoreV1Api(client.ApiClient(cfg.config)).list_namespaced_pod(cfg.namespace)

The generic functions (`config_and_namespace`, `all_named_configs_and_namespaces`) fall back to a kubeconfig
context of the same name (KUBECONFIG, else ~/.kube/config), then to the pod's own service account, so that the
same program runs in a pod with imports, on a laptop, and in a pod without imports.

A Configuration built from a mounted import follows token rotation: before each request it checks (one stat) whether
the mounted token file changed and re-reads it, so a long-lived ApiClient keeps working when the controller
refreshes the Secret and the kubelet swaps the files.
"""

from __future__ import annotations

import base64
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes.client import ApiClient, Configuration
from kubernetes.config.config_exception import ConfigException
from kubernetes.config.incluster_config import InClusterConfigLoader
from kubernetes.config.kube_config import load_kube_config

from kubemcsa import api
from kubemcsa.credentials import CredentialsError, read_mounted

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_KUBECONFIG = "~/.kube/config"


class ConfigError(CredentialsError):
    """No usable client configuration was found; the message says where we looked and what to do."""


@dataclass(frozen=True)
class ConfigAndNamespace:
    """A client Configuration of the official kubernetes client and the namespace that goes with it.

    For an import, the namespace is the remote service account's; for a kubeconfig context, the context's
    namespace (else "default"); in-cluster, the pod's own namespace.
    """

    config: Configuration
    namespace: str

    def api_client(self) -> ApiClient:
        """A new ApiClient (connection pool) for this configuration."""
        return ApiClient(configuration=self.config)

    def __repr__(self) -> str:  # a Configuration's repr would show its api_key, i.e. the token
        return f"ConfigAndNamespace(host={self.config.host!r}, namespace={self.namespace!r})"


# --- mounted imports -------------------------------------------------------------------------------------------


def mounted_import_names(mount_root: str | os.PathLike[str] = api.MOUNT_ROOT) -> list[str]:
    """The names of the imports mounted under `mount_root`, sorted; [] if the directory does not exist."""
    try:
        entries = list(os.scandir(mount_root))
    except (FileNotFoundError, NotADirectoryError):
        return []
    # Hidden entries are the kubelet's atomic-writer bookkeeping (..data, ..2024_...), never imports.
    return sorted(entry.name for entry in entries if entry.is_dir() and not entry.name.startswith("."))


class _MountedTokenRefresher:
    """A refresh_api_key_hook that re-reads a mounted token file whenever it changed.

    The kubelet updates a Secret volume by swapping the `..data` symlink, which changes the inode, size or
    mtime seen through the `token` symlink; comparing those costs one stat per request.
    """

    def __init__(self, token_path: str) -> None:
        self._path = token_path
        self._lock = threading.Lock()
        self._signature = self._stat()

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
                configuration.api_key["BearerToken"] = token
                self._signature = signature

    def __repr__(self) -> str:
        return f"_MountedTokenRefresher({self._path!r})"


def _import_config(directory: Path) -> ConfigAndNamespace:
    creds = read_mounted(directory)
    configuration = Configuration(host=creds.server.rstrip("/"))
    configuration.ssl_ca_cert = str(directory / api.KEY_CA_CRT)
    configuration.api_key["BearerToken"] = creds.token
    configuration.api_key_prefix["BearerToken"] = "Bearer"
    configuration.refresh_api_key_hook = _MountedTokenRefresher(str(directory / api.KEY_TOKEN))
    return ConfigAndNamespace(config=configuration, namespace=creds.namespace)


def import_config_and_namespace(
    name: str | None = None, mount_root: str | os.PathLike[str] = api.MOUNT_ROOT
) -> ConfigAndNamespace:
    """The configuration and remote namespace of the mounted import `name`, or of the only one mounted.

    Raises ConfigError if that import is not mounted, or (without a name) if none or several are.
    """
    root = Path(mount_root)
    if name is None:
        names = mounted_import_names(root)
        if not names:
            raise ConfigError(
                f"no service account import is mounted under {root}; annotate the pod with {api.IMPORT_ANNOTATION}."
            )
        if len(names) > 1:
            raise ConfigError(
                f"several service account imports are mounted under {root} ({', '.join(names)}); pick one by name."
            )
        name = names[0]
    if name not in mounted_import_names(root):
        raise ConfigError(
            f"service account import {name!r} is not mounted under {root}; add it to the pod's "
            f"{api.IMPORT_ANNOTATION} annotation."
        )
    return _import_config(root / name)


def all_import_configs_and_namespaces(
    mount_root: str | os.PathLike[str] = api.MOUNT_ROOT,
) -> dict[str, ConfigAndNamespace]:
    """The configuration and remote namespace of every mounted import, by import name ({} if none)."""
    root = Path(mount_root)
    return {name: _import_config(root / name) for name in mounted_import_names(root)}


# --- kubeconfig contexts ---------------------------------------------------------------------------------------


def default_kubeconfig_path() -> str:
    """The kubeconfig kubectl would use: $KUBECONFIG (possibly a ':'-separated list), else ~/.kube/config."""
    return os.environ.get("KUBECONFIG") or os.path.expanduser(DEFAULT_KUBECONFIG)


def _kubeconfig_files(path: str) -> list[str]:
    return [os.path.expanduser(p) for p in path.split(os.pathsep) if p]


def kubeconfig_exists(kubeconfig: str | None = None) -> bool:
    """True if at least one of the kubeconfig files exists."""
    return any(os.path.isfile(p) for p in _kubeconfig_files(kubeconfig or default_kubeconfig_path()))


def load_kubeconfig_dict(kubeconfig: str | None = None) -> dict[str, Any]:
    """The kubeconfig as a dict, merged like kubectl does when $KUBECONFIG lists several files (first wins)."""
    path = kubeconfig or default_kubeconfig_path()
    merged: dict[str, Any] = {"clusters": [], "users": [], "contexts": [], "current-context": ""}
    found = False
    for file in _kubeconfig_files(path):
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
        for key in ("clusters", "users", "contexts"):
            seen = {item.get("name") for item in merged[key]}
            merged[key].extend(
                item for item in (doc.get(key) or []) if isinstance(item, dict) and item.get("name") not in seen
            )
        merged["current-context"] = merged["current-context"] or doc.get("current-context") or ""
    if not found:
        raise ConfigError(f"no kubeconfig found at {path}; pass --kubeconfig or set KUBECONFIG.")
    return merged


def kubeconfig_context(kubeconfig_dict: dict[str, Any], context: str | None = None) -> dict[str, Any]:
    """The `context` mapping (cluster, user, namespace) of a context, the current one by default."""
    name = context or kubeconfig_dict.get("current-context")
    if not name:
        raise ConfigError("the kubeconfig has no current context; pass a context name.")
    for item in kubeconfig_dict.get("contexts") or []:
        if item.get("name") == name:
            return dict(item.get("context") or {}, name=name)
    raise ConfigError(f"context {name!r} is not in the kubeconfig; list them with `kubectl config get-contexts`.")


def kubeconfig_cluster(kubeconfig_dict: dict[str, Any], cluster_name: str) -> dict[str, Any]:
    """The `cluster` mapping (server, certificate-authority[-data]) of a cluster entry of the kubeconfig."""
    for item in kubeconfig_dict.get("clusters") or []:
        if item.get("name") == cluster_name:
            return dict(item.get("cluster") or {})
    raise ConfigError(f"cluster {cluster_name!r} is not in the kubeconfig; fix the context that names it.")


@dataclass(frozen=True)
class ClusterInfo:
    """What a kubeconfig context says about its cluster: the name of its cluster entry, server URL and CA."""

    context: str
    cluster_name: str
    server: str
    ca_pem: bytes
    namespace: str


def context_cluster_info(context: str | None = None, kubeconfig: str | None = None) -> ClusterInfo:
    """The cluster name, server and CA certificate (PEM) of a kubeconfig context (the current one by default)."""
    path = kubeconfig or default_kubeconfig_path()
    doc = load_kubeconfig_dict(path)
    ctx = kubeconfig_context(doc, context)
    cluster_name = ctx.get("cluster") or ""
    cluster = kubeconfig_cluster(doc, cluster_name)
    server = str(cluster.get("server") or "").rstrip("/")
    if not server.startswith("https://"):
        raise ConfigError(f"cluster {cluster_name!r} of context {ctx['name']!r} has no https:// server; fix {path}.")
    if cluster.get("certificate-authority-data"):
        try:
            ca_pem = base64.b64decode(cluster["certificate-authority-data"], validate=True)
        except (ValueError, TypeError):
            raise ConfigError(
                f"cluster {cluster_name!r} in {path} has certificate-authority-data that is not base64; fix it."
            ) from None
    elif cluster.get("certificate-authority"):
        ca_path = Path(os.path.expanduser(cluster["certificate-authority"]))
        if not ca_path.is_absolute():  # relative to the kubeconfig file, as kubectl reads it
            ca_path = Path(_kubeconfig_files(path)[0]).parent / ca_path
        try:
            ca_pem = ca_path.read_bytes()
        except OSError:
            raise ConfigError(f"cannot read the CA file {ca_path} of cluster {cluster_name!r}; fix {path}.") from None
    else:
        raise ConfigError(
            f"cluster {cluster_name!r} in {path} has no certificate authority, which other clusters need to "
            "trust it; add certificate-authority-data."
        )
    return ClusterInfo(
        context=ctx["name"],
        cluster_name=cluster_name,
        server=server,
        ca_pem=ca_pem,
        namespace=ctx.get("namespace") or "default",
    )


def context_config_and_namespace(context: str | None = None, kubeconfig: str | None = None) -> ConfigAndNamespace:
    """The configuration and namespace of a kubeconfig context (the current one by default)."""
    path = kubeconfig or default_kubeconfig_path()
    ctx = kubeconfig_context(load_kubeconfig_dict(path), context)
    configuration = Configuration()
    try:
        load_kube_config(
            config_file=path, context=ctx["name"], client_configuration=configuration, persist_config=False
        )
    except ConfigException as exc:
        raise ConfigError(f"cannot load context {ctx['name']!r} from {path}: {exc}") from None
    return ConfigAndNamespace(config=configuration, namespace=ctx.get("namespace") or "default")


# --- in-cluster ------------------------------------------------------------------------------------------------


def in_cluster_config_and_namespace(
    service_account_dir: str | os.PathLike[str] = SERVICE_ACCOUNT_DIR, environ: dict[str, str] | None = None
) -> ConfigAndNamespace:
    """The pod's own service account: KUBERNETES_SERVICE_HOST/PORT and the token, ca.crt and namespace files."""
    directory = Path(service_account_dir)
    env = os.environ if environ is None else environ
    configuration = Configuration()
    try:
        InClusterConfigLoader(
            token_filename=str(directory / "token"), cert_filename=str(directory / "ca.crt"), environ=env
        ).load_and_set(configuration)
    except ConfigException as exc:
        raise ConfigError(f"not running in a pod with a service account ({exc}); use a kubeconfig instead.") from None
    try:
        namespace = (directory / "namespace").read_text().strip() or "default"
    except OSError:
        namespace = "default"
    return ConfigAndNamespace(config=configuration, namespace=namespace)


def _in_cluster_available(service_account_dir: str | os.PathLike[str], environ: dict[str, str] | None) -> bool:
    env = os.environ if environ is None else environ
    return bool(env.get("KUBERNETES_SERVICE_HOST")) and (Path(service_account_dir) / "token").is_file()


# --- generic ---------------------------------------------------------------------------------------------------


def config_and_namespace(
    name: str | None = None,
    *,
    mount_root: str | os.PathLike[str] = api.MOUNT_ROOT,
    kubeconfig: str | None = None,
    service_account_dir: str | os.PathLike[str] = SERVICE_ACCOUNT_DIR,
    environ: dict[str, str] | None = None,
) -> ConfigAndNamespace:
    """A configuration and namespace from wherever this program runs.

    With a name: the mounted import of that name, else the kubeconfig context of that name. Without: the only
    mounted import (several are an error: pick one), else the kubeconfig's current context, else the pod's own
    service account.
    """
    mounted = mounted_import_names(mount_root)
    if name is not None:
        if name in mounted:
            return import_config_and_namespace(name, mount_root)
        if kubeconfig_exists(kubeconfig):
            return context_config_and_namespace(name, kubeconfig)
        raise ConfigError(
            f"{name!r} is neither a mounted service account import under {mount_root} nor a kubeconfig context "
            f"(no kubeconfig at {kubeconfig or default_kubeconfig_path()}); check the name."
        )
    if mounted:
        return import_config_and_namespace(None, mount_root)
    if kubeconfig_exists(kubeconfig):
        return context_config_and_namespace(None, kubeconfig)
    if _in_cluster_available(service_account_dir, environ):
        return in_cluster_config_and_namespace(service_account_dir, environ)
    raise ConfigError(
        f"found no mounted service account import under {mount_root}, no kubeconfig at "
        f"{kubeconfig or default_kubeconfig_path()} and no in-cluster service account; set KUBECONFIG."
    )


def all_named_configs_and_namespaces(
    *,
    mount_root: str | os.PathLike[str] = api.MOUNT_ROOT,
    kubeconfig: str | None = None,
) -> dict[str, ConfigAndNamespace]:
    """Every mounted import and every kubeconfig context, by name ({} if none).

    A mounted import wins over a kubeconfig context of the same name: in a pod, the import is the intended one.
    """
    result: dict[str, ConfigAndNamespace] = {}
    if kubeconfig_exists(kubeconfig):
        for item in load_kubeconfig_dict(kubeconfig).get("contexts") or []:
            context = item.get("name")
            if context:
                result[context] = context_config_and_namespace(context, kubeconfig)
    result.update(all_import_configs_and_namespaces(mount_root))
    return result


def api_client(name: str | None = None, **kwargs: Any) -> ApiClient:
    """An ApiClient from `config_and_namespace(name, **kwargs)`; use that function if you need the namespace."""
    return config_and_namespace(name, **kwargs).api_client()
