"""The source credentials of the system namespace: which `<import>-token` Secrets there are credentials of source
clusters, as the caches say, fed into the source registry.

A Secret of the system namespace is a source credential only if an import there controls it and its writer (this
controller, or kubemcsa bootstrap as an admin) pinned it in that import's status: a labelled Secret anyone else
made or changed adds, replaces and removes no cluster. One that matches no pin is not used (the credential loaded
before, if any, stays) and is reported after a grace period, once per Secret version.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kubernetes.client.exceptions import ApiException

from controller.model import Observation, Writes
from controller.runtime.manager import Result
from controller.runtime.writes import RecentWrites
from controller.source_clusters import is_source_credential
from controller.sources import SourceRegistry
from kubemcsa.client import kube
from kubemcsa.client.informer import Informer
from kubemcsa.contract import api
from kubemcsa.contract.imports import STATUS_PINS, is_pinned, pins_for_write, pins_patch

log = logging.getLogger(__name__)

JSON = dict[str, Any]


class SystemCredentials:
    def __init__(
        self,
        sources: SourceRegistry,
        *,
        system_namespace: str,
        imports: Informer,
        secrets: Informer,
        import_writes: RecentWrites,
        record: Callable[[JSON, str, str, str], None],
        requeue_clusters: Callable[[set[str]], None],
        grace_seconds: float,
        clock: Callable[[], float],
    ) -> None:
        self.sources = sources
        self.system_namespace = system_namespace
        self.imports = imports  # the system namespace's imports (the controller's own informer may hold them)
        self.secrets = secrets  # and its labelled Secrets
        self.import_writes = import_writes  # the imports as this controller last wrote them (read-your-writes)
        self.record = record  # an Event on an import, when this replica leads
        self.requeue_clusters = requeue_clusters
        self.grace_seconds = grace_seconds
        self.clock = clock
        # Credential Secrets that matched no pin: import name -> (when, that Secret), and the (uid, resourceVersion)
        # last reported, so that each one is reported once.
        self._unpinned: dict[str, tuple[float, JSON]] = {}
        self._reported: dict[str, tuple[str, str]] = {}

    def owner(self, name: str) -> JSON | None:
        """The import `name` of the system namespace, as last written by this controller or cached."""
        key = (self.system_namespace, name)
        return self.import_writes.get(key, self.imports.get(name, key[0]))

    def load_all(self) -> None:
        """Each labelled Secret of the system namespace, judged against the synced imports."""
        for secret in self.secrets.list():
            if kube.object_key(secret)[0] == self.system_namespace:
                self.on_secret("MODIFIED", secret, None)

    def on_import(self, event: str, obj: JSON, old: JSON | None) -> None:
        """An import of the system namespace came or went: its Secret becomes (or stops being) a credential."""
        namespace, name = kube.object_key(obj)
        secret = self.secrets.get(api.secret_name_for_import(name), namespace)
        if secret is not None:
            self.on_secret("DELETED" if event == "DELETED" else "MODIFIED", secret, None)

    def on_secret(self, event: str, obj: JSON, old: JSON | None) -> None:
        label = ((obj.get("metadata") or {}).get("labels") or {}).get(api.IMPORT_LABEL)
        owner = self.owner(label) if isinstance(label, str) else None
        if event != "DELETED" and is_source_credential(obj, owner, self.system_namespace):
            if is_pinned(obj, owner):
                changed = self.sources.set_secret(obj)
            else:  # not used: the credential loaded before, if any, stays; said soon (see report_unpinned)
                self._unpinned.setdefault(str(label), (self.clock(), obj))
                changed = set()
        else:
            changed = self.sources.remove_secret(obj)
        self.requeue_clusters(changed)

    def report_unpinned(self) -> None:
        """Say which credential Secrets were not used because no trusted writer pinned them: a Warning Event on the
        import (no secret in it) and, if the cluster has no credential at all, the reason its imports give. Only
        after a grace period: the import's new pin comes through the imports' watch, which may deliver it a moment
        after the Secrets' watch delivered the Secret it pins."""
        for name, (since, refused) in list(self._unpinned.items()):
            if self.clock() - since < self.grace_seconds:
                continue
            self._unpinned.pop(name, None)
            owner = self.owner(name)
            if owner is None or is_pinned(refused, owner):  # gone, or its pin came in meanwhile
                continue
            meta = refused.get("metadata") or {}
            version = (str(meta.get("uid") or ""), str(meta.get("resourceVersion") or ""))
            if self._reported.get(name) != version:
                self._reported[name] = version
                self._report(name, owner, str(meta.get("name")))

    def _report(self, name: str, owner: JSON, secret_name: str) -> None:
        system = self.system_namespace
        where = f"Secret {system}/{secret_name}"
        why = (
            f"{where} was written neither by the controller nor by kubemcsa bootstrap (it matches no pin in "
            f"status.{STATUS_PINS} of import {system}/{name}); if an admin wrote it by hand, re-run kubemcsa "
            f"bootstrap for cluster {name}, else delete it and find who made it in the audit log."
        )
        kept = " The controller keeps the credential it had." if self.sources.get(name) is not None else ""
        log.warning("not using %s as the credential of cluster %s: it matches no pin", where, name)
        self.record(owner, "Warning", api.REASON_UNTRUSTED_CREDENTIAL, f"Not used as a credential: {why}{kept}")
        current = self.secrets.get(api.secret_name_for_import(name), system)
        if is_source_credential(current or {}, owner, system) and not is_pinned(current, owner):
            self.requeue_clusters(self.sources.refuse_secret(current or {}, why))


def pin_credential(
    imports_api: kube.Resource, import_writes: RecentWrites, name: str, observation: Observation, writes: Writes
) -> JSON | Result | None:
    """Before a source credential is written, pin it in its import's status (kubemcsa.contract.imports): the
    controller uses no credential Secret that its writer did not pin. The import as written, None if this pass writes
    no credential, or a Result if the pin could not be written (the import changed meanwhile: look again)."""
    namespace = kube.object_key(observation.imp)[0]
    credential_name = api.secret_name_for_import(name)
    bodies = [w.body for w in writes.secrets if kube.object_key(w.body)[1] == credential_name]
    if not bodies:
        return None
    pins = pins_for_write(observation.imp, observation.secret, bodies[-1])
    try:
        written = imports_api.patch_status(name, pins_patch(observation.imp, pins), namespace)
    except ApiException as exc:
        if exc.status == 404:
            return Result(outcome="skipped")  # the import is gone: so will its Secret be
        if exc.status != 409:
            raise
        return Result(retry=True, outcome="conflict")  # its status changed (another writer): look again
    import_writes.wrote((namespace, name), written)
    return written
