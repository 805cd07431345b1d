"""The named source clusters the controller can request tokens from, and an API client for each.

Three origins, looked up in this order for a name:
1. contexts of --source-kubeconfig (context name = cluster name);
2. service-account imports mounted under --imports-dir/NAME/ (the original bootstrap model);
3. import Secrets in the controller's own system namespace (the Secret of import NAME gives cluster NAME:
   `kubemcsa bootstrap` adds a cluster this way without a restart).
Files are re-read only when a cheap stat says they changed; an ApiClient is rebuilt only when its
credentials change. `refresh_files` returns the names whose credentials changed, to re-queue their imports.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml
from kubernetes.client import ApiClient, Configuration
from kubernetes.config.kube_config import new_client_from_config_dict

from controller.reconcile import Remote
from kubemcsa import api
from kubemcsa.credentials import Credentials, CredentialsError, from_secret_data, read_mounted

log = logging.getLogger(__name__)

ORIGIN_KUBECONFIG = "source kubeconfig"
ORIGIN_MOUNTED = "mounted import"
ORIGIN_SECRET = "system namespace Secret"
_ORDER = (ORIGIN_KUBECONFIG, ORIGIN_MOUNTED, ORIGIN_SECRET)


@dataclass(frozen=True)
class SourceCluster:
    """One source cluster: where it is, the CA that proves it, and how to build a client for it."""

    name: str
    origin: str
    server: str
    ca_pem: bytes = field(repr=False)
    fingerprint: str  # changes whenever the credentials change
    build: Callable[[], ApiClient] = field(repr=False, compare=False)

    @property
    def remote(self) -> Remote:
        return Remote(cluster_name=self.name, server=self.server, ca_pem=self.ca_pem)


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def client_for_credentials(creds: Credentials) -> ApiClient:
    """An ApiClient that calls creds.server as the bearer of creds.token, trusting only creds.ca_crt."""
    config = Configuration(host=creds.server)
    config.api_key = {"authorization": creds.token}
    config.api_key_prefix = {"authorization": "Bearer"}
    config.ca_cert_data = creds.ca_crt.decode()
    config.verify_ssl = True
    return ApiClient(config)


def source_from_credentials(name: str, origin: str, creds: Credentials) -> SourceCluster:
    return SourceCluster(
        name=name,
        origin=origin,
        server=creds.server,
        ca_pem=creds.ca_crt,
        fingerprint=_fingerprint(creds.server, creds.ca_crt.decode(errors="replace"), creds.token),
        build=lambda: client_for_credentials(creds),
    )


def _named(entries: Any, name: str) -> dict[str, Any]:
    for entry in entries or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry
    return {}


def sources_from_kubeconfig(config: dict[str, Any], base_dir: str) -> tuple[dict[str, SourceCluster], dict[str, str]]:
    """Source clusters named after the contexts of a kubeconfig dict, and errors for contexts that are unusable."""
    sources: dict[str, SourceCluster] = {}
    errors: dict[str, str] = {}
    for ctx in config.get("contexts") or []:
        if not isinstance(ctx, dict) or not isinstance(ctx.get("name"), str):
            continue
        name = ctx["name"]
        context = ctx.get("context") or {}
        cluster = _named(config.get("clusters"), context.get("cluster", "")).get("cluster") or {}
        user = _named(config.get("users"), context.get("user", "")).get("user") or {}
        server = str(cluster.get("server") or "")
        ca_pem = b""
        try:
            if cluster.get("certificate-authority-data"):
                ca_pem = base64.b64decode(cluster["certificate-authority-data"])
            elif cluster.get("certificate-authority"):
                path = os.path.join(base_dir, cluster["certificate-authority"])
                with open(path, "rb") as handle:
                    ca_pem = handle.read()
        except (OSError, binascii.Error, ValueError):
            errors[name] = f"context {name} of the source kubeconfig has an unreadable certificate authority; fix it."
            continue
        if not server.startswith("https://"):
            errors[name] = f"context {name} of the source kubeconfig has no https:// server; fix it."
            continue
        # A minimal config holding this context only, so the client cannot drift to another one.
        single = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "c", "cluster": cluster}],
            "users": [{"name": "u", "user": user}],
            "contexts": [{"name": name, "context": {"cluster": "c", "user": "u"}}],
            "current-context": name,
        }

        def build(single: dict[str, Any] = single, base_dir: str = base_dir) -> ApiClient:
            cwd_relative = _absolutize(single, base_dir)
            return new_client_from_config_dict(cwd_relative, persist_config=False)

        sources[name] = SourceCluster(
            name=name,
            origin=ORIGIN_KUBECONFIG,
            server=server,
            ca_pem=ca_pem,
            # Files the context refers to (a rotated tokenFile, renewed client certificates) count as credentials.
            fingerprint=_fingerprint(cluster, user, _stat_signature(referenced_files(single, base_dir))),
            build=build,
        )
    return sources, errors


def _absolutize(config: dict[str, Any], base_dir: str) -> dict[str, Any]:
    """File paths in a kubeconfig are relative to the kubeconfig's directory, not to the process's."""
    result = json.loads(json.dumps(config))
    for entry in result["clusters"]:
        cluster = entry["cluster"]
        if cluster.get("certificate-authority"):
            cluster["certificate-authority"] = os.path.join(base_dir, cluster["certificate-authority"])
    for entry in result["users"]:
        user = entry["user"]
        for key in ("client-certificate", "client-key", "tokenFile"):
            if user.get(key):
                user[key] = os.path.join(base_dir, user[key])
    return result


def referenced_files(config: dict[str, Any], base_dir: str) -> list[str]:
    """The files a kubeconfig refers to (CA, client certificate and key, token file), as absolute paths."""
    paths = []
    for entry in _list_of_dicts(config.get("clusters")):
        path = _dict_of(entry.get("cluster")).get("certificate-authority")
        if isinstance(path, str) and path:
            paths.append(os.path.join(base_dir, path))
    for entry in _list_of_dicts(config.get("users")):
        user = _dict_of(entry.get("user"))
        for key in ("client-certificate", "client-key", "tokenFile"):
            if isinstance(user.get(key), str) and user[key]:
                paths.append(os.path.join(base_dir, user[key]))
    return sorted(set(paths))


def _list_of_dicts(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _dict_of(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _stat_signature(paths: list[str]) -> tuple[Any, ...]:
    signature = []
    for path in paths:
        try:
            st = os.stat(path)
            signature.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            signature.append((path, None))
    return tuple(signature)


class SourceRegistry:
    """Thread-safe registry of source clusters by name, with one cached ApiClient per cluster."""

    def __init__(self, *, source_kubeconfig: str | None = None, imports_dir: str | None = None) -> None:
        self.source_kubeconfig = source_kubeconfig
        self.imports_dir = imports_dir
        self._lock = threading.RLock()
        self._by_origin: dict[str, dict[str, SourceCluster]] = {origin: {} for origin in _ORDER}
        self._errors: dict[str, dict[str, str]] = {origin: {} for origin in _ORDER}
        self._signatures: dict[str, tuple[Any, ...]] = {}
        self._clients: dict[str, tuple[str, ApiClient]] = {}
        self._kubeconfig_files: list[str] = []

    # --- lookups -----------------------------------------------------------------------------------------------
    def get(self, name: str) -> SourceCluster | None:
        with self._lock:
            for origin in _ORDER:
                source = self._by_origin[origin].get(name)
                if source is not None:
                    return source
        return None

    def names(self) -> list[str]:
        with self._lock:
            return sorted({name for sources in self._by_origin.values() for name in sources})

    def error_for(self, name: str) -> str | None:
        """Why a cluster of that name could not be loaded, if it could not."""
        with self._lock:
            for origin in _ORDER:
                if name in self._errors[origin]:
                    return self._errors[origin][name]
        return None

    def client(self, source: SourceCluster) -> ApiClient:
        """The ApiClient for `source`, built once per set of credentials."""
        with self._lock:
            cached = self._clients.get(source.name)
            if cached is not None and cached[0] == source.fingerprint:
                return cached[1]
        client = source.build()
        with self._lock:
            self._clients[source.name] = (source.fingerprint, client)
        return client

    def _snapshot(self) -> dict[str, str]:
        result: dict[str, str] = {}
        for name in self.names():
            source = self.get(name)
            if source is not None:
                result[name] = source.fingerprint
        return result

    def _replace(self, origin: str, sources: dict[str, SourceCluster], errors: dict[str, str]) -> set[str]:
        """Install `sources` for `origin`; return the names whose effective credentials changed."""
        with self._lock:
            before = self._snapshot()
            self._by_origin[origin] = sources
            self._errors[origin] = errors
            after = self._snapshot()
        return {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}

    # --- files ---------------------------------------------------------------------------------------------------
    def refresh_files(self) -> set[str]:
        """Re-read the source kubeconfig and the mounted imports if a stat says they changed; return changed names."""
        changed: set[str] = set()
        if self.source_kubeconfig:
            changed |= self._refresh_kubeconfig(self.source_kubeconfig)
        if self.imports_dir:
            changed |= self._refresh_mounted(self.imports_dir)
        return changed

    def _refresh_kubeconfig(self, path: str) -> set[str]:
        signature = _stat_signature([path, *self._kubeconfig_files])
        if self._signatures.get("kubeconfig") == signature:
            return set()
        self._signatures["kubeconfig"] = signature
        try:
            with open(path, encoding="utf-8") as handle:
                config = yaml.safe_load(handle) or {}
            if not isinstance(config, dict):
                raise ValueError("not a mapping")
        except FileNotFoundError:
            log.warning("source kubeconfig %s does not exist (yet); no cluster from it", path)
            return self._replace(ORIGIN_KUBECONFIG, {}, {})
        except (OSError, ValueError, yaml.YAMLError) as exc:
            log.warning("source kubeconfig %s is unreadable (%s); keeping the clusters read before", path, type(exc))
            return set()
        base_dir = os.path.dirname(os.path.abspath(path))
        sources, errors = sources_from_kubeconfig(config, base_dir)
        files = referenced_files(config, base_dir)
        if files != self._kubeconfig_files:
            self._kubeconfig_files = files
            self._signatures["kubeconfig"] = _stat_signature([path, *files])
        for message in errors.values():
            log.warning("%s", message)
        return self._replace(ORIGIN_KUBECONFIG, sources, errors)

    def _refresh_mounted(self, root: str) -> set[str]:
        try:
            names = sorted(
                entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith(".")
            )
        except OSError:
            names = []
        files = [os.path.join(root, n, key) for n in names for key in api.SECRET_KEYS]
        signature = (tuple(names), _stat_signature(files))
        if self._signatures.get("mounted") == signature:
            return set()
        self._signatures["mounted"] = signature
        sources: dict[str, SourceCluster] = {}
        errors: dict[str, str] = {}
        for name in names:
            try:
                creds = read_mounted(os.path.join(root, name))
            except CredentialsError as exc:
                errors[name] = str(exc)
                continue
            except OSError as exc:
                errors[name] = f"the mounted import {name} is unreadable ({exc.strerror}); check the volume."
                continue
            sources[name] = source_from_credentials(name, ORIGIN_MOUNTED, creds)
        return self._replace(ORIGIN_MOUNTED, sources, errors)

    # --- system namespace Secrets ----------------------------------------------------------------------------------
    def _secret_origin(self, secret: dict[str, Any]) -> tuple[str | None, dict[str, SourceCluster], dict[str, str]]:
        """The cluster name a system-namespace Secret stands for, and copies of that origin's sources and errors."""
        name = ((secret.get("metadata") or {}).get("labels") or {}).get(api.IMPORT_LABEL)
        with self._lock:
            return name, dict(self._by_origin[ORIGIN_SECRET]), dict(self._errors[ORIGIN_SECRET])

    def set_secret(self, secret: dict[str, Any]) -> set[str]:
        """Add or update the cluster an import Secret of the system namespace gives; return changed names."""
        name, sources, errors = self._secret_origin(secret)
        if not name:
            return set()
        try:
            creds = from_secret_data(secret.get("data"), where=f"Secret {secret['metadata'].get('name')}")
        except CredentialsError as exc:
            errors[name] = str(exc)
            sources.pop(name, None)
        else:
            errors.pop(name, None)
            sources[name] = source_from_credentials(name, ORIGIN_SECRET, creds)
        return self._replace(ORIGIN_SECRET, sources, errors)

    def remove_secret(self, secret: dict[str, Any]) -> set[str]:
        name, sources, errors = self._secret_origin(secret)
        if not name:
            return set()
        sources.pop(name, None)
        errors.pop(name, None)
        return self._replace(ORIGIN_SECRET, sources, errors)
