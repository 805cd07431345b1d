"""Which service accounts each source cluster exports, from one label-selected list-watch per source.

The owner of a service account exports it with the label `multicluster.admiralty.io/exported: "true"` and the
annotation `multicluster.admiralty.io/export-to` (kubemcsa/contract/export_policy.py). Per source cluster, the
controller
list-watches only labelled service accounts, so the cache stays as small as what is exported, and a reconcile
reads exports from memory: no API call per import in the steady state.

When the watch lacks an account, one list call (by name) tells a withdrawn export from a deleted account; its
answer is remembered until the watch says something about that account. When a source first appears, two
SelfSubjectAccessReviews say whether the controller may list service accounts cluster-wide (else it watches the
namespaces imports name, one by one) and whether it holds the open grant (a warning: it could mint any token).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from controller.model import ExportView, Remote
from controller.remote import renew_hint, unreachable
from kubemcsa.client import kube
from kubemcsa.client.informer import Informer
from kubemcsa.contract import api

log = logging.getLogger(__name__)

SELF_SUBJECT_ACCESS_REVIEWS = kube.ResourceType(
    "authorization.k8s.io/v1", "selfsubjectaccessreviews", "SelfSubjectAccessReview", False
)
# How long a new watch may take to list before imports waiting on it are told the source cannot be seen.
WARM_UP_SECONDS = 10.0
# While a source cannot be listed, it is tried again at least this often, so that its recovery is seen soon.
MAX_LIST_BACKOFF = 5.0
CLUSTER_WIDE = ""

EventCallback = Callable[[str, str, str], None]  # (source, namespace, name) of a service account the watch saw


def access_review(resource: str, verb: str, subresource: str = "") -> dict[str, Any]:
    """A SelfSubjectAccessReview of `verb` on core `resource` in every namespace, for any name."""
    attributes = {"group": "", "resource": resource, "verb": verb, "namespace": ""}
    if subresource:
        attributes["subresource"] = subresource
    return {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": attributes},
    }


def watch_problem(
    source: Remote, namespace: str, last_error: int | None, exception: BaseException | None = None
) -> tuple[str, str] | None:
    """Why a watch of exported service accounts has not listed: (condition reason, the import's message)."""
    cluster = source.cluster_name
    where = f"in namespace {namespace} of cluster {cluster}" if namespace else f"in cluster {cluster}"
    if last_error is None:
        return None
    if last_error == 0 and exception is not None:
        failure = unreachable(source, exception)  # as the token requests say it
        return failure.reason, failure.message
    if last_error == 403:
        return api.REASON_FORBIDDEN, (
            f"The controller may not list service accounts {where}, so it cannot see what is exported there; run "
            "kubemcsa bootstrap again, with this namespace in --source-namespaces if you use it."
        )
    if last_error == 401:
        return api.REASON_UNAUTHORIZED, (
            f"Cluster {cluster} rejected the controller's credentials (401 Unauthorized); {renew_hint(source)}."
        )
    return api.REASON_REMOTE_UNREACHABLE, (
        f"Cluster {cluster} answered {last_error} to the list of exported service accounts; the controller retries "
        "by itself."
    )


@dataclass
class _SourceWatch:
    """The export watch of one source: cluster-wide, or one informer per namespace when only those are allowed."""

    name: str
    fingerprint: str
    client: ApiClient
    started: float = field(default_factory=time.monotonic)
    scope_decided: threading.Event = field(default_factory=threading.Event)
    cluster_wide: bool = True
    informers: dict[str, Informer] = field(default_factory=dict)  # by namespace ("" = cluster-wide)
    exists: dict[tuple[str, str], bool] = field(default_factory=dict)  # remembered answers of the existence probe


class ExportWatches:
    """The export watches of all source clusters, started on first use, stopped with the controller."""

    def __init__(
        self,
        *,
        on_event: EventCallback,
        on_synced: Callable[[str], None],
        remote_timeout: float = 10.0,
        warm_up_seconds: float = WARM_UP_SECONDS,
    ) -> None:
        self._on_event = on_event
        self._on_synced = on_synced
        self.remote_timeout = remote_timeout
        self.warm_up_seconds = warm_up_seconds
        self._watches: dict[str, _SourceWatch] = {}
        self._lock = threading.RLock()
        self._stopped = threading.Event()

    # --- what reconciles read ---
    def view(
        self, remote: Remote, fingerprint: str, client: ApiClient, consumer: str | None, namespace: str, name: str
    ) -> tuple[ExportView, bool]:
        """(ExportView of namespace/name in `remote`, warming), warming meaning: not listed yet, wait a little."""
        source = remote.cluster_name
        watch = self.ensure(source, fingerprint, client)
        if not watch.scope_decided.is_set():
            return ExportView(consumer, synced=False), not self._warm_up_over(watch)
        informer = self._informer(watch, namespace)
        if not informer.has_synced:
            scope = "" if watch.cluster_wide else namespace
            problem = watch_problem(remote, scope, informer.last_error, informer.last_exception)
            reason, text = problem or (api.REASON_REMOTE_UNREACHABLE, None)
            view = ExportView(consumer, synced=False, problem=text, problem_reason=reason)
            # Still listing for the first time: wait a little. Failed already: say so at once.
            return view, informer.last_error is None and not self._warm_up_over(watch)
        service_account = informer.get(name, namespace)
        with self._lock:
            exists = True if service_account is not None else watch.exists.get((namespace, name))
        return ExportView(consumer, synced=True, service_account=service_account, exists=exists), False

    def probe_exists(self, source: str, namespace: str, name: str) -> bool | None:
        """Whether namespace/name exists in `source` at all (one list call, remembered); None if it cannot tell."""
        with self._lock:
            watch = self._watches.get(source)
        if watch is None:
            return None
        accounts = kube.Resource(watch.client, kube.SERVICE_ACCOUNTS, timeout=self.remote_timeout)
        try:
            listing = accounts.list(namespace, field_selector=f"metadata.name={name}")
        except (ApiException, *kube.CONNECTION_ERRORS):
            return None
        exists = bool(listing.get("items"))
        with self._lock:
            watch.exists[(namespace, name)] = exists
        return exists

    def _informers_of(self, source: str) -> tuple[_SourceWatch | None, list[Informer]]:
        with self._lock:
            watch = self._watches.get(source)
            return watch, list(watch.informers.values()) if watch is not None else []

    def has_synced(self, source: str) -> bool:
        """True once every informer of `source`'s export watch has listed (per namespace: those started so far)."""
        watch, informers = self._informers_of(source)
        return bool(watch and watch.scope_decided.is_set() and all(i.has_synced for i in informers))

    def failing(self, source: str) -> bool:
        """True while some informer of `source`'s export watch fails to list (its imports say why)."""
        return any(i.last_error is not None and not i.has_synced for i in self._informers_of(source)[1])

    def unreachable(self, source: str) -> bool:
        """True while the last list or watch of some informer of `source`'s export watch got no answer: the source
        or the way to it is down, though imports holding valid tokens make no call that would say so."""
        return any(i.last_error == 0 for i in self._informers_of(source)[1])

    def forget(self, source: str) -> None:
        """Stop the watch of a source the controller no longer knows."""
        with self._lock:
            watch = self._watches.pop(source, None)
        if watch is not None:
            for informer in list(watch.informers.values()):
                informer.stop(timeout=0)

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            names = list(self._watches)
        for source in names:
            self.forget(source)

    # --- watches ---
    def _warm_up_over(self, watch: _SourceWatch) -> bool:
        return time.monotonic() - watch.started > self.warm_up_seconds

    def ensure(self, source: str, fingerprint: str, client: ApiClient) -> _SourceWatch:
        """Start the export watch of `source` if it has none (in the background), or give it new credentials."""
        with self._lock:
            watch = self._watches.get(source)
            if watch is not None and watch.fingerprint != fingerprint and self.has_synced(source):
                # A rotated credential: the next list and watch use it, and the cache stays.
                watch.fingerprint, watch.client = fingerprint, client
                for informer in watch.informers.values():
                    informer.resource = self._accounts(client)
            elif watch is not None and watch.fingerprint != fingerprint:
                self.forget(source)  # it never listed with the old credential: start afresh, without its backoff
                watch = None
            if watch is not None:
                return watch
            watch = self._watches[source] = _SourceWatch(source, fingerprint, client)
        threading.Thread(target=self._decide_scope, args=(watch,), name=f"exports-{source}", daemon=True).start()
        return watch

    def _accounts(self, client: ApiClient) -> kube.Resource:
        return kube.Resource(client, kube.SERVICE_ACCOUNTS, timeout=self.remote_timeout)

    def _decide_scope(self, watch: _SourceWatch) -> None:
        """Ask the source what the controller may do there: list cluster-wide? mint any token (warn)?"""
        reviews = kube.Resource(watch.client, SELF_SUBJECT_ACCESS_REVIEWS, timeout=self.remote_timeout)

        def allowed(review: dict[str, Any]) -> bool | None:
            try:
                return bool((reviews.create(review).get("status") or {}).get("allowed"))
            except (ApiException, *kube.CONNECTION_ERRORS):
                return None

        if allowed(access_review("serviceaccounts", "create", "token")):
            log.warning(
                "the controller may request a token for ANY service account of source cluster %s (an open grant, "
                "bootstrap --allow-all-service-accounts): a compromise of this controller exposes all of them; "
                "re-run kubemcsa bootstrap without it once owners export what you import",
                watch.name,
            )
        watch.cluster_wide = allowed(access_review("serviceaccounts", "list")) is not False
        if not watch.cluster_wide:
            log.info("source cluster %s: service accounts are watched per namespace (--source-namespaces)", watch.name)
        if watch.cluster_wide:
            self._informer(watch, CLUSTER_WIDE)
        watch.scope_decided.set()
        self._on_synced(watch.name)  # imports that waited for the scope look again (per namespace: they start it)

    def _informer(self, watch: _SourceWatch, namespace: str) -> Informer:
        scope = CLUSTER_WIDE if watch.cluster_wide else namespace
        with self._lock:
            informer = watch.informers.get(scope)
            if informer is not None:
                return informer
            if self._stopped.is_set():  # never started: never synced
                return Informer(self._accounts(watch.client), name="stopped")
            informer = Informer(
                self._accounts(watch.client),
                namespace=scope or None,
                label_selector=api.EXPORTED_SELECTOR,
                name=f"exports-{watch.name}{'-' + scope if scope else ''}",
                max_backoff=MAX_LIST_BACKOFF,
            )
            informer.add_handler(lambda _event, obj, _old, watch=watch: self._seen(watch, obj))
            watch.informers[scope] = informer
        informer.start()
        threading.Thread(
            target=self._when_synced, args=(watch, informer), name=f"{informer.name}-sync", daemon=True
        ).start()
        return informer

    def _seen(self, watch: _SourceWatch, obj: dict[str, Any]) -> None:
        namespace, name = kube.object_key(obj)
        with self._lock:
            watch.exists.pop((namespace, name), None)  # whatever was probed may have changed
        self._on_event(watch.name, namespace, name)

    def _when_synced(self, watch: _SourceWatch, informer: Informer) -> None:
        told = False
        while not informer.wait_for_sync(0.5):
            if self._stopped.is_set() or informer not in list(watch.informers.values()):
                return
            if not told and informer.last_error is not None:
                told = True
                self._on_synced(watch.name)  # imports waiting on it learn why it cannot list (they retry)
        with self._lock:
            watch.exists.clear()
        self._on_synced(watch.name)
