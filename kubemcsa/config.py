"""Client configuration for programs that call other clusters: the Python counterpart of the original's pkg/config.

Inside an annotated pod, each mounted ServiceAccountImport is a directory under `kubemcsa.contract.api.MOUNT_ROOT`
with the
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

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes.client import ApiClient, Configuration
from kubernetes.config.config_exception import ConfigException
from kubernetes.config.incluster_config import InClusterConfigLoader

from kubemcsa.client.kubeconfig import (
    ConfigError,
    TokenFileRefresher,
    configuration_for,
    default_kubeconfig_path,
    kubeconfig_cluster,
    kubeconfig_context,
    kubeconfig_exists,
    load_kubeconfig_dict,
    resolve_context,
    set_bearer_token,
)
from kubemcsa.contract import api
from kubemcsa.contract.credentials import read_mounted

# The public names. The kubeconfig helpers live in kubemcsa.client.kubeconfig and stay importable from here.
__all__ = [
    "ClusterInfo",
    "ConfigAndNamespace",
    "ConfigError",
    "all_import_configs_and_namespaces",
    "all_named_configs_and_namespaces",
    "api_client",
    "config_and_namespace",
    "context_cluster_info",
    "context_config_and_namespace",
    "default_kubeconfig_path",
    "import_config_and_namespace",
    "in_cluster_config_and_namespace",
    "kubeconfig_cluster",
    "kubeconfig_context",
    "kubeconfig_exists",
    "load_kubeconfig_dict",
    "mounted_import_names",
]

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


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


def _import_config(directory: Path) -> ConfigAndNamespace:
    creds = read_mounted(directory)
    configuration = Configuration(host=creds.server.rstrip("/"))
    configuration.ssl_ca_cert = str(directory / api.KEY_CA_CRT)
    set_bearer_token(configuration, creds.token)
    configuration.refresh_api_key_hook = TokenFileRefresher(str(directory / api.KEY_TOKEN))
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


# --- kubeconfig contexts (read by kubemcsa.client.kubeconfig, the one loader) -----------------------------------------


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
    ctx = resolve_context(load_kubeconfig_dict(path), context, where=path)
    if not ctx.server.startswith("https://"):
        raise ConfigError(f"cluster {ctx.cluster_name!r} of context {ctx.name!r} has no https:// server; fix {path}.")
    if not ctx.ca_pem:
        raise ConfigError(
            f"cluster {ctx.cluster_name!r} in {path} has no certificate authority, which other clusters need to "
            "trust it; add certificate-authority-data."
        )
    return ClusterInfo(
        context=ctx.name, cluster_name=ctx.cluster_name, server=ctx.server, ca_pem=ctx.ca_pem, namespace=ctx.namespace
    )


def context_config_and_namespace(context: str | None = None, kubeconfig: str | None = None) -> ConfigAndNamespace:
    """The configuration and namespace of a kubeconfig context (the current one by default).

    The CA and any client key stay in memory, and a tokenFile is followed when it rotates (kubemcsa.client.kubeconfig).
    """
    path = kubeconfig or default_kubeconfig_path()
    ctx = resolve_context(load_kubeconfig_dict(path), context, where=path)
    return ConfigAndNamespace(config=configuration_for(ctx), namespace=ctx.namespace)


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
