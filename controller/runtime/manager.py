"""Run a reconcile function over a work queue fed by informers, as controller-runtime's manager does.

Order of start: informers, health server, leader election; then, once every informer has synced and the
caller says it is ready (`ready_to_work`), the workers. No reconcile runs on a cold cache, so a restart never
reports what it has not read yet. Only the leader reconciles; when it becomes leader, every key is queued once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from controller.runtime.health import HealthServer
from controller.runtime.leader import LeaderElector
from controller.runtime.queue import WorkQueue
from kubemcsa.client import informer as kube_informer
from kubemcsa.client import kube
from kubemcsa.client.informer import Informer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    """What a reconcile asks of the queue: back off and retry, and/or look again after `requeue_after` seconds."""

    requeue_after: float | None = None
    retry: bool = False
    outcome: str = "success"  # a label for the reconciles metric: success, error, conflict, skipped


@dataclass(frozen=True)
class Watch:
    """An informer a controller reads, and what its events do (on the informer's thread: quickly)."""

    informer: kube_informer.Informer
    handler: kube_informer.EventHandler


@dataclass(frozen=True)
class ManagerOptions:
    lease_name: str
    lease_namespace: str
    identity: str
    leader_election: bool = True
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    workers: int = 4
    health_port: int | None = None
    backoff_base: float = 0.5
    backoff_max: float = 300.0


class Manager:
    def __init__(
        self,
        api_client: ApiClient,
        options: ManagerOptions,
        reconcile: Callable[[str], Result],
        *,
        all_keys: Callable[[], Iterable[str]],
        exposition: Callable[[], bytes] = lambda: b"",
        observe: Callable[[str, float], None] = lambda outcome, seconds: None,
        on_leading: Callable[[bool], None] = lambda leading: None,
        ready_to_work: Callable[[], bool] = lambda: True,
    ) -> None:
        self.options = options
        self.queue = WorkQueue(base_delay=options.backoff_base, max_delay=options.backoff_max)
        self.informers: list[Informer] = []
        self._optional: set[int] = set()  # ids of informers the workers do not wait for
        self._reconcile = reconcile
        self._all_keys = all_keys
        self._exposition = exposition
        self._observe = observe
        self._on_leading = on_leading
        self._ready_to_work = ready_to_work  # asked once the caches synced, until True: then the workers start
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._synced = threading.Event()
        self._started = False
        self._starter: threading.Thread | None = None
        self.fatal: str | None = None  # why the manager cannot go on; the process should exit with it
        self.health_server: HealthServer | None = None
        self.elector: LeaderElector | None = None
        if options.leader_election:
            self.elector = LeaderElector(
                api_client,
                options.lease_namespace,
                options.identity,
                name=options.lease_name,
                lease_duration=options.lease_duration,
                renew_deadline=options.renew_deadline,
                retry_period=options.retry_period,
                on_started_leading=lambda: self._leading(True),
                on_stopped_leading=lambda: self._leading(False),
                on_fatal=self._fail,
            )

    # --- wiring ---
    def add_informer(self, informer: Informer, *, required: bool = True) -> Informer:
        """Start `informer` with the manager; the workers wait for it to sync unless it is not `required` (a type
        that may not be served, like an optional CRD: whoever reads it checks has_synced)."""
        self.informers.append(informer)
        if not required:
            self._optional.add(id(informer))
        return informer

    def spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def run_every(self, seconds: float, task: Callable[[], None], name: str) -> None:
        """Run `task` every `seconds` until stop (an exception is logged, not fatal)."""

        def loop() -> None:
            while not self._stopping.wait(seconds):
                try:
                    task()
                except Exception:
                    log.exception("%s failed", name)

        self.spawn(loop, name)

    # --- lifecycle ---
    def start(self) -> Manager:
        for informer in self.informers:
            informer.start()
        if self.options.health_port is not None:
            self.health_server = HealthServer(
                self._exposition, self.options.health_port, self.healthy, self.ready
            ).start()
        if self.elector is not None:
            self.elector.start()
        else:
            self._leading(True)
        # Not among the threads that must stay alive: it ends once the workers run.
        self._starter = threading.Thread(target=self._start_workers_when_synced, name="wait-for-caches", daemon=True)
        self._starter.start()
        self._started = True
        return self

    def _start_workers_when_synced(self) -> None:
        for informer in self.informers:
            if id(informer) in self._optional:
                continue
            while not informer.wait_for_sync(0.5):
                if self._stopping.is_set():
                    return
        # What the caches alone do not say (say, every source cluster loaded): no reconcile before it holds.
        while not self._ready_to_work():
            if self._stopping.wait(0.05):
                return
        self._synced.set()
        log.info("caches synced; starting %d workers", self.options.workers)
        for i in range(self.options.workers):
            self.spawn(self._work, f"worker-{i}")
        if self.is_leader:
            self.queue_all()

    def stop(self) -> None:
        """Stop within a few seconds: release the lease first so that a successor takes over at once."""
        self._stopping.set()
        if self.elector is not None:
            self.elector.stop(release=True)
        self.queue.shutdown()
        if self._starter is not None:
            self._starter.join(5)
        for informer in self.informers:
            informer.stop(timeout=2)
        for thread in self._threads:
            thread.join(10)
        if self.health_server is not None:
            self.health_server.stop()

    def ready(self) -> bool:
        return self._started and self._synced.is_set()

    def healthy(self) -> bool:
        return self._started and not self._stopping.is_set() and all(t.is_alive() for t in self._threads)

    def wait_until_synced(self, timeout: float) -> bool:
        return self._synced.wait(timeout)

    def _fail(self, message: str) -> None:
        self.fatal = message
        self._stopping.set()
        self.queue.shutdown()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def is_leader(self) -> bool:
        return self.elector is None or self.elector.is_leader

    def _leading(self, leading: bool) -> None:
        self._on_leading(leading)
        if leading and self._synced.is_set():
            self.queue_all()

    def queue_all(self) -> None:
        for key in self._all_keys():
            self.queue.add(key)

    # --- workers ---
    def _work(self) -> None:
        while (key := self.queue.get()) is not None:
            try:
                if not self.is_leader:
                    continue  # the leader does the work; queue_all runs again if this replica becomes it
                started = time.perf_counter()
                result = self._reconcile_safely(key)
                self._observe(result.outcome, time.perf_counter() - started)
                if result.retry:
                    self.queue.add_rate_limited(key)
                else:
                    self.queue.forget(key)
                if result.requeue_after is not None:
                    self.queue.add_after(key, max(0.0, result.requeue_after))
            finally:
                self.queue.done(key)

    def _reconcile_safely(self, key: str) -> Result:
        try:
            return self._reconcile(key)
        except ApiException as exc:
            # Only status and reason: an error body is never logged whole.
            log.warning("reconciling %s: local API error %s %s; retrying", key, exc.status, kube.error_reason(exc))
        except kube.CONNECTION_ERRORS as exc:
            log.warning("reconciling %s: local API unreachable (%s); retrying", key, type(exc).__name__)
        except Exception:
            # A bug must not kill the worker: log (no object content) and retry with backoff.
            log.exception("reconciling %s failed unexpectedly; retrying", key)
        return Result(retry=True, outcome="error")
