"""The controllers a node-less control plane runs, reacting to the store's events on one worker thread.

Garbage collection (ownerReferences, foreground/orphan deletion), namespace deletion, the legacy
service-account token controller, and the re-creation of each namespace's `default` ServiceAccount and
`kube-root-ca.crt` ConfigMap. The decisions are pure functions in gc.py; this module only applies them.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from kubemcsa_testing import gc
from kubemcsa_testing.cluster import (
    ROOT_CA_CONFIGMAP,
    SA_NAME_ANNOTATION,
    SA_TOKEN_TYPE,
    SA_UID_ANNOTATION,
    Cluster,
)
from kubemcsa_testing.errors import StatusError
from kubemcsa_testing.resources import ResourceInfo
from kubemcsa_testing.store import Event, Obj

log = logging.getLogger(__name__)
_STOP = object()

LegacyTokenMaker = Callable[[str, Obj, Obj], str]  # (namespace, service account, secret) -> token


def needs_handling(event: Event, owner_exists: Callable[[str], bool] = lambda uid: False) -> bool:
    """Does any controller act on this event (what Controllers.handle looks at)? Deletions, objects being deleted,
    objects with an owner that `owner_exists` does not know (by uid), and new service-account token Secrets; not,
    say, a status update of an ownerless object, or a write of an object whose owners all exist (an owner deleted
    later brings its dependents back in with its own deletion)."""
    if event.type == "DELETED":
        return True
    obj = event.obj
    meta = obj["metadata"]
    if meta.get("deletionTimestamp"):
        return True
    refs = meta.get("ownerReferences")
    if refs and not all(isinstance(ref, dict) and owner_exists(str(ref.get("uid", ""))) for ref in refs):
        return True
    return event.storage_key == "/secrets" and obj.get("type") == SA_TOKEN_TYPE and event.type == "ADDED"


class Controllers:
    """Runs on its own thread; `start()`/`stop()` follow the server."""

    def __init__(self, cluster: Cluster, legacy_token: LegacyTokenMaker | None = None) -> None:
        self.cluster = cluster
        self.legacy_token = legacy_token
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()
        cluster.store.add_listener(self._on_event)

    def _on_event(self, event: Event) -> None:
        # Called under the store's lock, so the owners looked up are those of this very write.
        if not needs_handling(event, self.cluster.store.uid_exists):
            return  # most writes concern no controller: no wake-up of the worker for them
        self._idle.clear()
        self._queue.put(event)

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._run, name=f"controllers-{self.cluster.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=5)
            self._thread = None

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """True once every queued event has been handled (for tests and benchmarks)."""
        return self._idle.wait(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                self.handle(item)
            except StatusError as exc:  # a concurrent change; the next event will bring us back
                log.debug("controller: %s", exc.message)
            except Exception:
                log.exception("controller failed on an event of %s", item.storage_key)
            if self._queue.empty():
                self._idle.set()

    # Dispatch -------------------------------------------------------------------------------------

    def handle(self, event: Event) -> None:
        if not needs_handling(event):
            return
        obj, meta = event.obj, event.obj["metadata"]
        key = event.storage_key
        if event.type == "DELETED":
            self._collect_dependents(meta["uid"])
            self._recheck_owners_being_deleted(obj)
            if meta.get("namespace"):
                self._maybe_finish_namespace(meta["namespace"])
            if key == "/serviceaccounts":
                self._service_account_deleted(obj)
            elif key == "/configmaps" and meta["name"] == ROOT_CA_CONFIGMAP:
                self.cluster.ensure_namespace_defaults(meta["namespace"])
            return
        if meta.get("ownerReferences") and not meta.get("deletionTimestamp"):
            self._check_owners(key, obj)
        if meta.get("deletionTimestamp"):
            self._continue_deletion(key, obj)
        if key == "/secrets" and obj.get("type") == SA_TOKEN_TYPE and event.type == "ADDED":
            self._fill_legacy_token(obj)

    def _info(self, storage_key: str) -> ResourceInfo | None:
        return self.cluster.info_for_storage(storage_key)

    # Garbage collection ---------------------------------------------------------------------------

    def _delete(self, storage_key: str, obj: Obj, policy: str = "Background") -> None:
        info = self._info(storage_key)
        if info is None:
            return
        meta = obj["metadata"]
        options = {"propagationPolicy": policy, "preconditions": {"uid": meta["uid"]}}
        with contextlib.suppress(StatusError):  # already gone or replaced
            self.cluster.delete(info, meta.get("namespace", ""), meta["name"], options)

    def _collect_dependents(self, owner_uid: str) -> None:
        for storage_key, dependent in self.cluster.store.dependents_of(owner_uid):
            self._check_owners(storage_key, dependent)

    def _recheck_owners_being_deleted(self, obj: Obj) -> None:
        """A dependent is gone: an owner deleted in the foreground may now be free to go."""
        for ref in obj["metadata"].get("ownerReferences") or []:
            found = self.cluster.store.by_uid(str(ref.get("uid", "")))
            if found is not None and found[1]["metadata"].get("deletionTimestamp"):
                self._continue_deletion(*found)

    def _check_owners(self, storage_key: str, obj: Obj) -> None:
        refs = obj["metadata"].get("ownerReferences") or []
        alive = [ref for ref in refs if self._owner_alive(ref)]
        action = gc.decide(refs, alive)
        if action == gc.DELETE:
            self._delete(storage_key, obj)
        elif action == gc.DROP_REFS:
            self._set_owner_refs(storage_key, obj, alive)

    def _owner_alive(self, ref: dict[str, Any]) -> bool:
        found = self.cluster.store.by_uid(str(ref.get("uid", "")))
        return found is not None

    def _set_owner_refs(self, storage_key: str, obj: Obj, refs: list[dict[str, Any]]) -> None:
        info = self._info(storage_key)
        if info is None:
            return
        meta = obj["metadata"]
        body = {"metadata": {"ownerReferences": refs or None, "resourceVersion": meta["resourceVersion"]}}
        with contextlib.suppress(StatusError):
            self.cluster.patch(info, meta.get("namespace", ""), meta["name"], "application/merge-patch+json", body)

    def _continue_deletion(self, storage_key: str, obj: Obj) -> None:
        meta = obj["metadata"]
        finalizers = meta.get("finalizers") or []
        if storage_key == "/namespaces":
            self._delete_namespace_contents(meta["name"])
            self._maybe_finish_namespace(meta["name"])
            return
        dependents = self.cluster.store.dependents_of(meta["uid"])
        if "orphan" in finalizers:
            for dep_key, dep in dependents:
                refs = [r for r in dep["metadata"].get("ownerReferences") or [] if r.get("uid") != meta["uid"]]
                self._set_owner_refs(dep_key, dep, refs)
            self._remove_finalizer(storage_key, obj, "orphan")
        elif "foregroundDeletion" in finalizers:
            if not dependents:
                self._remove_finalizer(storage_key, obj, "foregroundDeletion")
            for dep_key, dep in dependents:
                if not dep["metadata"].get("deletionTimestamp"):
                    self._delete(dep_key, dep, "Foreground")

    def _remove_finalizer(self, storage_key: str, obj: Obj, finalizer: str) -> None:
        info = self._info(storage_key)
        if info is None:
            return
        meta = obj["metadata"]
        current = self.cluster.find(info, meta.get("namespace", ""), meta["name"])
        if current is None or current["metadata"]["uid"] != meta["uid"]:
            return
        remaining = [f for f in current["metadata"].get("finalizers") or [] if f != finalizer]
        body = {
            "metadata": {"finalizers": remaining or None, "resourceVersion": current["metadata"]["resourceVersion"]}
        }
        with contextlib.suppress(StatusError):
            self.cluster.patch(info, meta.get("namespace", ""), meta["name"], "application/merge-patch+json", body)

    # Namespaces -----------------------------------------------------------------------------------

    def _delete_namespace_contents(self, namespace: str) -> None:
        for storage_key, obj in self.cluster.store.namespaces_in_use(namespace):
            if not obj["metadata"].get("deletionTimestamp"):
                self._delete(storage_key, obj)

    def _maybe_finish_namespace(self, namespace: str) -> None:
        ns = self.cluster.store.get("/namespaces", "", namespace)
        if ns is None or not ns["metadata"].get("deletionTimestamp"):
            return
        if self.cluster.store.namespaces_in_use(namespace):
            # Objects with a foreground parent may have been waiting on their dependents; look again.
            for storage_key, obj in self.cluster.store.namespaces_in_use(namespace):
                if not obj["metadata"].get("deletionTimestamp"):
                    self._delete(storage_key, obj)
            return
        info = self._info("/namespaces")
        if info is None:
            return
        if ns["metadata"].get("finalizers"):
            return  # someone else's finalizer: the namespace waits for it, as in kube
        self.cluster.remove(info, "", namespace)

    # Service accounts and their legacy tokens -----------------------------------------------------

    def _fill_legacy_token(self, secret: Obj) -> None:
        meta = secret["metadata"]
        data = secret.get("data") or {}
        if data.get("token") or self.legacy_token is None:
            return
        namespace = meta["namespace"]
        sa_name = (meta.get("annotations") or {}).get(SA_NAME_ANNOTATION, "")
        sa = self.cluster.store.get("/serviceaccounts", namespace, sa_name)
        if sa is None:
            self._delete("/secrets", secret)  # the token controller deletes tokens of missing accounts
            return
        wanted_uid = (meta.get("annotations") or {}).get(SA_UID_ANNOTATION)
        if wanted_uid and wanted_uid != sa["metadata"]["uid"]:
            self._delete("/secrets", secret)
            return
        token = self.legacy_token(namespace, sa, secret)
        body = {
            "metadata": {
                "annotations": {SA_UID_ANNOTATION: sa["metadata"]["uid"]},
                "resourceVersion": meta["resourceVersion"],
            },
            "data": {
                "token": base64.b64encode(token.encode()).decode(),
                "ca.crt": base64.b64encode(self.cluster.ca_pem).decode(),
                "namespace": base64.b64encode(namespace.encode()).decode(),
            },
        }
        info = self._info("/secrets")
        if info is not None:
            with contextlib.suppress(StatusError):
                self.cluster.patch(info, namespace, meta["name"], "application/merge-patch+json", body)

    def _service_account_deleted(self, sa: Obj) -> None:
        meta = sa["metadata"]
        namespace = meta["namespace"]
        objs, _ = self.cluster.store.list("/secrets", namespace)
        for secret in objs:
            annotations = secret["metadata"].get("annotations") or {}
            if (
                secret.get("type") == SA_TOKEN_TYPE
                and annotations.get(SA_NAME_ANNOTATION) == meta["name"]
                and annotations.get(SA_UID_ANNOTATION) in (None, meta["uid"])
            ):
                self._delete("/secrets", secret)
        if meta["name"] == "default":
            self.cluster.ensure_namespace_defaults(namespace)
