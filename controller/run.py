"""The import controller, declared: what it reconciles (ServiceAccountImports), what it owns (their Secrets and each
output's object), what it watches besides (source credentials, federated-source records, each source's exported
accounts), and the parts a pass uses; the generic runtime (controller/runtime) runs it.

Decisions are in controller/assess.py and controller/plan.py (pure); one pass per import is in
controller/reconciler.py. Events map to imports through the imports' indexes, never a scan. In the steady state
the controller makes no API call at all."""

from __future__ import annotations

import functools
import logging
import socket
import uuid
from collections.abc import Iterable
from typing import Any

from kubernetes.client import ApiClient

from controller.credentials import SystemCredentials
from controller.export_watches import ExportWatches
from controller.gates import SourceGates, reachability_changes
from controller.metrics import Metrics
from controller.options import Options
from controller.outputs import OUTPUTS
from controller.outputs.watches import OutputWatches
from controller.reconciler import Caches, Reconciler, import_key
from controller.runtime.events import EventRecorder
from controller.runtime.leader import LEASE_NAME
from controller.runtime.manager import Manager, ManagerOptions, Watch
from controller.sources import SourceRegistry
from controller.trust_checks import FederatedSources, TrustChecks, parse_service_account
from kubemcsa.client import connect, kube
from kubemcsa.client.informer import Compactor, Informer
from kubemcsa.contract import api, federation
from kubemcsa.contract.federation import FederatedSource
from kubemcsa.contract.imports import cache_form_of_import, cache_form_of_secret

log = logging.getLogger(__name__)


COMPONENT = "service-account-import-controller"


# The imports' indexes: by source cluster, and by the remote service account they name.
BY_CLUSTER = "cluster"


BY_REMOTE = "remote"


def _nobody() -> None:
    """The wake-up of a Secret no import owns."""


def _spec(imp: dict[str, Any]) -> dict[str, Any]:
    spec = imp.get("spec")
    return spec if isinstance(spec, dict) else {}


# Keys of the reachability bookkeeping: a token source and a federated source may share a name.
TOKEN_SOURCE, FEDERATED_SOURCE = "token", "federated"


def _cluster_of(imp: dict[str, Any]) -> list[str]:
    return [_spec(imp).get("clusterName")]


def _remote_of(imp: dict[str, Any]) -> list[str]:
    spec = _spec(imp)
    return [f"{spec.get('clusterName')}/{spec.get('namespace')}/{spec.get('name')}"]


class Controller:
    def __init__(self, local_api_client: ApiClient, options: Options | None = None) -> None:
        self.options = options = options or Options()
        self.identity = options.identity or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
        self._started_at = options.clock()
        self._credentials_loaded = False
        # (TOKEN_SOURCE or FEDERATED_SOURCE, name) of the sources the controller could not reach at its last look
        self._unreachable: set[tuple[str, str]] = set()
        self._reachability_told_at: dict[tuple[str, str], float] = {}
        # The federated sources the last probe asked (those with imports): what reachability reads each tick,
        # instead of parsing every record and listing its imports that often.
        self._probed_federated: frozenset[str] = frozenset()
        self.metrics = Metrics()
        self.sources = SourceRegistry(
            source_kubeconfig=options.source_kubeconfig,
            imports_dir=options.imports_dir,
            cluster_name=options.cluster_name,
            connections=options.workers + 2,
        )
        self.exports = ExportWatches(
            on_event=self._on_export, on_synced=self._on_exports_synced, remote_timeout=options.remote_timeout
        )
        self.manager = self._manager(local_api_client)
        self._declare_informers(local_api_client)
        # Every worker and every watch at once (the optional outputs' included), and the leader election's calls.
        connect.with_room_for(local_api_client, options.workers + len(self.manager.informers) + len(OUTPUTS) + 2)
        self.trust_checks = TrustChecks(
            local_api_client,
            check_identity=parse_service_account(
                options.trust_check_service_account or f"{options.system_namespace}/{api.TRUST_CHECK_SERVICE_ACCOUNT}"
            ),
            trusted_seconds=options.trusted_recheck_seconds,
            untrusted_seconds=options.untrusted_recheck_seconds,
            timeout=options.remote_timeout,
            clock=options.clock,
        )
        self.gates = SourceGates(
            qps=options.source_qps,
            burst=options.source_burst,
            probe_base=options.backoff_base,
            probe_max=options.backoff_max,
            probe_timeout=2 * options.remote_timeout + 1,
            clock=options.clock,
        )
        self.reconciler = self._reconciler(local_api_client)
        self.credentials = SystemCredentials(
            self.sources,
            system_namespace=options.system_namespace,
            imports=self.system_imports or self.imports,
            secrets=self.system_secrets or self.secrets,
            import_writes=self.reconciler.import_writes,
            record=self._record,
            requeue_clusters=self._requeue_clusters,
            grace_seconds=options.credential_grace_seconds,
            clock=options.clock,
        )

    # --- what it is made of ---
    def _manager(self, local_api_client: ApiClient) -> Manager:
        options = self.options
        return Manager(
            local_api_client,
            ManagerOptions(
                lease_name=LEASE_NAME,
                lease_namespace=options.system_namespace,
                identity=self.identity,
                leader_election=options.leader_election,
                lease_duration=options.lease_duration,
                renew_deadline=options.renew_deadline,
                retry_period=options.retry_period,
                workers=options.workers,
                health_port=options.metrics_port,
                backoff_base=options.backoff_base,
                backoff_max=options.backoff_max,
            ),
            self._reconcile,
            all_keys=self._all_keys,
            exposition=self.metrics.exposition,
            observe=self._observe,
            on_leading=lambda leading: self.metrics.is_leader.set(1 if leading else 0),
            ready_to_work=self._sources_loaded,
        )

    def _declare_informers(self, local_api_client: ApiClient) -> None:
        """For: the imports; owns: their Secrets and each output's object; watches: the system namespace's imports
        and Secrets (source credentials) where --namespace leaves them out, and the federated-source records."""
        options, add = self.options, self.manager.add_informer
        imports_api = kube.Resource(local_api_client, kube.SERVICE_ACCOUNT_IMPORTS)
        secrets_api = kube.Resource(local_api_client, kube.SECRETS)
        compact = Compactor()  # one per controller: the imports' and their Secrets' caches share their text

        def compact_import(imp: dict[str, Any]) -> dict[str, Any]:
            # The echo of the controller's own write is the object it already holds in cache form. (The reconciler
            # is made after the informers are declared, before they start.)
            return self.reconciler.import_writes.as_written(kube.object_key(imp), imp) or compact(
                cache_form_of_import(imp)
            )

        self.imports = add(
            Informer(
                imports_api,
                namespace=options.namespace,
                resync_seconds=options.resync_seconds,
                name="serviceaccountimports",
                transform=compact_import,
            )
        )
        self.imports.add_index(BY_CLUSTER, _cluster_of)
        self.imports.add_index(BY_REMOTE, _remote_of)
        labelled = {"label_selector": api.IMPORT_LABEL, "transform": compact}
        system_namespace = options.system_namespace

        def compact_secret(secret: dict[str, Any]) -> dict[str, Any]:
            return self.reconciler.secret_writes.as_written(kube.object_key(secret), secret) or compact(
                cache_form_of_secret(secret, system_namespace)
            )

        self.secrets = add(
            Informer(
                secrets_api,
                namespace=options.namespace,
                name="secrets",
                label_selector=api.IMPORT_LABEL,
                transform=compact_secret,
            )
        )
        self.outputs = OutputWatches(
            local_api_client,
            namespace=options.namespace,
            add_informer=add,
            recheck_seconds=options.output_recheck_seconds,
            timeout=options.remote_timeout,
            clock=options.clock,
        )
        self.output_caches = self.outputs.caches
        self.system_imports: Informer | None = None
        self.system_secrets: Informer | None = None
        if options.namespace is not None and options.namespace != options.system_namespace:
            system = options.system_namespace
            self.system_imports = add(Informer(imports_api, namespace=system, name="system-imports"))
            self.system_secrets = add(Informer(secrets_api, namespace=system, name="system-secrets", **labelled))
        self.federated_sources = add(
            Informer(
                kube.Resource(local_api_client, kube.CONFIG_MAPS),
                namespace=options.system_namespace,
                label_selector=f"{federation.FEDERATED_SOURCE_LABEL}={federation.FEDERATED_SOURCE_LABEL_VALUE}",
                name="federated-sources",
            )
        )

    def _reconciler(self, local_api_client: ApiClient) -> Reconciler:
        options = self.options
        imports_api = kube.Resource(local_api_client, kube.SERVICE_ACCOUNT_IMPORTS)
        secrets_api = kube.Resource(local_api_client, kube.SECRETS)
        return Reconciler(
            Caches(self.imports, self.secrets, imports_api, secrets_api, outputs=self.output_caches),
            self.sources,
            EventRecorder(local_api_client, COMPONENT, self.identity, clock=options.clock),
            self.metrics,
            gates=self.gates,
            wake=self._wake,
            may_write=lambda: self.manager.is_leader and not self.manager.stopping,
            remote_timeout=options.remote_timeout,
            exports=self.exports,
            system_namespace=options.system_namespace,
            clock=options.clock,
            federated=FederatedSources(self.federated_sources),
            trust_checks=self.trust_checks,
        )

    def watches(self) -> list[Watch]:
        """Every informer event the controller acts on, and how."""
        declared = [
            Watch(self.imports, self._on_import),
            Watch(self.secrets, self._on_secret),
            Watch(self.federated_sources, self._on_federated_source),
        ]
        if self.system_secrets is not None:
            declared.append(Watch(self.system_secrets, self.credentials.on_secret))
        if self.system_imports is not None:
            declared.append(Watch(self.system_imports, self.credentials.on_import))
        return declared

    # --- lifecycle ---
    def _sources_loaded(self) -> bool:
        """Called once the caches synced, until True: every declared source is loaded, so no import of a source
        that is there reads UnknownCluster because the controller had not read it yet.

        The system namespace's credentials are loaded again from the synced caches (their handlers ran while the
        imports that make a Secret a credential were perhaps still being listed), and the source kubeconfig must
        have been read whole (it may be written after the controller starts), within source_load_timeout.
        """
        if not self._credentials_loaded:
            self.credentials.load_all()
            self._credentials_loaded = True
        if not self.sources.files_loaded():
            self._requeue_clusters(self.sources.refresh_files())
        if self.sources.files_loaded():
            return True
        if self.options.clock() < self._started_at + self.options.source_load_timeout:
            return False
        log.warning(
            "source kubeconfig %s still unread after %.0f s; starting without it (it is read once it is there)",
            self.options.source_kubeconfig,
            self.options.source_load_timeout,
        )
        return True

    def start(self) -> Controller:
        self._started_at = self.options.clock()
        self._credentials_loaded = False
        self.sources.refresh_files()
        self._watch_exports(set(self.sources.names()))
        for watch in self.watches():
            watch.informer.add_handler(watch.handler)
        self.outputs.route(
            self.imports, self.reconciler.output_seen, lambda ns, name: self._wake([import_key(ns, name)])
        )
        self.manager.run_every(self.options.file_poll_seconds, self._poll_files, "source-file-poller")
        self.manager.run_every(self.options.file_poll_seconds, self.outputs.poll, "output-watch-poller")
        # Open circuits are probed on time; a tick finer than the shortest probe backoff.
        tick = max(0.05, min(1.0, self.options.backoff_base))
        self.manager.run_every(tick, lambda: self._wake(self.gates.due_probes()), "source-prober")
        self.manager.run_every(tick, self._poll_reachability, "source-reachability")
        self.manager.run_every(self.options.federated_probe_seconds, self._probe_federated, "federated-prober")
        self.manager.spawn(self._dispatch_tokens, "source-dispatcher")
        self.manager.start()
        self.outputs.start_optional()
        log.info("controller %s started (namespace: %s)", self.identity, self.options.namespace or "all")
        return self

    def _poll_reachability(self) -> None:
        """The imports of a source that turned unreachable, or reachable again, look again: their outputs say it
        (a ClusterProfile's ControlPlaneHealthy) at once, not at the next refresh or resync; once per change, and
        at most once per reachability_hold_seconds for each source. A federated source is told apart from a
        token source of the same name: their imports learn its health from different calls."""
        now = self.options.clock()
        names = set(self.sources.names())
        federated, versions = self._probed_federated, self.reconciler.versions
        down = {name for name in names if self.reconciler.source_unreachable(name) is not None}
        federated_down = {name for name in federated if versions.problem(name, federated=True) is not None}
        self.metrics.set_reachability(down | federated_down, names | federated)
        known = {(TOKEN_SOURCE, name) for name in names} | {(FEDERATED_SOURCE, name) for name in federated}
        unreachable = {(TOKEN_SOURCE, name) for name in down} | {(FEDERATED_SOURCE, name) for name in federated_down}
        told = self._unreachable & known
        changes = reachability_changes(
            unreachable, told, self._reachability_told_at, now, self.options.reachability_hold_seconds
        )
        self._unreachable = told ^ changes
        for key in sorted(changes):
            self._reachability_told_at[key] = now
            self._wake(import_key(*kube.object_key(imp)) for imp in self.imports.by_index(BY_CLUSTER, key[1]))

    def _federated_in_use(self) -> list[FederatedSource]:
        """The federated sources that have imports (a record alone is not probed)."""
        records, found = self.reconciler.federated, []
        for name in records.names() if records is not None else ():
            source, _ = records.get(name)
            if source is not None and self.imports.by_index(BY_CLUSTER, name):
                found.append(source)
        return found

    def _probe_federated(self) -> None:
        """Each federated source with imports is asked its /version, without credentials, one call per source per
        period whatever its number of imports; _poll_reachability tells its imports when the answer changes. Only
        the leader asks: a standby reconciles nothing the answer could reach (the manifests run two replicas)."""
        if not self.manager.is_leader:
            self._probed_federated = frozenset()
            return
        versions, max_age = self.reconciler.versions, self.options.federated_probe_seconds / 2
        in_use = self._federated_in_use()
        for source in in_use:
            # Half the period: an answer a reconcile got a moment ago stands; one from the last tick does not.
            versions.get(source.cluster_name, source.server, source.ca_pem, "", None, federated=True, max_age=max_age)
        self._probed_federated = frozenset(source.cluster_name for source in in_use)

    def _dispatch_tokens(self) -> None:
        """Each source's rate-limit tokens, as they come, to the imports next in line (gates.FairQueue)."""
        while not self.manager.stopping:
            try:
                keys, next_at = self.gates.dispatch()
                self._wake(keys)
            except Exception:  # a bug must not stop every token request: log it, try again
                log.exception("source-dispatcher failed")
                next_at = None
            wait = 0.5 if next_at is None else min(0.5, max(0.0, next_at - self.options.clock()))
            self.gates.wait_for_work(wait)

    def stop(self) -> None:
        self.manager.stop()
        self.exports.stop()
        log.info("controller %s stopped", self.identity)

    def __enter__(self) -> Controller:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_until_ready(self, timeout: float) -> bool:
        """True once every cache has synced and the workers run."""
        return self.manager.wait_until_synced(timeout)

    @property
    def fatal(self) -> str | None:
        """Why the controller cannot run (set at most once; the process should exit saying it)."""
        return self.manager.fatal

    @property
    def is_leader(self) -> bool:
        return self.manager.is_leader

    @property
    def elector(self) -> Any:
        return self.manager.elector

    @property
    def queue(self) -> Any:
        return self.manager.queue

    # --- the work ---
    def _reconcile(self, key: str) -> Any:
        return self.reconciler.reconcile(key)

    def _observe(self, outcome: str, seconds: float) -> None:
        self.metrics.reconciles.labels(outcome).inc()
        if outcome != "error":
            self.metrics.latency.observe(seconds)

    def _all_keys(self) -> list[str]:
        return [import_key(*kube.object_key(imp)) for imp in self.imports.list()]

    # --- event handlers (informer threads: quick) ---
    def _on_import(self, event: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        key = import_key(*kube.object_key(obj))
        if kube.object_key(obj)[0] == self.options.system_namespace and self.system_imports is None:
            self.credentials.on_import(event, obj, old)
        if event == "DELETED":
            self.reconciler.import_deleted(key)
            self.manager.queue.forget(key)
            return
        self.reconciler.import_seen(obj, functools.partial(self.manager.queue.add, key))

    def _on_secret(self, event: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        namespace, _ = kube.object_key(obj)
        if namespace == self.options.system_namespace:
            self.credentials.on_secret(event, obj, old)
        import_name = ((obj.get("metadata") or {}).get("labels") or {}).get(api.IMPORT_LABEL)
        wake = functools.partial(self.manager.queue.add, import_key(namespace, import_name)) if import_name else _nobody
        self.reconciler.secret_seen(obj, wake, deleted=event == "DELETED")

    def _on_federated_source(self, event: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        """A federated source was recorded, changed or removed: its imports look again, and ask it afresh."""
        names = set()
        for record in (obj, old):
            name = ((record or {}).get("data") or {}).get(federation.KEY_CLUSTER_NAME)
            if isinstance(name, str):
                names.add(name)
                self.trust_checks.forget(name)
        self._requeue_clusters(names)

    def _wake(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.manager.queue.add(key)

    def _watch_exports(self, names: set[str]) -> None:
        """Each source's export watch starts as soon as the source is known, so its first import finds it listed."""
        for name in names:
            source = self.sources.get(name)
            if source is None:
                self.exports.forget(name)
                continue
            try:
                client = self.sources.client(source)
            except Exception as exc:  # an unusable kubeconfig: its imports say so when they try
                log.info("no export watch for cluster %s yet: %s", name, type(exc).__name__)
                continue
            self.exports.ensure(name, source.fingerprint, client)

    def _on_export(self, source: str, namespace: str, name: str) -> None:
        """The source's export watch saw namespace/name change: the imports of it look again."""
        self._wake(
            import_key(*kube.object_key(imp))
            for imp in self.imports.by_index(BY_REMOTE, f"{source}/{namespace}/{name}")
        )

    def _on_exports_synced(self, source: str) -> None:
        self._wake(import_key(*kube.object_key(imp)) for imp in self.imports.by_index(BY_CLUSTER, source))

    def _requeue_clusters(self, names: set[str]) -> None:
        if not names:
            return
        log.info("credentials or records changed for cluster(s) %s", ", ".join(sorted(names)))
        for name in names:
            self._wake(self.gates.reset(name))
        self._watch_exports(names)
        for name in names:
            for imp in self.imports.by_index(BY_CLUSTER, name):
                key = import_key(*kube.object_key(imp))
                self.manager.queue.forget(key)
                self.manager.queue.add(key)

    def _record(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        if self.manager.is_leader:
            self.reconciler.recorder.record(obj, type_, reason, message)

    def _poll_files(self) -> None:
        self._requeue_clusters(self.sources.refresh_files())
        self.credentials.report_unpinned()
