"""The import controller, wired together: informers and their event handlers, the source clusters, the
reconciler, and the generic runtime (work queue, workers, leader election, health and metrics).

Decisions are in controller/assess.py (pure); one pass per import is in controller/reconciler.py. In the
steady state the controller makes no API call at all.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from controller.export_watches import ExportWatches
from controller.gates import DEFAULT_BURST, DEFAULT_QPS, SourceGates
from controller.metrics import Metrics
from controller.outputs import OUTPUTS
from controller.outputs.base import Output, as_section
from controller.outputs.store import OutputCache
from controller.reconciler import Caches, Reconciler, import_key
from controller.runtime.events import EventRecorder
from controller.runtime.leader import LEASE_NAME
from controller.runtime.manager import Manager, ManagerOptions
from controller.sources import SourceRegistry, is_source_credential
from controller.trust_checks import FederatedSources, TrustChecks, parse_service_account
from kubemcsa.client import kube
from kubemcsa.client.informer import Compactor, EventHandler, Informer
from kubemcsa.contract import api, federation
from kubemcsa.contract.imports import STATUS_PINS, is_pinned

log = logging.getLogger(__name__)

COMPONENT = "service-account-import-controller"


@dataclass(frozen=True)
class Options:
    """How a Controller runs; every field has the default of `kubemcsa-controller`."""

    source_kubeconfig: str | None = None  # contexts are source clusters (context name = cluster name)
    imports_dir: str | None = None  # service-account imports mounted as source clusters
    cluster_name: str | None = None  # this cluster's name in kubeconfig-defined sources (what owners export to)
    namespace: str | None = None  # watch only this namespace (None: all)
    system_namespace: str = api.SYSTEM_NAMESPACE  # the Lease, and import Secrets that are source credentials
    leader_election: bool = True
    identity: str | None = None
    metrics_port: int | None = None
    resync_seconds: float = 600
    workers: int = 4
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    remote_timeout: float = 10.0
    file_poll_seconds: float = 2.0
    backoff_base: float = 0.5  # per-import retries and source probes: base * 2^n with jitter, up to backoff_max
    backoff_max: float = 300.0
    # Workers wait for every declared source (the source kubeconfig, the system namespace's credentials) to be
    # loaded, at most this long (then a missing --source-kubeconfig is reported by each of its imports).
    source_load_timeout: float = 60.0
    source_qps: float = DEFAULT_QPS  # token requests per second to each source cluster, at most
    source_burst: int = DEFAULT_BURST
    # Federated imports: the service account whose token checks a source's trust ("namespace/name"; default:
    # multicluster-service-account-trust-check of the system namespace, bound to nothing; never the controller's
    # own identity), and how long a source's answer stands before it is asked again.
    trust_check_service_account: str | None = None
    trusted_recheck_seconds: float = 600.0
    untrusted_recheck_seconds: float = 15.0
    # A credential Secret that matches no pin is never used; it is reported (Event, condition) once it still does
    # after this long, since its import's new pin may come through the imports' watch a moment after the Secret.
    credential_grace_seconds: float = 2.0
    # An optional output whose type is not served (its CRD not installed): how often discovery is asked again,
    # only while an import asks for that output.
    output_recheck_seconds: float = 60.0
    clock: Callable[[], float] = field(default=time.time, compare=False)


class Controller:
    def __init__(self, local_api_client: ApiClient, options: Options | None = None) -> None:
        self.options = options = options or Options()
        self.identity = options.identity or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
        self._started_at = options.clock()
        self._credentials_loaded = False
        self.metrics = Metrics()
        self.sources = SourceRegistry(
            source_kubeconfig=options.source_kubeconfig,
            imports_dir=options.imports_dir,
            cluster_name=options.cluster_name,
        )
        # Credential Secrets of the system namespace that matched no pin: import name -> (when, that Secret), and
        # the (uid, resourceVersion) last reported, so that each one is reported once.
        self._unpinned: dict[str, tuple[float, dict[str, Any]]] = {}
        self._reported: dict[str, tuple[str, str]] = {}
        self.exports = ExportWatches(
            on_event=self._on_export, on_synced=self._on_exports_synced, remote_timeout=options.remote_timeout
        )
        imports_api = kube.Resource(local_api_client, kube.SERVICE_ACCOUNT_IMPORTS)
        # One per controller: the imports' and their Secrets' caches share their text (see Compactor).
        compact = Compactor()
        secrets_api = kube.Resource(local_api_client, kube.SECRETS)
        self.manager = Manager(
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
        self.imports = self.manager.add_informer(
            Informer(
                imports_api,
                namespace=options.namespace,
                resync_seconds=options.resync_seconds,
                name="serviceaccountimports",
                transform=compact,
            )
        )
        self.secrets = self.manager.add_informer(
            Informer(
                secrets_api,
                namespace=options.namespace,
                label_selector=api.IMPORT_LABEL,
                name="secrets",
                transform=compact,
            )
        )
        # Each output's watch (controller/outputs). An optional one (a CRD that may not be installed) does not hold
        # the workers back, and starts only once discovery says its type is served: asked at start, then at most
        # once a minute (output_recheck_seconds) while an import asks for that output, so that a cluster without
        # the CRD sees no other call for it.
        self.output_caches: dict[str, OutputCache] = {}
        for output in OUTPUTS:
            owned = kube.ResourceType(output.owns.api_version, output.owns.plural, output.owns.kind)
            resource = kube.Resource(local_api_client, owned)
            informer = Informer(
                resource,
                namespace=options.namespace,
                label_selector=output.watch.label_selector,
                name=output.watch.name,
            )
            if not output.watch.optional:
                self.manager.add_informer(informer)
            self.output_caches[output.name] = OutputCache(informer, resource)
        self._local_client = local_api_client
        self._served_checked_at: dict[str, float] = {}
        self._outputs_listed: set[str] = set()
        # The system namespace's import Secrets are sources; watch them too if --namespace leaves them out.
        self.system_secrets: Informer | None = None
        # And the system namespace's imports, which say which of those Secrets are credentials they control.
        self.system_imports: Informer | None = None
        if options.namespace is not None and options.namespace != options.system_namespace:
            self.system_imports = self.manager.add_informer(
                Informer(imports_api, namespace=options.system_namespace, name="system-imports")
            )
            self.system_secrets = self.manager.add_informer(
                Informer(
                    secrets_api,
                    namespace=options.system_namespace,
                    label_selector=api.IMPORT_LABEL,
                    name="system-secrets",
                )
            )
        # Federated source clusters: ConfigMaps of the system namespace that `kubemcsa federate` writes.
        self.federated_sources = self.manager.add_informer(
            Informer(
                kube.Resource(local_api_client, kube.CONFIG_MAPS),
                namespace=options.system_namespace,
                label_selector=f"{federation.FEDERATED_SOURCE_LABEL}={federation.FEDERATED_SOURCE_LABEL_VALUE}",
                name="federated-sources",
            )
        )
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
        self.reconciler = Reconciler(
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

    # --- lifecycle ---
    def _sources_loaded(self) -> bool:
        """Called once the caches synced, until True: every declared source is loaded, so no import of a source
        that is there reads UnknownCluster because the controller had not read it yet.

        The system namespace's credentials are loaded again from the synced caches (their handlers ran while the
        imports that make a Secret a credential were perhaps still being listed), and the source kubeconfig must
        have been read whole (it may be written after the controller starts), within source_load_timeout.
        """
        if not self._credentials_loaded:
            self._load_system_credentials()
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

    def _load_system_credentials(self) -> None:
        """Each labelled Secret of the system namespace, judged against the synced imports."""
        informer = self.system_secrets or self.secrets
        for secret in informer.list():
            if kube.object_key(secret)[0] == self.options.system_namespace:
                self._on_system_secret("MODIFIED", secret, None)

    def start(self) -> Controller:
        self._started_at = self.options.clock()
        self._credentials_loaded = False
        self.sources.refresh_files()
        self._watch_exports(set(self.sources.names()))
        self.imports.add_handler(self._on_import)
        self.secrets.add_handler(self._on_secret)
        for output in OUTPUTS:
            self.output_caches[output.name].informer.add_handler(self._output_handler(output))
        self.federated_sources.add_handler(self._on_federated_source)
        if self.system_secrets is not None:
            self.system_secrets.add_handler(self._on_system_secret)
        if self.system_imports is not None:
            self.system_imports.add_handler(self._on_system_import)
        self.manager.run_every(self.options.file_poll_seconds, self._poll_files, "source-file-poller")
        self.manager.run_every(self.options.file_poll_seconds, self._poll_outputs, "output-watch-poller")
        # Open circuits are probed on time; a tick finer than the shortest probe backoff.
        tick = max(0.05, min(1.0, self.options.backoff_base))
        self.manager.run_every(tick, lambda: self._wake(self.gates.due_probes()), "source-prober")
        self.manager.spawn(self._dispatch_tokens, "source-dispatcher")
        self.manager.start()
        for output in OUTPUTS:
            if output.watch.optional:
                self._start_if_served(output)
        log.info("controller %s started (namespace: %s)", self.identity, self.options.namespace or "all")
        return self

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
            self._on_system_import(event, obj, old)
        if event == "DELETED":
            self.reconciler.import_deleted(key)
            self.manager.queue.forget(key)
            return
        self.reconciler.import_seen(obj)
        self.manager.queue.add(key)

    def _on_system_import(self, event: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        """An import of the system namespace came or went: its Secret becomes (or stops being) a credential."""
        namespace, name = kube.object_key(obj)
        secret = (self.system_secrets or self.secrets).get(api.secret_name_for_import(name), namespace)
        if secret is not None:
            self._on_system_secret("DELETED" if event == "DELETED" else "MODIFIED", secret, None)

    def _on_secret(self, event: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        namespace, _ = kube.object_key(obj)
        if namespace == self.options.system_namespace:
            self._on_system_secret(event, obj, old)
        self.reconciler.secret_seen(obj, deleted=event == "DELETED")
        import_name = ((obj.get("metadata") or {}).get("labels") or {}).get(api.IMPORT_LABEL)
        if import_name:
            self.manager.queue.add(import_key(namespace, import_name))

    def _output_handler(self, output: Output) -> EventHandler:
        def on_event(event: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
            """An output's object changed (ours, or a foreign one of a name an import uses): that import looks
            again."""
            self.reconciler.output_seen(output.name, obj, deleted=event == "DELETED")
            namespace, _ = kube.object_key(obj)
            import_name = output.watch.import_for(obj)
            if import_name and self.imports.get(import_name, namespace) is not None:
                self.manager.queue.add(import_key(namespace, import_name))

        return on_event

    def _poll_outputs(self) -> None:
        """An optional watch whose type is not served yet: look again (at most once a minute) while an import asks
        for that output; once it lists, those imports look again (they said why it was off, and an empty list has
        no events to say it is on)."""
        for output in OUTPUTS:
            cache = self.output_caches[output.name]
            if not output.watch.optional or output.name in self._outputs_listed:
                continue
            asking = [imp for imp in self.imports.list() if as_section(imp, output.spec_field) is not None]
            checked = self._served_checked_at.get(output.name, 0.0)
            if not cache.served and asking and self.options.clock() >= checked + self.options.output_recheck_seconds:
                self._start_if_served(output)
            if cache.informer.has_synced:
                self._outputs_listed.add(output.name)
                for imp in asking:
                    self.manager.queue.add(import_key(*kube.object_key(imp)))

    def _start_if_served(self, output: Output) -> None:
        """Start an optional output's informer if discovery lists its type (a failed look counts as served: the
        informer then says what is wrong)."""
        cache = self.output_caches[output.name]
        self._served_checked_at[output.name] = self.options.clock()
        path = kube.ResourceType(output.owns.api_version, output.owns.plural, output.owns.kind).path()
        try:
            listing = kube.get_path(self._local_client, path.rsplit("/", 1)[0], timeout=self.options.remote_timeout)
            cache.served = any(r.get("name") == output.owns.plural for r in listing.get("resources") or [])
        except ApiException as exc:
            cache.served = exc.status != 404
        except kube.CONNECTION_ERRORS:
            cache.served = True
        if cache.served:
            self.manager.add_informer(cache.informer, required=False)
            cache.informer.start()
        else:
            log.info("%s are not served here: the %s output is off until they are", output.owns.plural, output.name)

    def _on_federated_source(self, event: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        """A federated source was recorded, changed or removed: its imports look again, and ask it afresh."""
        names = set()
        for record in (obj, old):
            name = ((record or {}).get("data") or {}).get(federation.KEY_CLUSTER_NAME)
            if isinstance(name, str):
                names.add(name)
                self.trust_checks.forget(name)
        self._requeue_clusters(names)

    def _system_import(self, name: str) -> dict[str, Any] | None:
        """The import `name` of the system namespace, as last written by this controller or cached."""
        key = (self.options.system_namespace, name)
        return self.reconciler.import_writes.get(key, (self.system_imports or self.imports).get(name, key[0]))

    def _on_system_secret(self, event: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        """A Secret of the system namespace is a source credential only if an import there controls it and its
        writer (this controller, or kubemcsa bootstrap as an admin) pinned it in that import's status: a labelled
        Secret anyone else made or changed adds, replaces and removes no cluster."""
        label = ((obj.get("metadata") or {}).get("labels") or {}).get(api.IMPORT_LABEL)
        owner = self._system_import(label) if isinstance(label, str) else None
        if event != "DELETED" and is_source_credential(obj, owner, self.options.system_namespace):
            if is_pinned(obj, owner):
                changed = self.sources.set_secret(obj)
            else:  # not used: the credential loaded before, if any, stays; said soon (see _report_unpinned)
                self._unpinned.setdefault(str(label), (self.options.clock(), obj))
                changed = set()
        else:
            changed = self.sources.remove_secret(obj)
        self._requeue_clusters(changed)

    def _report_unpinned(self) -> None:
        """Say, once per Secret version, which credential Secrets were not used because no trusted writer pinned
        them: a Warning Event on the import (no secret in it) and, if the cluster has no credential at all, the
        reason its imports give. Only after a grace period: the import's new pin comes through the imports' watch,
        which may deliver it a moment after the Secrets' watch delivered the Secret it pins."""
        system = self.options.system_namespace
        for name, (since, refused) in list(self._unpinned.items()):
            if self.options.clock() - since < self.options.credential_grace_seconds:
                continue
            self._unpinned.pop(name, None)
            owner = self._system_import(name)
            if owner is None or is_pinned(refused, owner):  # gone, or its pin came in meanwhile
                continue
            meta = refused.get("metadata") or {}
            version = (str(meta.get("uid") or ""), str(meta.get("resourceVersion") or ""))
            if self._reported.get(name) == version:
                continue
            self._reported[name] = version
            where = f"Secret {system}/{meta.get('name')}"
            why = (
                f"{where} was written neither by the controller nor by kubemcsa bootstrap (it matches no pin in "
                f"status.{STATUS_PINS} of import {system}/{name}); if an admin wrote it by hand, re-run kubemcsa "
                f"bootstrap for cluster {name}, else delete it and find who made it in the audit log."
            )
            kept = " The controller keeps the credential it had." if self.sources.get(name) is not None else ""
            log.warning("not using %s as the credential of cluster %s: it matches no pin", where, name)
            if self.manager.is_leader:
                self.reconciler.recorder.record(
                    owner, "Warning", api.REASON_UNTRUSTED_CREDENTIAL, f"Not used as a credential: {why}{kept}"
                )
            current = (self.system_secrets or self.secrets).get(api.secret_name_for_import(name), system)
            if is_source_credential(current or {}, owner, system) and not is_pinned(current, owner):
                self._requeue_clusters(self.sources.refuse_secret(current or {}, why))

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
        for imp in self.imports.list():
            spec = imp.get("spec") if isinstance(imp.get("spec"), dict) else {}
            if (spec.get("clusterName"), spec.get("namespace"), spec.get("name")) == (source, namespace, name):
                self.manager.queue.add(import_key(*kube.object_key(imp)))

    def _on_exports_synced(self, source: str) -> None:
        for imp in self.imports.list():
            spec = imp.get("spec") if isinstance(imp.get("spec"), dict) else {}
            if spec.get("clusterName") == source:
                self.manager.queue.add(import_key(*kube.object_key(imp)))

    def _requeue_clusters(self, names: set[str]) -> None:
        if not names:
            return
        log.info("credentials or records changed for cluster(s) %s", ", ".join(sorted(names)))
        for name in names:
            self._wake(self.gates.reset(name))
        self._watch_exports(names)
        for imp in self.imports.list():
            spec = imp.get("spec") if isinstance(imp.get("spec"), dict) else {}
            if spec.get("clusterName") in names:
                key = import_key(*kube.object_key(imp))
                self.manager.queue.forget(key)
                self.manager.queue.add(key)

    def _poll_files(self) -> None:
        self._requeue_clusters(self.sources.refresh_files())
        self._report_unpinned()
