"""The webhook's HTTP application: POST /mutate-pods, /healthz, /readyz and /metrics (also on a port of their own,
see create_health_app).

The request path stays lean: a bare ASGI endpoint, body bytes in, `review.review` against the cache's dict-only
view, bytes out (FastAPI's request and validation layers cost as much as the review itself; the app is a plain
Starlette one: FastAPI's import alone is 15 MiB, a third of a serving worker's memory).
Only when the cache misses does the review complete in the thread pool, where it may ask the API server; bodies
too large to parse within a millisecond are parsed in a process of their own (webhook.parsing). The metrics are
webhook.metrics; the server that runs this app, webhook.server.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Callable, Mapping
from concurrent.futures.process import BrokenProcessPool
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from webhook import review
from webhook.metrics import Metrics
from webhook.mutation import ImportLookup, LookupWouldBlock, TooMuchWork
from webhook.parsing import ParsingProcess

log = logging.getLogger(__name__)

JSON_TYPE = "application/json"
MUTATE_PATH = "/mutate-pods"


class WebhookCache(ImportLookup, Protocol):
    """What the app needs from its cache (webhook.cache.WatchCache, or StaticCache in tests)."""

    @property
    def has_synced(self) -> bool: ...

    def cached(self) -> ImportLookup: ...

    def before(self, deadline: float) -> ImportLookup: ...

    def misses(self) -> Mapping[str, int]: ...


class _Disconnected(Exception):
    """The client went away before sending the whole body: there is no one to answer."""


# Bodies up to this size are parsed on the event loop: the costliest JSON of this size (many tiny objects) parses
# in well under a millisecond. Larger ones are parsed in a process of their own (webhook.parsing), which the GIL
# cannot tie to the event loop. Pods that need more mounts than INLINE_MAX_MOUNTS (imports x containers) go there
# too.
INLINE_BODY_BYTES = 16 * 1024
INLINE_MAX_MOUNTS = 256
# kube-apiserver sends ?timeout=<timeoutSeconds>s; answer (or give up) a little before it does.
DEFAULT_TIMEOUT_SECONDS = 10.0
MAX_TIMEOUT_SECONDS = 30.0
_TIMEOUT_MARGIN_SECONDS = 0.25
_TIMEOUT_QUERY = re.compile(rb"(?:^|&)timeout=(\d{1,3})s(?:&|$)")


def request_timeout(query_string: bytes) -> float:
    """The caller's timeout in seconds, from the ?timeout=Ns that kube-apiserver adds (10 if absent)."""
    if len(query_string) <= 32:  # kube-apiserver sends the same short one every time: parsed once
        return _short_request_timeout(query_string)
    return _request_timeout(query_string)


def _request_timeout(query_string: bytes) -> float:
    match = _TIMEOUT_QUERY.search(query_string)
    seconds = float(match.group(1)) if match else DEFAULT_TIMEOUT_SECONDS
    return min(max(seconds, 1.0), MAX_TIMEOUT_SECONDS)


_short_request_timeout = functools.lru_cache(maxsize=64)(_request_timeout)


async def _read_body(
    first: Message, receive: Receive, first_limit: int, slots: asyncio.Semaphore
) -> tuple[bytes | None, bool]:
    """(body, holds_slot): the body from its first message on, or None if larger than review.MAX_BODY_BYTES (read
    no further than that). Past `first_limit` bytes the reader takes one of the `slots` for large bodies (released
    by the caller)."""
    chunks: list[bytes] = []
    size = 0
    holds_slot = False
    message = first
    try:
        while True:
            if message["type"] != "http.request":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > review.MAX_BODY_BYTES:
                return None, holds_slot
            if size > first_limit and not holds_slot:
                await slots.acquire()
                holds_slot = True
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), holds_slot
            message = await receive()
    except BaseException:
        if holds_slot:
            slots.release()
        raise


_JSON_HEADERS = [(b"content-type", JSON_TYPE.encode())]
_TOO_LARGE = review.bad_request(
    f"The request body is larger than {review.MAX_BODY_BYTES} bytes; send a single AdmissionReview."
)
_TOO_SLOW = review.bad_request(
    "The request body did not arrive within the request's timeout; send it at once (kube-apiserver does)."
)


REASON_TIMEOUT = "Timeout"


def _timed_out(pending: review.Pending) -> review.Answer:
    message = "The webhook could not answer within the API server's timeout; retry."
    return review.refusal(pending.api_version, pending.uid, REASON_TIMEOUT, message, code=503)


class _MutatePods:
    """POST /mutate-pods as a plain ASGI endpoint: no request object, no validation layer, bytes in and out.

    Work per request is bounded: the body by review.MAX_BODY_BYTES and the caller's timeout; parsing by the
    body's size (large ones in a worker process); lookups by one API call per kind, ending by the deadline.
    """

    def __init__(self, cache: WebhookCache, metrics: Metrics) -> None:
        self.cache = cache
        self.cached = cache.cached()
        self.metrics = metrics
        self.parser = ParsingProcess()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        deadline = time.monotonic() + request_timeout(scope.get("query_string", b"")) - _TIMEOUT_MARGIN_SECONDS
        for name, value in scope["headers"]:
            if name == b"content-length":
                if value.isdigit() and int(value) > review.MAX_BODY_BYTES:
                    await self._send(send, _TOO_LARGE)
                    return
                break
        message = await receive()
        if message["type"] != "http.request":
            return
        if message.get("more_body", False) or len(message.get("body", b"")) > INLINE_BODY_BYTES:
            await self._large(message, receive, send, deadline)
            return
        # The usual request: a small body that came whole, reviewed right here (well under a millisecond), without
        # a coroutine per step unless it must wait (a large pod parsed elsewhere, a cache miss).
        started = time.perf_counter()
        body = message.get("body", b"")
        try:
            parsed = review.parse(body, max_mounts=INLINE_MAX_MOUNTS)
        except TooMuchWork:
            answer = await self._elsewhere(body, deadline, take_slot=True)
        else:
            answer = self._decided_here(parsed)
            if answer is None:
                answer = await self._complete_off_loop(parsed, deadline)
        self.metrics.record(answer, time.perf_counter() - started)
        await self._send(send, answer)

    async def _large(self, first: Message, receive: Receive, send: Send, deadline: float) -> None:
        """A body in several parts or over INLINE_BODY_BYTES: read it by the deadline and parse it elsewhere."""
        slots = self.parser.slots
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                body, holds_slot = await _read_body(first, receive, INLINE_BODY_BYTES, slots)
        except _Disconnected:
            return
        except TimeoutError:
            self.metrics.record(_TOO_SLOW, 0.0)
            await self._send(send, _TOO_SLOW)
            return
        started = time.perf_counter()
        try:
            if body is None:
                answer = _TOO_LARGE
            elif holds_slot:
                answer = await self._elsewhere(body, deadline, take_slot=False)
            else:  # came in parts, yet small
                answer = await self._review_small(body, deadline)
        finally:
            if holds_slot:
                slots.release()
        self.metrics.record(answer, time.perf_counter() - started)
        await self._send(send, answer)

    async def _review_small(self, body: bytes, deadline: float) -> review.Answer:
        """Parse a small body right here unless it asks too much work (many mounts); then parse it elsewhere."""
        try:
            parsed = review.parse(body, max_mounts=INLINE_MAX_MOUNTS)
        except TooMuchWork:
            return await self._elsewhere(body, deadline, take_slot=True)
        return await self._complete(parsed, deadline)

    async def _elsewhere(self, body: bytes, deadline: float, *, take_slot: bool) -> review.Answer:
        """Parse in the worker process (taking a large-body slot first if the caller holds none), then complete."""
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                if take_slot:
                    async with self.parser.slots:
                        parsed = await self.parser.parse(body)
                else:
                    parsed = await self.parser.parse(body)
        except TimeoutError:
            return review.bad_request("The webhook could not parse the request within its timeout; retry.")
        except (BrokenProcessPool, OSError) as exc:
            log.error("the webhook's parsing process failed (%s); it is restarted for the next large request", exc)
            return review.bad_request("The webhook could not parse this large request; retry.")
        return await self._complete(parsed, deadline)

    async def _complete(self, parsed: review.Answer | review.Pending, deadline: float) -> review.Answer:
        answer = self._decided_here(parsed)
        return answer if answer is not None else await self._complete_off_loop(parsed, deadline)

    def _decided_here(self, parsed: review.Answer | review.Pending) -> review.Answer | None:
        """The answer if the cache alone decides it, on the loop and without a wait; None if it must wait."""
        if isinstance(parsed, review.Answer):
            return parsed
        try:
            return review.complete(parsed, self.cached)
        except LookupWouldBlock:
            return None

    async def _complete_off_loop(self, parsed: review.Pending, deadline: float) -> review.Answer:
        """Not in the cache yet: decide in a worker thread, where the cache may ask the API server (with calls
        that end by the deadline, so that no work outlives the caller's patience)."""
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                return await run_in_threadpool(review.complete, parsed, self.cache.before(deadline))
        except TimeoutError:
            return _timed_out(parsed)

    @staticmethod
    async def _send(send: Send, answer: review.Answer) -> None:
        headers = [*_JSON_HEADERS, (b"content-length", str(len(answer.body)).encode())]
        await send({"type": "http.response.start", "status": answer.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body})


def _loop_time(monotonic_deadline: float) -> float:
    """A time.monotonic() deadline on the running loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_deadline - time.monotonic())


class _WebhookApp(Starlette):
    """Starlette, except that POST /mutate-pods goes straight to its endpoint, without the middleware stack."""

    mutate_pods: _MutatePods

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == MUTATE_PATH and scope["method"] == "POST":
            await self.mutate_pods(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def _health_routes(webhook: Starlette, cache: WebhookCache, tls_ready: Callable[[], bool] | None) -> list[Route]:
    """/healthz, /readyz and /metrics of `webhook` (its state, its cache, its metrics), for any app to serve."""

    async def healthz(request: Request) -> Response:
        return Response(b"ok", media_type="text/plain")

    async def readyz(request: Request) -> Response:
        problems = []
        if webhook.state.draining:
            problems.append("shutting down")
        if not cache.has_synced:
            problems.append("the cache of ServiceAccountImports and namespaces has not synced yet")
        if tls_ready is not None and not tls_ready():
            problems.append("no serving certificate is loaded yet")
        if problems:
            return Response(("not ready: " + "; ".join(problems)).encode(), status_code=503, media_type="text/plain")
        return Response(b"ok", media_type="text/plain")

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(webhook.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]


def create_health_app(webhook: Starlette) -> Starlette:
    """/healthz, /readyz and /metrics of `webhook` alone, for a port of their own (kubelet and Prometheus reach
    it even while clients hold every connection of the webhook's port)."""
    return Starlette(routes=_health_routes(webhook, webhook.state.cache, webhook.state.tls_ready))


def create_app(
    cache: WebhookCache,
    *,
    tls_ready: Callable[[], bool] | None = None,
    exposition: CollectorRegistry | None = None,
) -> Starlette:
    """The webhook application over this cache; `tls_ready` tells /readyz whether a certificate is loaded;
    `exposition` is what /metrics serves instead of this app's own registry (a serving worker of several gives
    every worker's metrics, prometheus_client's multiprocess mode)."""
    metrics = Metrics(cache)
    mutate_pods = _MutatePods(cache, metrics)
    app = _WebhookApp()
    # The hot path: a bare ASGI endpoint, reached before any middleware or routing (see _WebhookApp).
    app.router.routes.append(Route(MUTATE_PATH, mutate_pods, methods=["POST"]))  # for the route listing
    app.router.routes.extend(_health_routes(app, cache, tls_ready))
    app.mutate_pods = mutate_pods
    if exposition is not None:
        metrics.registry = exposition
    app.state.metrics = metrics
    app.state.draining = False
    app.state.cache = cache
    app.state.tls_ready = tls_ready
    app.state.parser = mutate_pods.parser
    return app
