"""The webhook on every core: this process watches the cluster once, N serving workers share the listening socket.

The GIL keeps one Python process on one core, so `kubemcsa-webhook --workers N` serves from N processes
(webhook.worker), started fresh (not forked: they never import the Kubernetes client, and each holds a bare
server's memory). They share one socket, bound and listened on here and inherited: the kernel hands each new
connection to whichever worker accepts it first, and a connection waiting in the backlog while a worker dies is
taken by another.

The watch stays here, in one copy: the WatchCache's three informers (one LIST and one WATCH each, whatever N),
whose changes are sent to every worker over its own socket pair, after a snapshot of everything known when the
worker starts. A worker answers from its copy on its event loop; what its copy misses it asks here (the API call,
if one is needed, is made by this process's cache: one per namespace and kind at a time across all workers).
A reply is sent after every change this process had seen, so the worker's copy is never older than the answer.

Each worker reloads the certificate files by itself (kubemcsa.certificates.reloader, every 2 s) and keeps the request
read
deadline and connection cap of webhook.connections. Metrics: prometheus_client's multiprocess mode, every worker
writing its counters to files in one directory (memory, /dev/shm by default), which /metrics on any worker adds up;
the counts of a worker that died stay in the sums. A worker that dies is replaced (after a back-off if it dies
young); SIGTERM drains them all, then stops them, each finishing its requests in flight.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

from webhook import connections
from webhook.lookups import Change, LookupReply, Snapshot

log = logging.getLogger(__name__)

DEFAULT_MAX_WORKERS = 4
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Misses answered here at once, across all workers (each may make one API call of at most its caller's timeout).
LOOKUP_THREADS = 8
# A worker that dies within this many seconds of its start is restarted after a growing delay (up to the max).
YOUNG_SECONDS = 10.0
MAX_RESTART_DELAY_SECONDS = 30.0
_BACKLOG = 2048  # uvicorn's default


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (0: a free port), inheritable so that serving workers can share it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio sets TCP_NODELAY on accepted connections only then (without it, Nagle and
    # delayed ACKs add 40 ms to every answer sent in two writes).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def cpu_quota(cpu_max: str) -> float | None:
    """CPUs allowed by a cgroup v2 `cpu.max` ("max 100000", "150000 100000"), or None when unlimited or unreadable."""
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _cgroup_cpu_quota() -> float | None:
    with contextlib.suppress(OSError):
        return cpu_quota(Path("/sys/fs/cgroup/cpu.max").read_text())
    with contextlib.suppress(OSError, ValueError):  # cgroup v1
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    return None


def available_cores() -> int:
    """The CPUs this process may use: its affinity, less if the cgroup's CPU quota (the pod's limit) says so."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def default_workers() -> int:
    return min(available_cores(), DEFAULT_MAX_WORKERS)


class FeedSource(Protocol):
    """What the pool needs from a cache (webhook.cache.WatchCache, or webhook.lookups.StaticCache)."""

    changes: Any  # a lock, held while a change is applied and told

    def subscribe(self, listener: Callable[[Change], None]) -> Snapshot: ...

    def unsubscribe(self, listener: Callable[[Change], None]) -> None: ...

    def answer(self, kind: str, namespace: str, names: Sequence[str], deadline: float) -> LookupReply: ...

    def wait_for_sync(self, timeout: float | None = None) -> bool: ...


@dataclass
class _Worker:
    slot: int
    process: subprocess.Popen[bytes]
    channel: Connection
    started: float = field(default_factory=time.monotonic)
    ready: threading.Event = field(default_factory=threading.Event)
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    listener: Callable[[Change], None] | None = None

    def send(self, message: object) -> None:
        """Send, or drop if the worker is gone (its reader thread then sees the end and replaces it)."""
        with self.send_lock, contextlib.suppress(OSError, ValueError):
            self.channel.send(message)


class WorkerPool:
    """`count` serving workers on host:port, fed by `cache`: `WorkerPool(cache, cert, key, workers=2).start()`.

    Port 0 picks a free port (see `.url`). The cache is the caller's to start and stop.
    """

    def __init__(
        self,
        cache: FeedSource,
        cert_file: str | os.PathLike[str],
        key_file: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        workers: int = 2,
        reload_interval: float = 2.0,
        graceful_timeout: float = 10.0,
        limits: connections.ConnectionLimits = connections.DEFAULT_LIMITS,
        health_port: int | None = None,
        health_host: str | None = None,
        metrics_dir: str | os.PathLike[str] | None = None,
        log_level: str = "info",
    ) -> None:
        if workers < 1:
            raise ValueError("a WorkerPool needs at least one worker")
        self.cache = cache
        self.cert_file = str(cert_file)
        self.key_file = str(key_file)
        self.host = host
        self.port = port
        self.count = workers
        self.reload_interval = reload_interval
        self.graceful_timeout = graceful_timeout
        self.limits = limits
        self.health_port = health_port
        self.health_host = health_host if health_host is not None else host
        self.log_level = log_level
        self._metrics_dir = Path(metrics_dir) if metrics_dir is not None else None
        self._own_metrics_dir = metrics_dir is None
        self._socket: socket.socket | None = None
        self._health_socket: socket.socket | None = None
        self._workers: dict[int, _Worker] = {}
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._lookups = concurrent.futures.ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="webhook-lookup")
        self._threads: list[threading.Thread] = []
        self.restarts = 0

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    @property
    def health_url(self) -> str:
        """The shared health port's base URL (/healthz, /readyz, /metrics in plain HTTP), once started."""
        host = f"[{self.health_host}]" if ":" in self.health_host else self.health_host
        return f"http://{host}:{self.health_port}"

    @property
    def metrics_dir(self) -> Path | None:
        return self._metrics_dir

    def pids(self) -> list[int]:
        """The serving workers' process ids, by slot."""
        with self._lock:
            return [worker.process.pid for _, worker in sorted(self._workers.items())]

    def start(self, timeout: float = 60.0) -> WorkerPool:
        # Unusable files fail here, with OpenSSL's reason, rather than as N workers exiting.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.cert_file, self.key_file)
        self._socket = listening_socket(self.host, self.port)
        self._socket.listen(_BACKLOG)  # connections wait in the backlog while no worker is up yet
        self.port = self._socket.getsockname()[1]
        if self.health_port is not None:  # shared the same way: any worker answers the probes and the scrapes
            self._health_socket = listening_socket(self.health_host, self.health_port)
            self._health_socket.listen(_BACKLOG)
            self.health_port = self._health_socket.getsockname()[1]
        self._prepare_metrics_dir()
        synced = threading.Thread(target=self._tell_synced, name="webhook-feed-synced", daemon=True)
        synced.start()
        self._threads.append(synced)
        for slot in range(self.count):
            self._spawn(slot)
        deadline = time.monotonic() + timeout
        for slot in range(self.count):
            while not self._workers[slot].ready.wait(0.05):
                worker = self._workers[slot]
                if worker.process.poll() is not None or time.monotonic() > deadline:
                    code = worker.process.poll()
                    self.stop()
                    why = f"exited with code {code}" if code is not None else "did not start in time"
                    raise RuntimeError(f"webhook worker {slot} {why}; see its log above")
        log.info("serving the webhook on %s with %d workers (pids %s)", self.url, self.count, self.pids())
        return self

    def _prepare_metrics_dir(self) -> None:
        if self._metrics_dir is None:
            shm = Path("/dev/shm")  # noqa: S108 (memory; writable under a read-only root filesystem)
            base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
            self._metrics_dir = Path(tempfile.mkdtemp(prefix="kubemcsa-webhook-metrics-", dir=base))
        else:
            self._metrics_dir.mkdir(parents=True, exist_ok=True)
            for stale in self._metrics_dir.glob("*.db"):  # a previous run's counts are not this one's
                stale.unlink()

    def _tell_synced(self) -> None:
        while not self._stopping.is_set():
            if self.cache.wait_for_sync(1.0):
                with self.cache.changes:
                    for worker in list(self._workers.values()):
                        worker.send(("synced",))
                return

    def _spawn(self, slot: int) -> _Worker:
        assert self._socket is not None and self._metrics_dir is not None
        ours, theirs = socket.socketpair()
        config = {
            "slot": slot,
            "listen_fd": self._socket.fileno(),
            "channel_fd": theirs.fileno(),
            "cert_file": self.cert_file,
            "key_file": self.key_file,
            "host": self.host,
            "port": self.port,
            "reload_interval": self.reload_interval,
            "graceful_timeout": self.graceful_timeout,
            "limits": asdict(self.limits),
            "health_fd": self._health_socket.fileno() if self._health_socket is not None else None,
            "health_host": self.health_host,
            "health_port": self.health_port,
            "log_level": self.log_level,
        }
        env = {**os.environ, MULTIPROCESS_ENV: str(self._metrics_dir)}
        shared = () if self._health_socket is None else (self._health_socket.fileno(),)
        # A session of its own: a Ctrl-C on the terminal reaches this process, which drains the workers first.
        process = subprocess.Popen(
            [sys.executable, "-m", "webhook.worker", json.dumps(config)],
            pass_fds=(self._socket.fileno(), theirs.fileno(), *shared),
            start_new_session=True,
            env=env,
        )
        theirs.close()
        worker = _Worker(slot, process, Connection(ours.detach()))
        worker.listener = worker.send
        with self.cache.changes:  # the snapshot, then every later change, in order
            worker.send(("snapshot", self.cache.subscribe(worker.listener)))
        with self._lock:
            self._workers[slot] = worker
        reader = threading.Thread(target=self._read, args=(worker,), name=f"webhook-worker-{slot}", daemon=True)
        reader.start()
        self._threads.append(reader)
        return worker

    def _read(self, worker: _Worker) -> None:
        """The worker's messages (ready, lookups) until it is gone; then replace it unless stopping."""
        while True:
            try:
                message = worker.channel.recv()
            except (EOFError, OSError):
                break
            if message[0] == "ready":
                worker.ready.set()
            elif message[0] == "lookup":
                _, request_id, kind, namespace, names, seconds = message
                deadline = time.monotonic() + min(float(seconds), 30.0)
                with contextlib.suppress(RuntimeError):  # (shut down: the worker's lookup times out)
                    self._lookups.submit(self._answer, worker, request_id, kind, namespace, names, deadline)
        if worker.listener is not None:
            self.cache.unsubscribe(worker.listener)
        with contextlib.suppress(OSError):
            worker.channel.close()
        code = worker.process.wait()
        if self._stopping.is_set():
            return
        lived = time.monotonic() - worker.started
        pid = worker.process.pid
        log.error("webhook worker %d (pid %d) exited with code %s; starting another", worker.slot, pid, code)
        delay = 0.0 if lived > YOUNG_SECONDS else min(MAX_RESTART_DELAY_SECONDS, 2.0 ** min(self.restarts, 5))
        if self._stopping.wait(delay):
            return
        with self._lock:  # (held while spawning: stop() then sees the new worker, or this sees stop)
            if self._stopping.is_set():
                return
            self.restarts += 1
            self._spawn(worker.slot)

    def _answer(
        self, worker: _Worker, request_id: int, kind: str, namespace: str, names: list[str], deadline: float
    ) -> None:
        reply = self.cache.answer(kind, namespace, names, deadline)
        with self.cache.changes:  # after every change this answer could have seen
            worker.send(("answer", request_id, reply))

    def drain(self) -> None:
        """Turn every worker's readiness off (the first step of a graceful stop)."""
        with self._lock:
            current = list(self._workers.values())
        for worker in current:
            worker.send(("drain",))

    def stop(self) -> None:
        """Stop every worker (each finishes its requests in flight, up to graceful_timeout), then clean up."""
        self._stopping.set()
        with self._lock:
            current = list(self._workers.values())
        for worker in current:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.graceful_timeout + 5
        for worker in current:
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("webhook worker %d did not stop in time; killing it", worker.slot)
                worker.process.kill()
                worker.process.wait()
        for thread in self._threads:
            thread.join(5)
        self._lookups.shutdown(wait=False, cancel_futures=True)
        for sock in (self._socket, self._health_socket):
            if sock is not None:
                sock.close()
        if self._own_metrics_dir and self._metrics_dir is not None:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    def __enter__(self) -> WorkerPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
