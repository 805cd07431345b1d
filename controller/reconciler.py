"""One reconcile pass for one ServiceAccountImport, top to bottom: observe, assess, act.

- observe: the import, its Secret, the source cluster and the token in memory, from caches only;
- assess (pure, controller/assess.py): current, needs a token, or blocked with a reason;
- act: the token request if one is needed, then the writes `plan` asks for (Secret, status, Events).
It returns a Result saying when to look again, as controller-runtime's Reconcile does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from kubernetes.client.exceptions import ApiException

from controller.assess import assess, federated_audience
from controller.conditions import status_patch
from controller.credentials import pin_credential
from controller.export_watches import ExportWatches
from controller.gates import (
    FIRST,
    REASON_SOURCE_NEAR_CAPACITY,
    REFRESH,
    SourceGates,
    Wait,
    refresh_rate,
)
from controller.metrics import Metrics
from controller.model import Blocked, ExportView, Federated, HasToken, NeedsToken, NeedsTrustCheck, Observation, Writes
from controller.outputs import OUTPUTS
from controller.outputs.base import SourceView, as_section
from controller.outputs.store import OutputCache, OutputStore
from controller.outputs.versions import SourceVersions
from controller.plan import plan
from controller.remote import RemoteFailure, TokenSource, fetch_token
from controller.runtime.events import EventRecorder
from controller.runtime.manager import Result
from controller.runtime.writes import RecentWrites
from controller.source_clusters import SourceCluster, client_error_message
from controller.sources import SourceRegistry
from controller.trust_checks import FederatedSources, TrustChecks
from kubemcsa.client import kube
from kubemcsa.client.informer import Informer
from kubemcsa.contract import api
from kubemcsa.contract.imports import ImportToken, is_controlled_by, is_pinned, share_ca, share_token
from kubemcsa.contract.spec import TOKEN_TYPE_FEDERATED, SpecError, parse_spec

log = logging.getLogger(__name__)


# How long an import waiting in its source's queue stays there before it looks again by itself (it is woken
# when its turn comes; this only bounds the wait should a wake-up be lost).
QUEUED_BACKSTOP_SECONDS = 60.0

# What observe returns while the import's source is still listing its exports: look again once it has.
WARMING: Any = object()


def import_key(namespace: str | None, name: str) -> str:
    return f"{namespace or ''}/{name}"


def split_key(key: str) -> tuple[str, str]:
    namespace, _, name = key.partition("/")
    return namespace, name


@dataclass
class Caches:
    """What the reconciler reads and writes locally: the informers and their resources."""

    imports: Informer
    secrets: Informer
    imports_api: kube.Resource
    secrets_api: kube.Resource
    outputs: dict[str, OutputCache] = field(default_factory=dict)  # by output name (controller/outputs)


class Reconciler:
    def __init__(
        self,
        caches: Caches,
        sources: SourceRegistry,
        recorder: EventRecorder,
        metrics: Metrics,
        *,
        gates: SourceGates,
        wake: Callable[[Iterable[str]], None],
        may_write: Callable[[], bool],
        remote_timeout: float,
        exports: ExportWatches,
        system_namespace: str = api.SYSTEM_NAMESPACE,
        clock: Callable[[], float] = time.time,
        federated: FederatedSources | None = None,
        trust_checks: TrustChecks | None = None,
        token_source: TokenSource = fetch_token,
    ) -> None:
        self.caches = caches
        self.exports = exports
        self.system_namespace = system_namespace
        self.sources = sources
        self.federated = federated
        self.trust_checks = trust_checks
        self.token_source = token_source  # the one call that asks a source for a token
        self.recorder = recorder
        self.metrics = metrics
        self.gates = gates
        self.wake = wake
        self.may_write = may_write
        self.remote_timeout = remote_timeout
        self.clock = clock
        self.import_writes = RecentWrites()
        self.secret_writes = RecentWrites()
        self.outputs = OutputStore(caches.outputs)
        self.versions = SourceVersions(timeout=remote_timeout, clock=clock)
        self._held: dict[str, ImportToken] = {}
        self._cas: dict[bytes, bytes] = {}
        self._lock = threading.Lock()

    def _count_demand(self, key: str, observation: Observation, token: ImportToken) -> None:
        """What the import's refreshes cost its source's rate limit; an Event when the source nears capacity."""
        assert observation.source is not None
        cluster = observation.source.cluster_name
        gate = self.gates.gate(cluster)
        if gate.record_demand(key, refresh_rate(token.issued.issued_at, token.expires_at)):
            rate, holding = gate.demand()
            message = (
                f"Cluster {cluster}'s {holding} imports need {rate:.2f} token requests a second to stay refreshed, "
                f"{rate / gate.qps:.0%} of the controller's --source-qps {gate.qps:g}; raise --source-qps or give "
                "the imports longer-lived tokens (spec.expirationSeconds) before refreshes fall behind."
            )
            log.warning("%s", message)
            self.recorder.record(observation.imp, "Warning", REASON_SOURCE_NEAR_CAPACITY, message)
        rate, _ = gate.demand()
        self.metrics.source_demand.labels(cluster).set(rate / gate.qps)

    # --- what the informers say ---
    def import_seen(self, obj: dict[str, Any], wake: Callable[[], None]) -> None:
        """The informer delivered the import: `wake()` unless it is this process's own write coming back (decided
        once the write's answer is in, if one is in flight: controller.runtime.writes)."""
        self.import_writes.delivered(kube.object_key(obj), obj, wake)

    def import_deleted(self, key: str) -> None:
        self.import_writes.forget(split_key(key))
        self.gates.forget(key)
        with self._lock:
            self._held.pop(key, None)
        self.metrics.set_expiry(key, None)

    def secret_seen(self, obj: dict[str, Any], wake: Callable[[], None], deleted: bool = False) -> None:
        """The informer delivered a Secret (or its deletion): `wake()` unless it is this process's own write coming
        back, as import_seen."""
        if deleted:
            self.secret_writes.forget(kube.object_key(obj))
            wake()
            return
        self.secret_writes.delivered(kube.object_key(obj), obj, wake)

    def output_seen(self, output: str, obj: dict[str, Any], wake: Callable[[], None], deleted: bool = False) -> None:
        """An output's informer delivered `obj` (or its deletion): `wake()` unless it is this process's own write
        coming back, as import_seen."""
        self.outputs.seen(output, obj, wake, deleted)

    # --- the pass ---
    def reconcile(self, key: str) -> Result:
        observation = self.observe(key)
        if observation is None:
            return Result(outcome="skipped")  # gone or going: its Secret goes with it (ownerReference)
        if observation is WARMING:
            # The source's export watch is listing: it queues the import again once it has (this is a backstop).
            return Result(outcome="skipped", requeue_after=self.exports.warm_up_seconds)
        state = assess(observation)
        if isinstance(state, NeedsToken):
            if not self.may_write():
                return Result(outcome="skipped")
            answer = self.request_token(key, state, observation.imp)
            if isinstance(answer, Result):
                return answer  # rate-limited: back at its reserved slot, nothing to write meanwhile
            state = answer
        elif isinstance(state, NeedsTrustCheck):
            if not self.may_write() or self.trust_checks is None:
                return Result(outcome="skipped")
            state = Federated(state.spec, state.source, self.trust_checks.check(state))
        return self.act(key, observation, plan(observation, state))

    def observe(self, key: str) -> Observation | None:
        """What the caches say of the import (None: gone; WARMING: its source's exports are not listed yet)."""
        namespace, name = split_key(key)
        imp = self.import_writes.get((namespace, name), self.caches.imports.get(name, namespace))
        if imp is None or (imp.get("metadata") or {}).get("deletionTimestamp"):
            return None
        secret_key = (namespace, api.secret_name_for_import(name))
        secret = self.secret_writes.get(secret_key, self.caches.secrets.get(secret_key[1], namespace))
        spec = imp.get("spec") if isinstance(imp.get("spec"), dict) else {}
        cluster = spec.get("clusterName")
        source = self.sources.get(cluster) if isinstance(cluster, str) else None
        with self._lock:
            held = self._held.get(key)
        federated, federated_error, trust = None, None, None
        if self.federated is not None and spec.get("tokenType") == TOKEN_TYPE_FEDERATED and isinstance(cluster, str):
            federated, federated_error = self.federated.get(cluster)
        if federated is not None and self.trust_checks is not None:
            try:
                audience = federated_audience(parse_spec(imp), federated)
            except SpecError:
                audience = federated.audience
            trust = self.trust_checks.cached(federated, audience)
        exempt, export = self._export_of(imp, source)
        if export is WARMING:
            return WARMING
        uid = str((imp.get("metadata") or {}).get("uid") or "")
        unpinned = (
            namespace == self.system_namespace
            and secret is not None
            and is_controlled_by(secret, uid)
            and not is_pinned(secret, imp)
        )
        view = self._source_view(imp, source, federated)
        return Observation(
            imp=imp,
            secret=secret,
            now=self.clock(),
            source=source.remote if source is not None else None,
            known_clusters=tuple(self.sources.names()),
            cluster_error=self.sources.error_for(cluster) if source is None and isinstance(cluster, str) else None,
            held=held,
            outputs=self.outputs.observe(namespace, name),
            source_view=view,
            federated=federated,
            federated_error=federated_error,
            known_federated=self.federated.names() if self.federated is not None else (),
            trust=trust,
            export=export,
            export_exempt=exempt,
            credential_unpinned=unpinned,
        )

    def source_unreachable(self, source: str) -> str | None:
        """Why the controller itself cannot reach `source` now (None: it can), from its calls and its export
        watch: what an import's outputs say of the source's health."""
        if self.gates.gate(source).is_open:
            return "the controller's calls to it fail and wait for a probe"
        if self.exports.unreachable(source):
            return "the controller's watch of its exported service accounts gets no answer"
        return None

    def _source_view(self, imp: dict[str, Any], source: SourceCluster | None, federated: Any) -> SourceView | None:
        """What the controller itself knows of the import's source, for its outputs; the source's version is
        asked once per source (and remembered) only when an output of this import wants it."""
        cluster = str((imp.get("spec") or {}).get("clusterName", ""))
        if _is_federated(imp):
            if federated is None:
                return None
            view = SourceView(cluster, federated.server, federated.ca_pem, federated=True)
            fingerprint, client = "", None
        elif source is not None:
            view = SourceView(
                cluster,
                source.server,
                source.ca_pem,
                unreachable=self.source_unreachable(source.name),
                credential_expires_at=source.credential_expires_at,
            )
            fingerprint, client = source.fingerprint, lambda: self.sources.client(source)
        else:
            return None
        if not any(o.wants_source_version and as_section(imp, o.spec_field) is not None for o in OUTPUTS):
            return view
        version, problem = self.versions.get(
            cluster, view.server, view.ca_pem, fingerprint, client, federated=view.federated
        )
        return replace(view, version=version, unreachable=view.unreachable or problem)

    def _export_of(self, imp: dict[str, Any], source: SourceCluster | None) -> tuple[bool, Any]:
        """(exempt, ExportView or None or WARMING) for the import: whether its source exports what it names to it.

        The one import exempt is the controller's own credential: its own account in the source, imported in
        the system namespace (the source's RBAC lets it rotate exactly that token, and nothing else).
        """
        if source is None:
            return False, None
        try:
            spec = parse_spec(imp)
        except SpecError:
            return False, None
        if spec.federated:  # no token is minted for it: the source's RBAC of the pod's own identity decides
            return False, None
        namespace = (imp.get("metadata") or {}).get("namespace")
        if (
            namespace == self.system_namespace
            and spec.namespace == api.SYSTEM_NAMESPACE
            and source.consumer is not None
            and spec.name == api.consumer_service_account(source.consumer)
        ):
            return True, None
        try:
            client = self.sources.client(source)
        except Exception:  # reported by request_token's own attempt, once the export check lets it through
            return False, ExportView(source.consumer, synced=False)
        view, warming = self.exports.view(
            source.remote, source.fingerprint, client, source.consumer, spec.namespace, spec.name
        )
        if warming:
            return False, WARMING
        if view.synced and view.service_account is None and view.exists is None:
            # One list call tells a withdrawn export from a deleted account; remembered until the watch speaks.
            exists = self.exports.probe_exists(source.name, spec.namespace, spec.name)
            view = ExportView(view.consumer, synced=True, exists=exists)
        return False, view

    def request_token(self, key: str, need: NeedsToken, imp: dict[str, Any]) -> HasToken | Blocked | Result:
        """Ask the source for a token, through its gate (fair rate limit and circuit)."""
        cluster = need.source.cluster_name
        source = self.sources.get(cluster)
        if source is None:  # removed meanwhile
            return Blocked(api.REASON_UNKNOWN_CLUSTER, f"Cluster {cluster} was just removed.", spec=need.spec)
        gate = self.gates.gate(cluster)
        namespace, _ = split_key(key)
        admission = gate.admit(key, self.clock(), flow=namespace, lane=REFRESH if need.refresh else FIRST)
        if isinstance(admission, Wait):
            if admission.reason is None:
                # In line for a token: the dispatcher wakes it when its turn comes (the delay is a backstop).
                return Result(requeue_after=QUEUED_BACKSTOP_SECONDS, outcome="throttled")
            # The source is down: wait for its probe, saying why (the same words as the failure that opened it).
            return Blocked(admission.reason, admission.message or "", spec=need.spec, source_failed=True)
        try:
            client = self.sources.client(source)
        except Exception as exc:  # a kubeconfig the client cannot load (exec plugin missing, bad files, ...)
            message = client_error_message(source, exc)
            return Blocked(api.REASON_REMOTE_ERROR, message, retry=True, spec=need.spec)
        try:
            token = self.token_source(
                client,
                need.source,
                need.spec,
                timeout=self.remote_timeout,
                clock=self.clock,
                remote_uid=need.remote_uid,
            )
        except RemoteFailure as failure:
            if failure.source_down:
                self.wake(gate.failed(key, self.clock(), failure.reason, failure.message))
                return Blocked(failure.reason, failure.message, spec=need.spec, source_failed=True)
            self.wake(gate.answered(key))
            return Blocked(failure.reason, failure.message, retry=True, spec=need.spec, source_failed=True)
        self.wake(gate.answered(key))
        self.metrics.tokens_refreshed.inc()
        return HasToken(need.spec, token)

    def act(self, key: str, observation: Observation, writes: Writes) -> Result:
        if not self.may_write():  # lost the lease meanwhile: write nothing, not even an Event
            return Result(outcome="skipped")
        namespace, name = split_key(key)
        if writes.remember is not None:
            with self._lock:
                self._held[key] = share_ca(writes.remember, self._cas)
        if writes.forget:
            with self._lock:
                self._held.pop(key, None)
        imp = (
            pin_credential(self.caches.imports_api, self.import_writes, name, observation, writes)
            if namespace == self.system_namespace
            else None
        )
        if isinstance(imp, Result):
            return imp
        for write in writes.secrets:
            secret_key = kube.object_key(write.body)
            with self.secret_writes.writing(secret_key) as wrote:
                try:
                    if write.create:
                        written = self.caches.secrets_api.create(write.body, namespace)
                    else:
                        written = self.caches.secrets_api.replace(write.body, namespace)
                except ApiException as exc:
                    if exc.status not in (404, 409):
                        raise
                    # The cache was behind (someone created, edited or deleted it meanwhile): look again soon.
                    self.secret_writes.forget(secret_key)
                    return Result(retry=True, outcome="conflict")
                cached = self.caches.secrets.cache_form(written)
                wrote(share_token(cached, writes.remember.credentials.token) if writes.remember else cached)
        for output_write in writes.outputs:
            if not self.outputs.write(output_write, namespace):
                return Result(retry=True, outcome="conflict")
        if writes.status is not None:
            old = observation.imp.get("status")
            patch = status_patch(old if isinstance(old, dict) else None, writes.status)
            with self.import_writes.writing((namespace, name)) as wrote:
                try:
                    written = self.caches.imports_api.patch_status(name, patch, namespace)
                    wrote(self.caches.imports.cache_form(written))
                except ApiException as exc:
                    if exc.status != 404:  # 404: the import was deleted meanwhile, nothing to report on
                        raise
        for event_type, reason, message in writes.events:
            self.recorder.record(observation.imp, event_type, reason, message)
            if event_type == "Warning" and not writes.retry:
                self.metrics.errors.labels(reason).inc()
        if writes.expires_at is not None:
            self.metrics.set_expiry(key, writes.expires_at)
        if writes.remember is not None and observation.source is not None:
            self._count_demand(key, observation, writes.remember)
        requeue_after = None if writes.requeue_at is None else writes.requeue_at - observation.now
        if writes.retry:
            self.metrics.errors.labels(writes.failure_reason or "Unknown").inc()
            log.info("import %s: %s; retrying with backoff", key, writes.failure_reason)
            return Result(requeue_after=requeue_after, retry=True, outcome="error")
        return Result(requeue_after=requeue_after)


def _is_federated(imp: dict[str, Any]) -> bool:
    spec = imp.get("spec")
    return isinstance(spec, dict) and spec.get("tokenType") == TOKEN_TYPE_FEDERATED
