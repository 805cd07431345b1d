"""`kubemcsa-webhook --workers N` (webhook.workers, webhook.worker): N serving processes share the socket over real
TLS, fed by one watch.

Which worker answered is read from each worker's own metrics file (prometheus_client's multiprocess mode keeps
one per process); a worker is singled out by stopping the others (SIGSTOP), so that only it accepts.
"""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry, multiprocess

from kubemcsa.certificates import manager
from kubemcsa.client import kube, tls
from kubemcsa.contract import api
from kubemcsa_testing import ApiServer
from kubemcsa_testing.objects import create_file, create_or_get
from kubemcsa_testing.wait import wait_for
from webhook.app import MUTATE_PATH
from webhook.cache import WatchCache
from webhook.cli import CERT_SECRET_NAME, SERVICE_NAME, WEBHOOK_CONFIGURATION_NAME
from webhook.lookups import LookupReply, StaticCache
from webhook.workers import WorkerPool, cpu_quota

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
BODY = (ROOT / "tests" / "fixtures" / "admissionreview-v1-pod.json").read_bytes()
NS = "capture-demo"  # the fixture's namespace
ENABLED = {api.NAMESPACE_LABEL: api.NAMESPACE_LABEL_VALUE}
IMPORTS = {(NS, "cluster2-default-pod-lister"), (NS, "cluster3-default-pod-lister")}
SYSTEM_NS = api.SYSTEM_NAMESPACE
WEBHOOK_USER = f"system:serviceaccount:{SYSTEM_NS}:{SERVICE_NAME}"


def write_pair(directory: Path, ca: tuple[bytes, bytes]) -> tuple[Path, Path]:
    cert, key = tls.make_serving_cert(ca[0], ca[1], ["localhost"], ["127.0.0.1"])
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    for path, content in ((key_file, key), (cert_file, cert)):  # each by rename, as a renewal does
        temp = path.with_suffix(".tmp")
        temp.write_bytes(content)
        temp.replace(path)
    return cert_file, key_file


@pytest.fixture
def ca() -> tuple[bytes, bytes]:
    return tls.make_ca("test-workers-ca")


@pytest.fixture
def pool(tmp_path: Path, ca: tuple[bytes, bytes]) -> Iterator[WorkerPool]:
    cert_file, key_file = write_pair(tmp_path, ca)
    cache = StaticCache({NS: ENABLED}, IMPORTS)
    with WorkerPool(
        cache, cert_file, key_file, workers=2, reload_interval=0.05, health_port=0, log_level="warning"
    ) as started:
        yield started


def client_for(ca: tuple[bytes, bytes]) -> httpx.Client:
    return httpx.Client(verify=ssl.create_default_context(cadata=ca[0].decode()), timeout=10)


def answered_by(pool: WorkerPool, pid: int, tmp_path: Path) -> float:
    """The admission requests worker `pid` answered, from its own metrics file."""
    assert pool.metrics_dir is not None
    own = tmp_path / f"metrics-{pid}-{time.monotonic_ns()}"
    own.mkdir()
    for path in pool.metrics_dir.glob(f"*_{pid}.db"):
        shutil.copy(path, own)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(own))
    return sum(
        sample.value
        for family in registry.collect()
        if family.name == "kubemcsa_webhook_requests"
        for sample in family.samples
        if sample.name.endswith("_total")
    )


def total_answered(pool: WorkerPool, ca: tuple[bytes, bytes]) -> float:
    with client_for(ca) as c:
        text = c.get(pool.url + "/metrics").text
    return sum(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("kubemcsa_webhook_requests_total")
    )


def post_on_new_connections(pool: WorkerPool, ca: tuple[bytes, bytes], count: int, timeout: int = 5) -> list[int]:
    """`count` reviews at once, each on a connection of its own (with ?timeout=`timeout`s); their HTTP statuses
    (0: no answer)."""
    statuses: list[int] = []

    def one() -> None:
        with client_for(ca) as c:
            c.timeout = httpx.Timeout(timeout + 10)
            url = f"{pool.url}{MUTATE_PATH}?timeout={timeout}s"
            try:
                statuses.append(c.post(url, content=BODY).status_code)
            except httpx.HTTPError:
                statuses.append(0)  # (no answer)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


@contextmanager
def only(pool: WorkerPool, pid: int) -> Iterator[None]:
    """Only worker `pid` accepts connections meanwhile: the others are stopped (SIGSTOP), then resumed."""
    others = [other for other in pool.pids() if other != pid]
    for other in others:
        os.kill(other, signal.SIGSTOP)
    # kill() returns before every thread has stopped: a busy machine may let one accept a connection meanwhile.
    wait_for(lambda: all(_stopped(other) for other in others), what="the other workers to stop")
    try:
        yield
    finally:
        for other in others:
            os.kill(other, signal.SIGCONT)


def _stopped(pid: int) -> bool:
    """Every thread of process `pid` is stopped (state T)."""
    states = [(task / "stat").read_text().rpartition(")")[2].split()[0] for task in Path(f"/proc/{pid}/task").iterdir()]
    return all(state in ("T", "t") for state in states)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def served_certificate(url: str) -> bytes:
    host, port = url.removeprefix("https://").rsplit(":", 1)
    return ssl.get_server_certificate((host, int(port)), timeout=5).encode()


def accepting(pid: int, listening: int) -> bool:
    """Whether process `pid` still holds the listening socket (uvicorn closes it when it stops accepting)."""
    stat = os.fstat(listening)
    inode = f"socket:[{stat.st_ino}]"
    fds = Path(f"/proc/{pid}/fd")
    try:
        return any(os.readlink(fd) == inode for fd in fds.iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_both_workers_answer(pool: WorkerPool, ca: tuple[bytes, bytes], tmp_path: Path) -> None:
    first, second = pool.pids()
    assert first != second

    def both_answered() -> bool:
        assert set(post_on_new_connections(pool, ca, 8)) == {200}
        return all(answered_by(pool, pid, tmp_path) > 0 for pid in (first, second))

    wait_for(both_answered, timeout=60, what="each worker to answer some of the connections")
    # /metrics, whichever worker serves it (on the webhook port or the shared health port), counts every worker's.
    counts = [answered_by(pool, pid, tmp_path) for pid in (first, second)]
    assert total_answered(pool, ca) == sum(counts)
    for pid in (first, second):
        with only(pool, pid), httpx.Client(timeout=10) as plain:
            assert plain.get(pool.health_url + "/readyz").status_code == 200
            text = plain.get(pool.health_url + "/metrics").text
        lines = [line for line in text.splitlines() if line.startswith("kubemcsa_webhook_requests_total")]
        assert sum(float(line.split()[-1]) for line in lines) == sum(counts)


def test_each_worker_answers_on_its_own(pool: WorkerPool, ca: tuple[bytes, bytes], tmp_path: Path) -> None:
    for pid in pool.pids():
        before = answered_by(pool, pid, tmp_path)
        with only(pool, pid):
            assert post_on_new_connections(pool, ca, 3) == [200] * 3
        assert answered_by(pool, pid, tmp_path) == before + 3


def test_a_killed_worker_is_replaced_and_the_other_keeps_serving(
    pool: WorkerPool, ca: tuple[bytes, bytes], tmp_path: Path
) -> None:
    assert set(post_on_new_connections(pool, ca, 6)) == {200}
    counted = total_answered(pool, ca)
    victim, survivor = pool.pids()
    left_behind = _descendants(victim)  # its large-request parser (and multiprocessing's resource tracker)
    assert left_behind
    os.kill(victim, signal.SIGKILL)
    # Meanwhile the other one answers every request.
    assert set(post_on_new_connections(pool, ca, 6)) == {200}
    wait_for(lambda: victim not in pool.pids() and len(pool.pids()) == 2, timeout=60, what="a new worker")
    replacement = next(pid for pid in pool.pids() if pid != survivor)
    assert pool.restarts == 1
    with only(pool, replacement):
        wait_for(lambda: set(post_on_new_connections(pool, ca, 2)) == {200}, what="the new worker to answer")
    assert answered_by(pool, replacement, tmp_path) >= 2
    # The killed worker's counts stay in the sums: the counters never go down.
    assert total_answered(pool, ca) >= counted + 6 + 2
    # Nothing of the killed worker is left running.
    wait_for(lambda: not any(map(_alive, left_behind)), timeout=30, what="the killed worker's children to end")


def test_a_renewed_certificate_reaches_every_worker(pool: WorkerPool, ca: tuple[bytes, bytes], tmp_path: Path) -> None:
    before = served_certificate(pool.url)
    renewed_cert, _ = write_pair(tmp_path, ca)
    renewed = renewed_cert.read_bytes().strip()
    assert renewed != before.strip()
    for pid in pool.pids():
        with only(pool, pid):
            wait_for(lambda: served_certificate(pool.url).strip() == renewed, what=f"worker {pid} to serve it")
            assert post_on_new_connections(pool, ca, 2) == [200, 200]


class _SlowCache(StaticCache):
    """A cache whose misses are answered only once `release` is set (a request kept in flight)."""

    def __init__(self) -> None:
        super().__init__({}, set())
        self.asked = threading.Event()
        self.release = threading.Event()

    def answer(self, kind: str, namespace: str, names: Sequence[str], deadline: float) -> LookupReply:
        self.asked.set()
        self.release.wait(60)
        return LookupReply(kind, namespace, dict(ENABLED) if kind == "namespace" else [])


def test_graceful_stop_drains_every_worker_and_finishes_requests_in_flight(
    tmp_path: Path, ca: tuple[bytes, bytes]
) -> None:
    cert_file, key_file = write_pair(tmp_path, ca)
    cache = _SlowCache()
    pool = WorkerPool(cache, cert_file, key_file, workers=2, log_level="warning").start()
    processes = list(pool._workers.values())
    in_flight: list[int] = []
    try:
        request = threading.Thread(target=lambda: in_flight.extend(post_on_new_connections(pool, ca, 1, timeout=30)))
        request.start()
        wait_for(cache.asked.is_set, what="a request waiting for its lookup")
        pool.drain()
        for pid in pool.pids():  # readiness is off in every worker
            with only(pool, pid), client_for(ca) as c:
                wait_for(lambda: c.get(pool.url + "/readyz").status_code == 503, what=f"worker {pid} draining")
        stopping = threading.Thread(target=pool.stop)
        stopping.start()
        listening = pool._socket.fileno() if pool._socket is not None else -1
        wait_for(lambda: not any(accepting(w.process.pid, listening) for w in processes), what="accepting to stop")
        cache.release.set()  # only now does the request in flight get its answer
        request.join(30)
        stopping.join(30)
    finally:
        cache.release.set()
        pool.stop()
    assert in_flight == [200]
    assert [w.process.returncode for w in processes] == [0, 0]
    assert pool.restarts == 0


def test_cpu_quota_reads_cgroup_v2_cpu_max() -> None:
    assert cpu_quota("max 100000\n") is None
    assert cpu_quota("150000 100000\n") == 1.5
    assert cpu_quota("200000 100000") == 2.0
    assert cpu_quota("garbage") is None


def test_a_worker_never_loads_the_kubernetes_client_fastapi_or_cryptography() -> None:
    # What a worker imports to serve (webhook.worker, then WebhookServer and the multiprocess metrics).
    code = (
        "import sys, webhook.worker, webhook.server, prometheus_client.multiprocess; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'kubernetes', 'fastapi', 'cryptography', 'pydantic'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- fed by one watch of a cluster ---------------------------------------------------------------------------


def _webhook_cluster(server: ApiServer) -> Any:
    admin = server.admin_client()
    create_file(admin, MANIFESTS / "crd" / "serviceaccountimports.yaml")
    for namespace in (SYSTEM_NS, api.CERT_NAMESPACE):
        create_or_get(admin, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    for name in ("serviceaccount.yaml", "rbac.yaml", "mutatingwebhookconfiguration.yaml"):
        create_file(admin, MANIFESTS / "webhook" / name)
    return admin


def test_workers_share_one_watch_and_the_api_calls_do_not_multiply(cluster1: ApiServer, tmp_path: Path) -> None:
    admin = _webhook_cluster(cluster1)
    webhook_client = cluster1.client_for_token(cluster1.issue_token(SYSTEM_NS, SERVICE_NAME, expiration_seconds=3600))
    bundle = manager.ensure_webhook_certificates(
        webhook_client,
        namespace=SYSTEM_NS,
        secret_name=CERT_SECRET_NAME,
        secret_namespace=api.CERT_NAMESPACE,
        service_name=SERVICE_NAME,
        webhook_configuration_name=WEBHOOK_CONFIGURATION_NAME,
    )
    cert_file, key_file = manager.write_files(bundle, tmp_path / "tls")
    ns = "apps"
    create_or_get(admin, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": ENABLED}})
    cluster1.reset_requests()
    cache = WatchCache(webhook_client).start()
    pool = WorkerPool(cache, cert_file, key_file, workers=2, log_level="warning")
    try:
        pool.start()
        cluster1.register_service(SYSTEM_NS, SERVICE_NAME, 443, pool.url)
        for pid in pool.pids():
            with only(pool, pid), httpx.Client(verify=False) as c:
                wait_for(lambda: c.get(pool.url + "/readyz").status_code == 200, what=f"worker {pid} synced")
        calls = [(r.verb, r.resource) for r in cluster1.requests if r.user == WEBHOOK_USER]
        # One LIST and one WATCH per watched resource, for the pod, whatever the number of workers.
        watched = {api.PLURAL, "namespaces", "configmaps"}
        assert sorted(calls) == sorted([(verb, r) for r in watched for verb in ("list", "watch")]), calls

        # An import created now reaches every worker through the watch: no API call per request.
        create_or_get(admin, _import(ns, "watched"))
        for pid in pool.pids():
            with only(pool, pid):
                wait_for(lambda: _mounted(admin, ns, "watched"), what=f"worker {pid} to know the import")
        cluster1.reset_requests()
        for pid in pool.pids():
            with only(pool, pid):
                assert _mounted(admin, ns, "watched")
        assert [r for r in cluster1.requests if r.user == WEBHOOK_USER] == []
    finally:
        pool.stop()
        cache.stop()


def _import(namespace: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterName": "cluster2", "namespace": "default", "name": "pod-lister"},
    }


def _mounted(admin: Any, namespace: str, name: str) -> bool:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"pod-{time.monotonic_ns()}", "namespace": namespace},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
    }
    pod["metadata"]["annotations"] = {api.IMPORT_ANNOTATION: name}
    try:
        created = kube.Resource(admin, kube.PODS).create(pod, namespace)
    except ApiException:
        return False
    return any("secret" in volume for volume in created["spec"].get("volumes") or [])
