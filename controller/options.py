"""How a Controller runs: every option, with the default of `kubemcsa-controller` (controller/__main__.py maps the
flags onto them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from controller.gates import DEFAULT_BURST, DEFAULT_QPS
from kubemcsa.contract import api

# Imports reconciled at once. A pass waits on three calls in turn (the token, the Secret, the status), so the
# tokens a controller can take per second are about workers / that wait, not its CPU: at 10 sources of 50 QPS each
# (bench/bench_controller.py, 10,000 imports) all were Ready in 20-26 s with 8 workers, 18 s with 16 (the rate
# limit alone needing 18 s) and 20 s with 24, at the same CPU per import. Idle workers cost a thread each.
DEFAULT_WORKERS = 16


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
    workers: int = DEFAULT_WORKERS
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
    # A source that turns unreachable or reachable wakes its imports (their outputs say its health) at most once in
    # this long: one that flaps costs its imports' reconciles no more often.
    reachability_hold_seconds: float = 10.0
    # A federated source with imports is asked its /version (without credentials) this often: the controller makes
    # no other call to it once its imports are Ready, and their outputs (a ClusterProfile's health) say its health.
    federated_probe_seconds: float = 30.0
    clock: Callable[[], float] = field(default=time.time, compare=False)
