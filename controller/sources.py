"""The named source clusters the controller can request tokens from, and an API client for each.

Three origins, looked up in this order for a name:
1. contexts of --source-kubeconfig (context name = cluster name);
2. service-account imports mounted under --imports-dir/NAME/ (the original bootstrap model);
3. import Secrets in the controller's own system namespace (the Secret of import NAME gives cluster NAME:
   `kubemcsa bootstrap` adds a cluster this way without a restart). Only a Secret the controller or bootstrap made
   counts: `<NAME>-token`, controlled by the import NAME of the system namespace (`is_source_credential`), and
   pinned by its writer in that import's status (`kubemcsa.contract.imports.is_pinned`), so that whoever may merely
   create
   Secrets there cannot add or replace a cluster (no shipped component but the controller may).
Each source knows the consumer's name there (`consumer`: the controller's own account in the source, read from a
bootstrap credential's token, or --cluster-name for kubeconfig contexts), which is what owners export to.
Files are re-read only when a cheap stat says they changed; an ApiClient is rebuilt only when its
credentials change. `refresh_files` returns the names whose credentials changed, to re-queue their imports."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import yaml
from kubernetes.client import ApiClient

from controller.source_clusters import (
    _ORDER,
    ORIGIN_KUBECONFIG,
    ORIGIN_MOUNTED,
    ORIGIN_SECRET,
    SourceCluster,
    _just_written,
    _stat_signature,
    keep_missing_once,
    source_from_credentials,
    sources_from_kubeconfig,
)
from kubemcsa.client import connect
from kubemcsa.client.kubeconfig import (
    referenced_files,
)
from kubemcsa.contract import api
from kubemcsa.contract.credentials import CredentialsError, from_secret_data, read_mounted
from kubemcsa.contract.imports import metadata_of, token_times

log = logging.getLogger(__name__)


class SourceRegistry:
    """Thread-safe registry of source clusters by name, with one cached ApiClient per cluster."""

    def __init__(
        self,
        *,
        source_kubeconfig: str | None = None,
        imports_dir: str | None = None,
        cluster_name: str | None = None,
        connections: int = 0,
    ) -> None:
        self.source_kubeconfig = source_kubeconfig
        self.imports_dir = imports_dir
        self.cluster_name = cluster_name  # this cluster's name in sources whose credential does not say it
        self.connections = connections  # each source client's pool holds at least this many
        self._secret_uids: dict[str, str] = {}  # cluster name -> UID of the system-namespace Secret it came from
        self._refused_uids: dict[str, str] = {}  # cluster name -> UID of an unpinned Secret that says why it is not
        self._lock = threading.RLock()
        self._by_origin: dict[str, dict[str, SourceCluster]] = {origin: {} for origin in _ORDER}
        self._errors: dict[str, dict[str, str]] = {origin: {} for origin in _ORDER}
        self._signatures: dict[str, tuple[Any, ...]] = {}
        self._clients: dict[str, tuple[str, ApiClient]] = {}
        self._kubeconfig_files: list[str] = []
        self._files_lock = threading.Lock()
        self._kubeconfig_read = False  # the source kubeconfig was read (parsed) at least once
        self._kubeconfig_settled = False  # ... and found unchanged since: not read in the middle of a write
        # Contexts a read of the source kubeconfig no longer had: dropped only if the next read agrees, since a
        # file being rewritten in place (truncated, then written) reads short for a moment.
        self._missing_contexts: set[str] = set()

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
        # One connection attempt per try: the controller's own backoff and circuit decide about retrying,
        # not the HTTP library's hidden retries (3 more connections per failed try by default).
        client.configuration.retries = False
        connect.make_room(client.configuration, self.connections)  # a connection per worker, and the export watch's
        client = ApiClient(client.configuration)
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
        with self._files_lock:  # the poller and the start-up wait may both ask
            return self._refresh_files()

    def _refresh_files(self) -> set[str]:
        changed: set[str] = set()
        if self.source_kubeconfig:
            changed |= self._refresh_kubeconfig(self.source_kubeconfig)
        if self.imports_dir:
            changed |= self._refresh_mounted(self.imports_dir)
        return changed

    def files_loaded(self) -> bool:
        """True once every declared source file has been read whole: the source kubeconfig was read and then
        found unchanged (the mounted imports are written atomically by the kubelet, and read at once). Until then
        the controller's workers wait (Controller._sources_loaded)."""
        return self.source_kubeconfig is None or self._kubeconfig_settled

    def _refresh_kubeconfig(self, path: str) -> set[str]:
        signature = _stat_signature([path, *self._kubeconfig_files])
        if self._signatures.get("kubeconfig") == signature:
            # Unchanged since a read, and not just written: what was read was the whole file, not a write in progress.
            self._kubeconfig_settled = self._kubeconfig_read and not _just_written(path)
            if not self._kubeconfig_settled:
                self._signatures.pop("kubeconfig", None)  # look again on the next poll
            return set()
        self._signatures["kubeconfig"] = signature
        self._kubeconfig_settled = False
        try:
            with open(path, encoding="utf-8") as handle:
                config = yaml.safe_load(handle)
            if config is None:  # an empty file: being written; read it again on the next poll
                self._signatures.pop("kubeconfig", None)
                log.info("source kubeconfig %s is empty (being written?); keeping the clusters read before", path)
                return set()
            if not isinstance(config, dict):
                raise ValueError("not a mapping")
        except FileNotFoundError:
            log.warning("source kubeconfig %s does not exist (yet); no cluster from it", path)
            return self._replace(ORIGIN_KUBECONFIG, {}, {})
        except (OSError, ValueError, yaml.YAMLError) as exc:
            log.warning("source kubeconfig %s is unreadable (%s); keeping the clusters read before", path, type(exc))
            self._signatures.pop("kubeconfig", None)  # perhaps half written: read it again on the next poll
            return set()
        base_dir = os.path.dirname(os.path.abspath(path))
        sources, errors = sources_from_kubeconfig(config, base_dir, self.cluster_name)
        with self._lock:
            before = self._by_origin[ORIGIN_KUBECONFIG]
        # A file written a moment ago may still be being written: a context it lacks is not taken as gone yet.
        confirmed = set() if _just_written(path) else self._missing_contexts
        sources, errors, self._missing_contexts = keep_missing_once(before, sources, errors, confirmed)
        if self._missing_contexts:
            self._signatures.pop("kubeconfig", None)  # read again on the next poll, changed or not
        self._kubeconfig_read = True
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
            sources[name] = source_from_credentials(name, ORIGIN_MOUNTED, creds, cluster_name=self.cluster_name)
        return self._replace(ORIGIN_MOUNTED, sources, errors)

    # --- system namespace Secrets ----------------------------------------------------------------------------------
    def _secret_origin(self, secret: dict[str, Any]) -> tuple[str | None, dict[str, SourceCluster], dict[str, str]]:
        """The cluster name a system-namespace Secret stands for, and copies of that origin's sources and errors."""
        meta = secret.get("metadata") or {}
        name = (meta.get("labels") or {}).get(api.IMPORT_LABEL)
        # Only an import's own Secret `<import>-token` holds credentials (not, say, its Argo CD cluster Secret).
        if not isinstance(name, str) or meta.get("name") != api.secret_name_for_import(name):
            name = None
        with self._lock:
            return name, dict(self._by_origin[ORIGIN_SECRET]), dict(self._errors[ORIGIN_SECRET])

    def set_secret(self, secret: dict[str, Any]) -> set[str]:
        """Add or update the cluster an import Secret of the system namespace gives; return changed names.

        Atomic: two informer threads (Secrets, and imports that make a Secret a credential) may call this at once
        for two clusters, and neither may undo the other's (a cluster lost so would read as unknown)."""
        with self._lock:
            return self._set_secret(secret)

    def _set_secret(self, secret: dict[str, Any]) -> set[str]:
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
            sources[name] = source_from_credentials(
                name, ORIGIN_SECRET, creds, token_times(secret)[1], cluster_name=self.cluster_name
            )
        with self._lock:
            self._secret_uids[name] = str(metadata_of(secret).get("uid") or "")
            self._refused_uids.pop(name, None)
        return self._replace(ORIGIN_SECRET, sources, errors)

    def refuse_secret(self, secret: dict[str, Any], why: str) -> set[str]:
        """A credential Secret that no writer the controller trusts pinned: it is not used. The cluster keeps the
        credential loaded before, if there is one (nothing is lost); else it is unusable, saying `why`."""
        name, sources, errors = self._secret_origin(secret)
        if not name or name in sources:
            return set()
        errors[name] = why
        with self._lock:
            self._refused_uids[name] = str(metadata_of(secret).get("uid") or "")
        return self._replace(ORIGIN_SECRET, sources, errors)

    def remove_secret(self, secret: dict[str, Any]) -> set[str]:
        """Forget the cluster a system-namespace Secret gave, if it is that very Secret (same UID) that gave it."""
        with self._lock:
            return self._remove_secret(secret)

    def _remove_secret(self, secret: dict[str, Any]) -> set[str]:
        name, sources, errors = self._secret_origin(secret)
        if not name:
            return set()
        uid = str(metadata_of(secret).get("uid") or "")
        with self._lock:
            if self._refused_uids.get(name) == uid and name not in sources:
                self._refused_uids.pop(name, None)  # the refused Secret went away: so does the reason it gave
                errors.pop(name, None)
                return self._replace(ORIGIN_SECRET, sources, errors)
            if self._secret_uids.get(name, "") != uid:
                return set()  # another Secret (say, a rejected look-alike) going away changes nothing
            self._secret_uids.pop(name, None)
        sources.pop(name, None)
        errors.pop(name, None)
        return self._replace(ORIGIN_SECRET, sources, errors)
