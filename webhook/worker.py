"""One serving worker of `kubemcsa-webhook --workers N`, started by webhook.workers (not a command of its own).

    python -m webhook.worker CONFIG_JSON   # with the listening socket and its channel as inherited descriptors

It serves the webhook (webhook.server.WebhookServer: TLS with certificate reload, the request read deadline
and connection cap) on the socket its parent listens on, from a copy of the parent's cache that the parent keeps
up to date over the channel (FeedCache); what the copy misses it asks the parent. It never imports the
Kubernetes client. It exits on SIGTERM (after its requests in flight), or when its parent is gone.

Module-level imports stay few: the large-request parser (a spawned process) imports this module again.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from kubemcsa.contract.spec import FederatedImport
from webhook.lookups import (
    MISS_IMPORT,
    MISS_NAMESPACE,
    RECENT_SECONDS,
    CacheView,
    LookupReply,
    Recent,
    Snapshot,
)
from webhook.mutation import FederatedRefusal, ImportLookup, LookupFailed, LookupWouldBlock, ProjectedToken

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from webhook.server import WebhookServer

# Never wait longer than this for the parent's answer (the caller's own deadline is usually shorter).
MAX_LOOKUP_SECONDS = 30.0


class FeedCache:
    """The parent's cache, copied: a snapshot, then every change in order; misses are asked of the parent.

    Implements what webhook.app needs of a cache. `on_drain` and `on_closed` are called (on the feed's thread)
    when the parent asks for a drain, and when the channel ends.
    """

    def __init__(self, channel: Connection, *, count_miss: Callable[[str], None] | None = None) -> None:
        self._channel = channel
        self._send_lock = threading.Lock()
        self._imports: dict[tuple[str, str], FederatedImport | None] = {}
        self._unowned: dict[tuple[str, str], str] = {}
        self._namespaces: dict[str, Mapping[str, str]] = {}
        self._audiences: dict[str, tuple[str, ...]] = {}
        self._recent_imports = Recent(RECENT_SECONDS)
        self._recent_namespaces = Recent(RECENT_SECONDS)
        self._synced = False
        self._view = CacheView(self)
        self._pending: dict[int, concurrent.futures.Future[LookupReply]] = {}
        self._ids = itertools.count()
        self._misses = {MISS_IMPORT: 0, MISS_NAMESPACE: 0}
        self._count_miss = count_miss
        self._closed = False
        self.on_drain: Callable[[], None] = lambda: None
        self.on_closed: Callable[[], None] = lambda: None
        self._thread: threading.Thread | None = None

    def receive_snapshot(self) -> None:
        """Wait for the parent's snapshot (its first message) and start following the changes."""
        message = self._channel.recv()
        if message[0] != "snapshot":
            raise RuntimeError(f"the webhook's parent process sent {message[0]!r} before its snapshot")
        snapshot: Snapshot = message[1]
        self._imports, self._unowned = snapshot.imports, snapshot.unowned
        self._namespaces, self._audiences = snapshot.namespaces, snapshot.audiences
        self._synced = snapshot.synced
        self._thread = threading.Thread(target=self._follow, name="webhook-feed", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        while True:
            try:
                message = self._channel.recv()
            except (EOFError, OSError):
                break
            self._apply(message)
        self._closed = True
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(LookupFailed(_gone()))
        self.on_closed()

    def _apply(self, message: tuple[Any, ...]) -> None:
        # Single dict operations: atomic under the GIL for the event loop that reads them.
        kind = message[0]
        if kind == "import":
            _, key, value, unowned = message
            if unowned is None:
                self._unowned.pop(key, None)
            else:
                self._unowned[key] = unowned  # before the import is seen: never mountable in between
            self._imports[key] = value
        elif kind == "import-deleted":
            self._imports.pop(message[1], None)
            self._unowned.pop(message[1], None)
        elif kind == "namespace":
            self._namespaces[message[1]] = message[2]
        elif kind == "namespace-deleted":
            self._namespaces.pop(message[1], None)
        elif kind == "audiences":
            self._audiences = message[1]
        elif kind == "synced":
            self._synced = True
        elif kind == "answer":
            self._answered(message[1], message[2])
        elif kind == "drain":
            self.on_drain()

    def _answered(self, request_id: int, reply: LookupReply) -> None:
        if reply.recent is not None:
            recent = self._recent_namespaces if reply.kind == MISS_NAMESPACE else self._recent_imports
            recent.put(reply.namespace, reply.recent, reply.ttl)
        for kind in reply.asked:
            self._misses[kind] += 1
            if self._count_miss is not None:
                self._count_miss(kind)
        future = self._pending.get(request_id)
        if future is not None and not future.done():
            future.set_result(reply)

    def send(self, message: object) -> None:
        with self._send_lock:
            self._channel.send(message)

    def ask(self, kind: str, namespace: str, names: Sequence[str], deadline: float) -> LookupReply:
        """The parent's answer to a miss, by `deadline` (time.monotonic()); raises LookupFailed."""
        what = f'namespace "{namespace}"' if kind == MISS_NAMESPACE else f'ServiceAccountImports in "{namespace}"'
        left = min(deadline - time.monotonic(), MAX_LOOKUP_SECONDS)
        if left <= 0.05:
            raise LookupFailed(f"The webhook could not look up {what}: no time left before the API server's timeout.")
        if self._closed:
            raise LookupFailed(_gone())
        request_id = next(self._ids)
        future: concurrent.futures.Future[LookupReply] = concurrent.futures.Future()
        self._pending[request_id] = future
        try:
            try:
                self.send(("lookup", request_id, kind, namespace, list(names), left))
                reply = future.result(timeout=left)
            except (OSError, ValueError):
                raise LookupFailed(_gone()) from None
            except concurrent.futures.TimeoutError:
                raise LookupFailed(
                    f"The webhook could not look up {what} in time (its watching process did not answer); retry."
                ) from None
        finally:
            self._pending.pop(request_id, None)
        if reply.error is not None:
            raise LookupFailed(reply.error)
        return reply

    # What webhook.app needs of a cache.
    @property
    def has_synced(self) -> bool:
        return self._synced

    def cached(self) -> ImportLookup:
        return self._view

    def before(self, deadline: float) -> ImportLookup:
        return _AskParent(self, deadline)

    def misses(self) -> dict[str, int]:
        return dict(self._misses)

    def namespace_labels(self, namespace: str) -> Mapping[str, str] | None:
        return self.before(time.monotonic() + MAX_LOOKUP_SECONDS).namespace_labels(namespace)

    def missing_imports(self, namespace: str, names: Sequence[str]) -> list[str]:
        return self.before(time.monotonic() + MAX_LOOKUP_SECONDS).missing_imports(namespace, names)

    def federated_imports(self, namespace: str, names: Sequence[str]) -> dict[str, ProjectedToken | FederatedRefusal]:
        return self._view.federated_imports(namespace, names)

    def unowned_secrets(self, namespace: str, names: Sequence[str]) -> dict[str, str]:
        return self._view.unowned_secrets(namespace, names)


class _AskParent:
    """The copy's lookups that ask the parent on a miss (once per request and kind), within a deadline."""

    def __init__(self, cache: FeedCache, deadline: float) -> None:
        self._cache = cache
        self._deadline = deadline

    def namespace_labels(self, namespace: str) -> Mapping[str, str] | None:
        try:
            return self._cache._view.namespace_labels(namespace)
        except LookupWouldBlock:
            pass
        return self._cache.ask(MISS_NAMESPACE, namespace, (), self._deadline).value  # type: ignore[return-value]

    def missing_imports(self, namespace: str, names: Sequence[str]) -> list[str]:
        try:
            return self._cache._view.missing_imports(namespace, names)
        except LookupWouldBlock:
            pass
        return list(self._cache.ask(MISS_IMPORT, namespace, names, self._deadline).value)  # type: ignore[call-overload]

    def federated_imports(self, namespace: str, names: Sequence[str]) -> dict[str, ProjectedToken | FederatedRefusal]:
        return self._cache._view.federated_imports(namespace, names)

    def unowned_secrets(self, namespace: str, names: Sequence[str]) -> dict[str, str]:
        return self._cache._view.unowned_secrets(namespace, names)


def _gone() -> str:
    return "The webhook's watching process is gone, so a lookup could not be made; retry (it is being restarted)."


def main(argv: Sequence[str] | None = None) -> int:
    import json
    import logging
    import os
    import signal
    import sys

    config = json.loads((argv if argv is not None else sys.argv[1:])[0])
    logging.basicConfig(
        level=str(config.get("log_level", "info")).upper(),
        format=f"%(asctime)s %(levelname)s %(name)s[worker {config['slot']}]: %(message)s",
    )
    log = logging.getLogger("webhook.worker")
    # Imported only now, in the worker itself (not in the parser process that re-imports this module).
    from webhook.server import settle_garbage_collector

    exposition, count_miss = _shared_metrics()
    cache = FeedCache(Connection(config["channel_fd"]), count_miss=count_miss)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    try:
        cache.receive_snapshot()
    except (EOFError, OSError, RuntimeError) as exc:
        log.error("no snapshot from the webhook's parent process (%s); exiting", exc)
        return 1
    server = _server(config, cache, exposition)
    cache.on_drain = server.drain
    cache.on_closed = stop.set
    try:
        server.start()
        settle_garbage_collector()
    except (OSError, RuntimeError, ValueError) as exc:
        log.error("cannot serve (%s); exiting", exc)
        return 1
    try:
        server.app.state.parser.warm()
    except (OSError, RuntimeError) as exc:
        log.warning("the process for large requests could not start yet (%s); it is retried on use", exc)
    cache.send(("ready", os.getpid()))
    code = 0
    while not stop.wait(1.0):
        if server._thread is not None and not server._thread.is_alive():
            log.error("the HTTP server stopped unexpectedly; exiting so that the parent starts another")
            code = 1
            break
    server.stop()
    return code


def _shared_metrics() -> tuple[CollectorRegistry | None, Callable[[str], None] | None]:
    """With PROMETHEUS_MULTIPROC_DIR (set by webhook.workers): what /metrics serves (every worker's metrics added
    up) and how this worker counts a miss; else (None, None), this worker's own registry."""
    import os

    from prometheus_client import CollectorRegistry, Counter, multiprocess

    from webhook.metrics import CACHE_MISSES, CACHE_MISSES_HELP

    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None, None
    exposition = CollectorRegistry()
    multiprocess.MultiProcessCollector(exposition)
    # Counted by the worker whose request missed (the parent makes the call); added up across workers.
    misses = Counter(CACHE_MISSES, CACHE_MISSES_HELP, ["kind"], registry=None)
    return exposition, lambda kind: misses.labels(kind).inc()


def _server(config: Mapping[str, Any], cache: FeedCache, exposition: CollectorRegistry | None) -> WebhookServer:
    """The webhook server on the sockets inherited from the parent, as its `config` says."""
    import socket

    from webhook.connections import ConnectionLimits
    from webhook.server import WebhookServer

    health_fd = config["health_fd"]
    return WebhookServer(
        None,
        config["cert_file"],
        config["key_file"],
        host=config["host"],
        port=config["port"],
        cache=cache,
        reload_interval=config["reload_interval"],
        graceful_timeout=config["graceful_timeout"],
        limits=ConnectionLimits(**config["limits"]),
        health_port=config["health_port"],
        health_host=config["health_host"],
        health_socket=socket.socket(fileno=health_fd) if health_fd is not None else None,
        listen_socket=socket.socket(fileno=config["listen_fd"]),
        exposition=exposition,
    )


if __name__ == "__main__":
    import sys

    sys.exit(main())
