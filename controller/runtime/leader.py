"""Leader election on a coordination.k8s.io/v1 Lease, as client-go's leaderelection does.

Only the leader writes. A lease is taken over when its holder has not renewed it for leaseDurationSeconds,
measured on this replica's own monotonic clock from the moment it last saw the lease change (so clock skew
between replicas does not matter). A leader that cannot renew within renew_deadline stops writing at once.
stop() releases the lease so that a successor takes over at its next retry instead of waiting for expiry.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from kubemcsa.client import kube

log = logging.getLogger(__name__)

LEASE_NAME = "service-account-import-controller"


def micro_time(epoch: float) -> str:
    """metav1.MicroTime: RFC 3339 with microseconds."""
    return dt.datetime.fromtimestamp(epoch, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class LeaseView:
    holder: str
    duration: float
    transitions: int
    version: str


def read_lease(lease: dict[str, Any]) -> LeaseView:
    spec = lease.get("spec") or {}
    duration = spec.get("leaseDurationSeconds")
    transitions = spec.get("leaseTransitions")
    return LeaseView(
        holder=str(spec.get("holderIdentity") or ""),
        duration=float(duration) if isinstance(duration, int | float) and not isinstance(duration, bool) else 15.0,
        transitions=transitions if isinstance(transitions, int) and not isinstance(transitions, bool) else 0,
        version=str((lease.get("metadata") or {}).get("resourceVersion", "")),
    )


def may_acquire(view: LeaseView, identity: str, observed_for: float) -> bool:
    """Whether `identity` may take (or keep) a lease last seen changing `observed_for` seconds ago."""
    return not view.holder or view.holder == identity or observed_for >= view.duration


def updated_lease(lease: dict[str, Any], identity: str, duration: float, now: float) -> dict[str, Any]:
    """The lease held by `identity`, renewed at `now` (acquired now, one more transition, if it changes hands)."""
    view = read_lease(lease)
    spec = dict(lease.get("spec") or {})
    if view.holder != identity:
        # As client-go: every change of hands counts, after a release too; creating the lease does not.
        existed = "holderIdentity" in spec or "acquireTime" in spec
        spec["acquireTime"] = micro_time(now)
        spec["leaseTransitions"] = view.transitions + (1 if existed else 0)
    spec["holderIdentity"] = identity
    spec["leaseDurationSeconds"] = int(duration)
    spec["renewTime"] = micro_time(now)
    spec.setdefault("leaseTransitions", view.transitions)
    return {**lease, "spec": spec}


def released_lease(lease: dict[str, Any], now: float) -> dict[str, Any]:
    spec = dict(lease.get("spec") or {})
    spec.update(holderIdentity=None, leaseDurationSeconds=1, renewTime=micro_time(now), acquireTime=micro_time(now))
    return {**lease, "spec": spec}


class NamespaceMissing(Exception):
    """The Lease's namespace does not exist: nothing will change that but a person, so stop and say so."""


def namespace_missing_message(namespace: str) -> str:
    return (
        f"the namespace {namespace} does not exist in the local cluster, so no lease can be held there; create it "
        f"(kubectl create namespace {namespace}, or kubectl apply -k manifests/) or pass --system-namespace."
    )


class LeaderElector:
    def __init__(
        self,
        api_client: ApiClient,
        namespace: str,
        identity: str,
        *,
        name: str = LEASE_NAME,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        on_started_leading: Callable[[], None] | None = None,
        on_stopped_leading: Callable[[], None] | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self.leases = kube.Resource(api_client, kube.LEASES, timeout=max(1.0, retry_period))
        self.namespace = namespace
        self.identity = identity
        self.name = name
        self.lease_duration = lease_duration
        self.renew_deadline = min(renew_deadline, lease_duration)
        self.retry_period = retry_period
        self._on_started = on_started_leading
        self._on_stopped = on_stopped_leading
        self._on_fatal = on_fatal
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lease: dict[str, Any] | None = None  # as last written or read
        self._observed: tuple[str, str] | None = None
        self._observed_at = 0.0
        self._leading = False
        self._last_renew = 0.0

    @property
    def is_leader(self) -> bool:
        """True while this replica holds a lease it renewed recently enough; writes must check it each time."""
        return self._leading and time.monotonic() - self._last_renew < self.renew_deadline

    def start(self) -> LeaderElector:
        self._thread = threading.Thread(target=self._run, name="leader-election", daemon=True)
        self._thread.start()
        return self

    def stop(self, release: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        was_leading = self._leading
        self._set_leading(False)
        if release and was_leading and self._lease is not None:
            try:
                self.leases.replace(released_lease(self._lease, time.time()), self.namespace)
            except (ApiException, *kube.CONNECTION_ERRORS) as exc:
                log.info("could not release the lease (%s); a successor will wait for it to expire", type(exc).__name__)

    def _set_leading(self, leading: bool) -> None:
        if leading == self._leading:
            return
        self._leading = leading
        log.info("%s leadership of lease %s/%s", "acquired" if leading else "lost", self.namespace, self.name)
        callback = self._on_started if leading else self._on_stopped
        if callback is not None:
            try:
                callback()
            except Exception:
                log.exception("leader election callback failed")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._try_acquire_or_renew()
            except NamespaceMissing:
                message = namespace_missing_message(self.namespace)
                log.error("%s", message)
                if self._on_fatal is not None:
                    self._on_fatal(message)
                return
            except (ApiException, *kube.CONNECTION_ERRORS, ValueError) as exc:
                log.info("leader election: %s", type(exc).__name__)
            if self._leading and time.monotonic() - self._last_renew >= self.renew_deadline:
                self._set_leading(False)
            self._stop.wait(self.retry_period)

    def _observe(self, lease: dict[str, Any]) -> LeaseView:
        view = read_lease(lease)
        spec = lease.get("spec") or {}
        key = (view.holder, str(spec.get("renewTime")))
        if key != self._observed:
            self._observed = key
            self._observed_at = time.monotonic()
        self._lease = lease
        return view

    def _try_acquire_or_renew(self) -> None:
        now = time.time()
        if self._leading and self._lease is not None:
            # Renew blindly on the version we wrote last: one call; a conflict means someone else wrote.
            try:
                self._wrote(self.leases.replace(updated_lease(self._lease, self.identity, self.lease_duration, now)))
                return
            except ApiException as exc:
                if exc.status != 409:
                    raise
        try:
            lease = self.leases.get(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {},
            }
            try:
                self._wrote(self.leases.create(updated_lease(body, self.identity, self.lease_duration, now)))
            except ApiException as create_exc:
                details = kube.error_status(create_exc).get("details") or {}
                if create_exc.status == 404 and details.get("kind") == "namespaces":
                    raise NamespaceMissing(self.namespace) from None
                if create_exc.status != 409:
                    raise
            return
        view = self._observe(lease)
        if not may_acquire(view, self.identity, time.monotonic() - self._observed_at):
            self._set_leading(False)
            return
        try:
            self._wrote(self.leases.replace(updated_lease(lease, self.identity, self.lease_duration, now)))
        except ApiException as exc:
            if exc.status != 409:
                raise
            self._set_leading(False)

    def _wrote(self, lease: dict[str, Any]) -> None:
        self._observe(lease)
        if self._leading and time.monotonic() - self._last_renew >= self.renew_deadline:
            # A late renewal (a stalled process, a starved thread): is_leader read False meanwhile, and the workers
            # dropped what they got then. Resuming is a new term, so that on_started_leading queues it all again.
            self._set_leading(False)
        self._last_renew = time.monotonic()
        self._set_leading(True)
