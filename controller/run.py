"""The import controller: caches, work queue, workers, sources, leader election, metrics, wired together.

Decisions come from controller.reconcile (pure); this module only reads caches, makes the API calls a
decision asks for, and schedules the next look. In the steady state it makes no API call at all.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from controller import reconcile as rc
from controller.leader import LeaderElector
from controller.metrics import HealthServer, Metrics
from controller.queue import WorkQueue
from controller.sources import SourceCluster, SourceRegistry, client_error_message
from controller.spec import ImportSpec
from kubemcsa import api, kube
from kubemcsa.timefmt import format_time

log = logging.getLogger(__name__)

COMPONENT = "service-account-import-controller"
LEGACY_SECRET_TYPE = "kubernetes.io/service-account-token"
LEGACY_SA_ANNOTATION = "kubernetes.io/service-account.name"


class TokenFailure(Exception):
    def __init__(self, failure: rc.RemoteFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


def _key(namespace: str | None, name: str) -> str:
    return f"{namespace or ''}/{name}"


def _split(key: str) -> tuple[str, str]:
    namespace, _, name = key.partition("/")
    return namespace, name


def _rv(obj: dict[str, Any] | None) -> int:
    try:
        return int((obj or {}).get("metadata", {}).get("resourceVersion", -1))
    except (TypeError, ValueError):
        return -1


def _newest(cached: dict[str, Any] | None, written: dict[str, Any] | None) -> dict[str, Any] | None:
    """The cache's object, unless what this controller wrote last is newer (the watch has not caught up)."""
    if written is None:
        return cached
    if cached is None or _rv(cached) < _rv(written):
        return written
    return cached


def legacy_secret_name(sa_name: str) -> str:
    """The remote Secret the controller creates for a legacy token: `<sa>-kubemcsa-token`, within 253 chars."""
    suffix = "-kubemcsa-token"
    return sa_name[: 253 - len(suffix)].rstrip(".-") + suffix


class Controller:
    def __init__(
        self,
        local_api_client: ApiClient,
        *,
        source_kubeconfig: str | None = None,
        imports_dir: str | None = None,
        namespace: str | None = None,
        system_namespace: str = api.SYSTEM_NAMESPACE,
        leader_election: bool = True,
        identity: str | None = None,
        metrics_port: int | None = None,
        resync_seconds: float = 600,
        workers: int = 4,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        remote_timeout: float = 10.0,
        file_poll_seconds: float = 2.0,
        backoff_base: float = 0.5,
        backoff_max: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.local = local_api_client
        self.namespace = namespace
        self.system_namespace = system_namespace
        self.identity = identity or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
        self.remote_timeout = remote_timeout
        self.file_poll_seconds = file_poll_seconds
        self._clock = clock
        self._n_workers = workers
        self.metrics = Metrics()
        self.sources = SourceRegistry(source_kubeconfig=source_kubeconfig, imports_dir=imports_dir)
        self.queue = WorkQueue(base_delay=backoff_base, max_delay=backoff_max)
        self._imports_api = kube.Resource(local_api_client, kube.SERVICE_ACCOUNT_IMPORTS)
        self._secrets_api = kube.Resource(local_api_client, kube.SECRETS)
        self._events_api = kube.Resource(local_api_client, kube.EVENTS)
        self.imports = kube.Informer(
            self._imports_api, namespace=namespace, resync_seconds=resync_seconds, name="serviceaccountimports"
        )
        self.secrets = kube.Informer(
            self._secrets_api, namespace=namespace, label_selector=api.IMPORT_LABEL, name="import-secrets"
        )
        # The system namespace's import Secrets are sources; watch them too if --namespace leaves them out.
        self.system_secrets: kube.Informer | None = None
        if namespace is not None and namespace != system_namespace:
            self.system_secrets = kube.Informer(
                self._secrets_api, namespace=system_namespace, label_selector=api.IMPORT_LABEL, name="system-secrets"
            )
        self.elector: LeaderElector | None = None
        if leader_election:
            self.elector = LeaderElector(
                local_api_client,
                system_namespace,
                self.identity,
                lease_duration=lease_duration,
                renew_deadline=renew_deadline,
                retry_period=retry_period,
                on_started_leading=self._on_started_leading,
                on_stopped_leading=lambda: self.metrics.is_leader.set(0),
            )
        self._metrics_port = metrics_port
        self.health_server: HealthServer | None = None
        self._lock = threading.Lock()
        self._issued: dict[str, rc.IssuedToken] = {}
        self._written_imports: dict[str, dict[str, Any]] = {}
        self._written_secrets: dict[str, dict[str, Any]] = {}
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._started = False

    # --- lifecycle ---
    def start(self) -> Controller:
        self.sources.refresh_files()
        self.imports.add_handler(self._on_import)
        self.secrets.add_handler(self._on_secret)
        if self.system_secrets is not None:
            self.system_secrets.add_handler(self._on_system_secret)
        for informer in self._informers():
            informer.start()
        for i in range(self._n_workers):
            self._spawn(self._work, f"controller-worker-{i}")
        self._spawn(self._poll_files, "controller-file-poller")
        if self.elector is not None:
            self.elector.start()
        else:
            self.metrics.is_leader.set(1)
        if self._metrics_port is not None:
            self.health_server = HealthServer(self.metrics, self._metrics_port, self.healthy, self.ready).start()
        self._started = True
        log.info("controller %s started (namespace: %s)", self.identity, self.namespace or "all")
        return self

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _informers(self) -> list[kube.Informer]:
        return [i for i in (self.imports, self.secrets, self.system_secrets) if i is not None]

    def stop(self) -> None:
        """Stop within a few seconds: release the lease first so that a successor takes over at once."""
        self._stopping.set()
        if self.elector is not None:
            self.elector.stop(release=True)
        self.queue.shutdown()
        for informer in self._informers():
            informer.stop(timeout=2)
        for thread in self._threads:
            thread.join(max(0.1, self.remote_timeout))
        if self.health_server is not None:
            self.health_server.stop()
        log.info("controller %s stopped", self.identity)

    def __enter__(self) -> Controller:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def ready(self) -> bool:
        return self._started and all(i.has_synced for i in self._informers())

    def healthy(self) -> bool:
        return self._started and not self._stopping.is_set() and all(t.is_alive() for t in self._threads)

    def wait_until_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(i.wait_for_sync(max(0.0, deadline - time.monotonic())) for i in self._informers())

    @property
    def is_leader(self) -> bool:
        return self.elector is None or self.elector.is_leader

    def _on_started_leading(self) -> None:
        self.metrics.is_leader.set(1)
        self.imports.wait_for_sync(30)
        for imp in self.imports.list():
            self.queue.add(_key(*kube.object_key(imp)))

    # --- event handlers (informer threads: quick) -------------------------------------------------------------------
    def _on_import(self, event: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        key = _key(*kube.object_key(obj))
        if event == "DELETED":
            with self._lock:
                self._written_imports.pop(key, None)
                self._issued.pop(key, None)
            self.metrics.set_expiry(key, None)
            self.queue.forget(key)
            return
        self.queue.add(key)

    def _on_secret(self, event: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        namespace, _ = kube.object_key(obj)
        import_name = ((obj.get("metadata") or {}).get("labels") or {}).get(api.IMPORT_LABEL)
        if namespace == self.system_namespace:
            self._on_system_secret(event, obj, old)
        if not import_name:
            return
        key = _key(namespace, import_name)
        if event == "DELETED":
            with self._lock:
                written = self._written_secrets.get(key)
                if written is not None and _rv(obj) >= _rv(written):
                    self._written_secrets.pop(key, None)
        self.queue.add(key)

    def _on_system_secret(self, event: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        changed = self.sources.remove_secret(obj) if event == "DELETED" else self.sources.set_secret(obj)
        self._requeue_clusters(changed)

    def _requeue_clusters(self, names: set[str]) -> None:
        if not names:
            return
        log.info("credentials changed for cluster(s) %s", ", ".join(sorted(names)))
        for imp in self.imports.list():
            cluster = (imp.get("spec") or {}).get("clusterName") if isinstance(imp.get("spec"), dict) else None
            if cluster in names:
                key = _key(*kube.object_key(imp))
                self.queue.forget(key)
                self.queue.add(key)

    def _poll_files(self) -> None:
        while not self._stopping.wait(self.file_poll_seconds):
            try:
                self._requeue_clusters(self.sources.refresh_files())
            except Exception:
                log.exception("re-reading source credentials failed")

    # --- workers ---
    def _work(self) -> None:
        while True:
            key = self.queue.get()
            if key is None:
                return
            try:
                if self.is_leader:
                    started = time.perf_counter()
                    self._reconcile(key)
                    self.metrics.latency.observe(time.perf_counter() - started)
            except ApiException as exc:
                # Only status and reason: an error body is never logged whole.
                log.warning("reconciling %s: local API error %s %s; retrying", key, exc.status, kube.error_reason(exc))
                self.metrics.reconciles.labels("error").inc()
                self.queue.add_rate_limited(key)
            except kube.CONNECTION_ERRORS as exc:
                log.warning("reconciling %s: local API unreachable (%s); retrying", key, type(exc).__name__)
                self.metrics.reconciles.labels("error").inc()
                self.queue.add_rate_limited(key)
            except Exception:
                # A bug must not kill the worker: log (no object content) and retry with backoff.
                log.exception("reconciling %s failed unexpectedly; retrying", key)
                self.metrics.reconciles.labels("error").inc()
                self.queue.add_rate_limited(key)
            finally:
                self.queue.done(key)

    def _reconcile(self, key: str) -> None:
        namespace, name = _split(key)
        with self._lock:
            imp = _newest(self.imports.get(name, namespace), self._written_imports.get(key))
        if imp is None or (imp.get("metadata") or {}).get("deletionTimestamp"):
            # Gone or going: the Secret goes with it through its ownerReference (garbage collection).
            self.metrics.reconciles.labels("skipped").inc()
            return
        secret_name = api.secret_name_for_import(name)
        with self._lock:
            secret = _newest(self.secrets.get(secret_name, namespace), self._written_secrets.get(key))
            issued = self._issued.get(key)
        cluster_name = (imp.get("spec") or {}).get("clusterName") if isinstance(imp.get("spec"), dict) else None
        source = self.sources.get(cluster_name) if isinstance(cluster_name, str) else None
        remote = source.remote if source is not None else None
        known = self.sources.names()
        now = self._clock()
        cluster_error = self.sources.error_for(cluster_name) if source is None and cluster_name else None
        decision = rc.decide(
            imp, secret, now, remote=remote, known_clusters=known, issued=issued, cluster_error=cluster_error
        )
        if decision.remember is not None:
            with self._lock:
                self._issued[key] = decision.remember
        if decision.request_token:
            assert source is not None and decision.spec is not None
            if not self.is_leader:
                return
            failure = None
            try:
                issued = self._request_token(source, decision.spec, now)
                with self._lock:
                    self._issued[key] = issued
                self.metrics.tokens_refreshed.inc()
            except TokenFailure as exc:
                failure = exc.failure
            decision = rc.decide(imp, secret, now, remote=remote, known_clusters=known, issued=issued, failure=failure)
        self._apply(key, imp, decision, now)

    def _apply(self, key: str, imp: dict[str, Any], decision: rc.Decision, now: float) -> None:
        namespace, name = _split(key)
        if not self.is_leader:  # lost the lease while deciding: write nothing, not even an Event
            return
        if decision.secret is not None:
            try:
                if decision.create_secret:
                    written = self._secrets_api.create(decision.secret, namespace)
                else:
                    written = self._secrets_api.replace(decision.secret, namespace)
            except ApiException as exc:
                # The cache was behind (someone created, edited or deleted it meanwhile): look again soon.
                if exc.status in (404, 409):
                    self.metrics.reconciles.labels("conflict").inc()
                    self.queue.add_rate_limited(key)
                    return
                raise
            with self._lock:
                self._written_secrets[key] = written
        if decision.status is not None and self.is_leader:
            try:
                patch = rc.status_patch(
                    imp.get("status") if isinstance(imp.get("status"), dict) else None, decision.status
                )
                written_imp = self._imports_api.patch_status(name, patch, namespace)
                with self._lock:
                    self._written_imports[key] = written_imp
            except ApiException as exc:
                if exc.status != 404:  # 404: the import was deleted meanwhile, nothing to report on
                    raise
        for event_type, reason, message in decision.events:
            self._emit(imp, event_type, reason, message)

        with self._lock:
            issued = self._issued.get(key)
        if issued is not None and not decision.failed:
            self.metrics.set_expiry(key, issued.expires_at)

        if decision.failed:
            reason = decision.failure.reason if decision.failure else "Unknown"
            self.metrics.errors.labels(reason).inc()
            self.metrics.reconciles.labels("error").inc()
            delay = self.queue.add_rate_limited(key)
            log.info("import %s: %s; retrying in %.1fs", key, reason, delay)
        else:
            for event_type, reason, _ in decision.events:
                if event_type == "Warning":
                    self.metrics.errors.labels(reason).inc()
            self.queue.forget(key)
            self.metrics.reconciles.labels("success").inc()
        if decision.requeue_at is not None:
            self.queue.add_after(key, max(0.0, decision.requeue_at - now))

    def _emit(self, imp: dict[str, Any], event_type: str, reason: str, message: str) -> None:
        meta = imp.get("metadata") or {}
        stamp = format_time(self._clock())
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta.get('name')}.{uuid.uuid4().hex[:16]}", "namespace": meta.get("namespace")},
            "involvedObject": {
                "apiVersion": api.API_VERSION,
                "kind": api.KIND,
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": reason,
            "message": message,
            "type": event_type,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.identity,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self._events_api.create(event, meta.get("namespace"))
        except (ApiException, *kube.CONNECTION_ERRORS) as exc:
            log.info("could not record event %s on %s: %s", reason, meta.get("name"), type(exc).__name__)

    # --- remote calls ---
    def _request_token(self, source: SourceCluster, spec: ImportSpec, now: float) -> rc.IssuedToken:
        try:
            client = self.sources.client(source)
        except Exception as exc:  # a kubeconfig the client cannot load (exec plugin missing, bad files, ...)
            raise TokenFailure(
                rc.RemoteFailure(
                    api.REASON_REMOTE_ERROR,
                    client_error_message(source, exc),
                )
            ) from None
        try:
            if spec.legacy:
                return self._legacy_token(client, source, spec, now)
            return self._token_request(client, source, spec, now)
        except ApiException as exc:
            code = exc.status if exc.status else None
            raise TokenFailure(rc.classify_remote_error(code, kube.error_message(exc), source.name, spec)) from None
        except kube.CONNECTION_ERRORS as exc:
            raise TokenFailure(rc.classify_remote_error(None, type(exc).__name__, source.name, spec)) from None
        except ValueError as exc:
            raise TokenFailure(rc.classify_remote_error(502, str(exc), source.name, spec)) from None

    def _token_request(self, client: ApiClient, source: SourceCluster, spec: ImportSpec, now: float) -> rc.IssuedToken:
        body: dict[str, Any] = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": spec.expiration_seconds},
        }
        if spec.audiences:
            body["spec"]["audiences"] = list(spec.audiences)
        accounts = kube.Resource(client, kube.SERVICE_ACCOUNTS, timeout=self.remote_timeout)
        answer = accounts.create_subresource(spec.name, "token", body, spec.namespace)
        token, expires_at = rc.decode_token_response(answer)
        return rc.IssuedToken(
            token=token,
            issued_at=now,
            expires_at=expires_at if expires_at is not None else now + spec.expiration_seconds,
            inputs_hash=rc.inputs_hash(spec, source.remote),
            server=source.server,
            ca_pem=source.ca_pem,
            namespace=spec.namespace,
        )

    def _legacy_token(self, client: ApiClient, source: SourceCluster, spec: ImportSpec, now: float) -> rc.IssuedToken:
        secrets = kube.Resource(client, kube.SECRETS, timeout=self.remote_timeout)
        secret_name = legacy_secret_name(spec.name)
        try:
            secret = secrets.get(secret_name, spec.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": LEGACY_SECRET_TYPE,
                "metadata": {
                    "name": secret_name,
                    "namespace": spec.namespace,
                    "annotations": {LEGACY_SA_ANNOTATION: spec.name},
                },
            }
            secret = secrets.create(body, spec.namespace)
        annotations = (secret.get("metadata") or {}).get("annotations") or {}
        if secret.get("type") != LEGACY_SECRET_TYPE or annotations.get(LEGACY_SA_ANNOTATION) != spec.name:
            raise TokenFailure(
                rc.RemoteFailure(
                    api.REASON_SECRET_CONFLICT,
                    f"Secret {spec.namespace}/{secret_name} in cluster {source.name} is not a token Secret of "
                    f"service account {spec.name}; delete it so the controller can create one.",
                )
            )
        filled = rc.legacy_secret_token(secret)
        if filled is None:
            self._check_remote_account(client, source, spec)
            raise TokenFailure(
                rc.RemoteFailure(
                    rc.REASON_LEGACY_TOKEN_PENDING,
                    f"Waiting for the token controller of cluster {source.name} to fill Secret "
                    f"{spec.namespace}/{secret_name}; if this lasts, check that cluster's controller manager.",
                )
            )
        token, ca_pem, _ = filled
        if b"-----BEGIN CERTIFICATE-----" not in ca_pem:
            ca_pem = source.ca_pem
        return rc.IssuedToken(
            token=token,
            issued_at=now,
            expires_at=None,
            inputs_hash=rc.inputs_hash(spec, source.remote),
            server=source.server,
            ca_pem=ca_pem,
            namespace=spec.namespace,
        )

    def _check_remote_account(self, client: ApiClient, source: SourceCluster, spec: ImportSpec) -> None:
        """While a legacy Secret stays empty: a missing service account is the likely cause (403: cannot tell)."""
        try:
            kube.Resource(client, kube.SERVICE_ACCOUNTS, timeout=self.remote_timeout).get(spec.name, spec.namespace)
        except ApiException as exc:
            if exc.status == 404:
                raise
