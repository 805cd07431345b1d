"""The lean request path, for the calls the controller makes per import: plain JSON (no model serialization, no
per-request proxy lookup), with the official client's configuration, pool and errors.

Two ways down. `lean_request` goes through the official client's urllib3 pool as its REST client would, and returns
an unread response (a watch behind a proxy). `json_request` reads the whole answer, `stream_request` (a watch) its
head, leaving its body to be read a line at a time as it arrives: with a plain PoolManager (no proxy)
it speaks HTTP/1.1 itself (kubemcsa.client.http11) on the sockets of that same urllib3 pool, which at the API
server's answer sizes costs a fraction of http.client's header objects and buffered files. What it keeps of urllib3:
the pool's connections (its TLS settings, CA, client certificate, hostname checks, socket options, size bound and
close()), its dropped-connection check before reuse, its Retry decisions (the configuration's `retries`) and its
exception types, raised where urllib3 raises them; of the REST client, the ApiException with status 0 for a TLS
failure. What it adds: a kept-alive socket the server closed as the request went out is replaced by a fresh one, once,
when that cannot repeat a side effect (see `_attempt`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPException
from socket import timeout as SocketTimeout
from ssl import SSLEOFError, SSLZeroReturnError
from ssl import SSLError as BaseSSLError
from typing import Any, NamedTuple
from urllib.parse import quote, urlencode

import urllib3
from kubernetes.client import ApiClient, rest
from kubernetes.client.exceptions import ApiException
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.exceptions import (
    HTTPError,
    MaxRetryError,
    ProtocolError,
    ProxyError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.exceptions import TimeoutError as Urllib3TimeoutError
from urllib3.util.retry import Retry
from urllib3.util.ssl_match_hostname import CertificateError

from kubemcsa import jsonwire
from kubemcsa.client import http11

# urlopen's own logger, for the retries it would log: the same logging configuration applies to them.
_urllib3_log = logging.getLogger("urllib3.connectionpool")

PATCH_CONTENT_TYPES = {
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
    "strategic": "application/strategic-merge-patch+json",
}

# Sent again on a fresh connection when a reused one turned out closed after the request went out whole: the server
# may have acted on it, so only methods without side effects (Go's net/http draws the same line).
SAFE_TO_RESEND = frozenset({"GET", "HEAD", "OPTIONS"})

# What urlopen hands to its Retry (anything else propagates as is).
_CONNECTION_FAILURES = (
    Urllib3TimeoutError,
    HTTPException,
    OSError,
    ProtocolError,
    BaseSSLError,
    SSLError,
    CertificateError,
    ProxyError,
)

# What a reused socket the server had closed gives before any byte of an answer.
_CLOSED = (ConnectionError, SSLEOFError, SSLZeroReturnError)

_SEND_ERRNOS_TO_READ_PAST = (errno.EPIPE, errno.ECONNRESET, errno.EPROTOTYPE)  # the answer may be there (urllib3)


@functools.lru_cache(maxsize=64)  # a Timeout is cloned by urllib3 for each request: one per value will do
def _timeout(value: float | tuple[float, float] | None) -> urllib3.Timeout | None:
    if not value:
        return None
    if isinstance(value, tuple):
        return urllib3.Timeout(connect=value[0], read=value[1])
    return urllib3.Timeout(total=value)


class _Timeouts(NamedTuple):
    """As urllib3.Timeout resolves a request's timeout: `total` bounds the connect, and the reads by what is left."""

    connect: float | None
    read: float | None
    total: float | None


@functools.lru_cache(maxsize=64)
def _timeouts(value: float | tuple[float, float] | None) -> _Timeouts:
    if not value:
        return _Timeouts(None, None, None)
    if isinstance(value, tuple):
        return _Timeouts(value[0], value[1], None)
    return _Timeouts(value, value, value)


@functools.lru_cache(maxsize=256)
def _parsed_host(host: str) -> tuple[str, str | None, str | None, int | None]:
    """(path prefix, scheme, host name, port) of a configuration's host URL, as the PoolManager would parse it."""
    parsed = urllib3.util.parse_url(host)
    return (parsed.path or "").rstrip("/"), parsed.scheme, parsed.host, parsed.port


def _prepared(
    api_client: ApiClient,
    method: str,
    path: str,
    query: list[tuple[str, Any]] | None,
    body: Any,
    content_type: str,
) -> tuple[dict[str, str], str, bytes | None]:
    """(headers, path with its query, JSON body) of a call, with the client's auth, cookie and default headers."""
    configuration = api_client.configuration
    headers = {**api_client.default_headers, "Accept": "application/json", "Content-Type": content_type}
    if api_client.cookie:
        headers["Cookie"] = api_client.cookie
    bearer = configuration.auth_settings().get("BearerToken")  # runs the refresh hook: a rotated token is read
    if bearer and bearer.get("value"):
        headers[bearer["key"]] = bearer["value"]
    pairs = [(k, v) for k, v in (query or []) if v is not None]
    if pairs:
        path += "?" + urlencode(pairs, quote_via=quote)
    if content_type == PATCH_CONTENT_TYPES["json"] and not isinstance(body, list):
        headers["Content-Type"] = PATCH_CONTENT_TYPES["strategic"]  # as the REST client does for such a body
    payload = None if body is None or method in ("GET", "HEAD") else jsonwire.dumps(body)
    return headers, path, payload


def _tls_failure(exc: SSLError) -> ApiException:
    """As the REST client reports a TLS failure: an ApiException without a status."""
    return ApiException(status=0, reason="\n".join([type(exc).__name__, str(exc)]))


def lean_request(
    api_client: ApiClient,
    method: str,
    path: str,
    *,
    query: list[tuple[str, Any]] | None = None,
    body: Any = None,
    content_type: str = "application/json",
    timeout: float | tuple[float, float] | None = None,
) -> rest.RESTResponse:
    """`method path` with a JSON body over `api_client`'s urllib3 pool, unread (see Resource); for streams."""
    configuration = api_client.configuration
    headers, path, payload = _prepared(api_client, method, path, query, body, content_type)
    pool_manager = api_client.rest_client.pool_manager
    try:
        if type(pool_manager) is urllib3.PoolManager:
            # Straight to the host's connection pool: the PoolManager's own layer parses the URL again and
            # handles redirects, which the API server does not send. A proxy's manager goes the full way.
            prefix, scheme, host, port = _parsed_host(configuration.host)
            pool = pool_manager.connection_from_host(host, port=port, scheme=scheme)
            response = pool.urlopen(
                method,
                prefix + path,
                body=payload,
                headers=headers,
                timeout=_timeout(timeout),
                preload_content=False,
                redirect=False,
                assert_same_host=False,
            )
        else:
            response = pool_manager.request(
                method,
                configuration.host + path,
                body=payload,
                headers=headers,
                timeout=_timeout(timeout),
                preload_content=False,
            )
    except SSLError as exc:
        raise _tls_failure(exc) from exc
    return rest.RESTResponse(response)


def json_request(
    api_client: ApiClient,
    method: str,
    path: str,
    *,
    query: list[tuple[str, Any]] | None = None,
    body: Any = None,
    content_type: str = "application/json",
    timeout: float | tuple[float, float] | None = None,
) -> LeanResponse | rest.RESTResponse:
    """`method path` as lean_request sends it, its answer read to the end (status, reason, data, headers as the
    REST client's response has them). Raises what lean_request and the response's read() would raise."""
    pool_manager = api_client.rest_client.pool_manager
    if type(pool_manager) is not urllib3.PoolManager:  # a proxy's (or a custom) manager: urllib3 all the way
        response = lean_request(
            api_client, method, path, query=query, body=body, content_type=content_type, timeout=timeout
        )
        response.read()
        return response
    target, exchange = _send(api_client, pool_manager, method, path, query, body, content_type, timeout)
    if isinstance(exchange, LeanResponse):
        return exchange
    return _finish(target.pool, exchange)


def stream_request(
    api_client: ApiClient,
    method: str,
    path: str,
    *,
    query: list[tuple[str, Any]] | None = None,
    timeout: float | tuple[float, float] | None = None,
) -> LeanStream | LeanResponse | rest.RESTResponse:
    """`method path` as json_request sends it, for an answer read as it arrives (a watch): a LeanStream for a 2xx
    answer, else the answer read whole (a LeanResponse). With a proxy's (or a custom) manager, lean_request's
    unread response."""
    pool_manager = api_client.rest_client.pool_manager
    if type(pool_manager) is not urllib3.PoolManager:
        return lean_request(api_client, method, path, query=query, timeout=timeout)
    target, exchange = _send(api_client, pool_manager, method, path, query, None, "application/json", timeout)
    if isinstance(exchange, LeanResponse):
        return exchange
    if not 200 <= exchange.head.status <= 299:
        return _finish(target.pool, exchange)
    return LeanStream(target.pool, exchange)


def _send(
    api_client: ApiClient,
    pool_manager: urllib3.PoolManager,
    method: str,
    path: str,
    query: list[tuple[str, Any]] | None,
    body: Any,
    content_type: str,
    timeout: float | tuple[float, float] | None,
) -> tuple[_Target, _Unread | LeanResponse]:
    """Send one request over the manager's pool and read its answer's head (the body is the caller's to read)."""
    headers, path, payload = _prepared(api_client, method, path, query, body, content_type)
    target = _target_of(pool_manager, api_client.configuration.host)
    url = target.prefix + path
    data = http11.request_bytes(method, url, target.host_header, headers, payload)
    try:
        return target, _round_trip(target, method, url, data, _timeouts(timeout))
    except SSLError as exc:
        raise _tls_failure(exc) from exc


# A stream's line (a watch event: one object) longer than this ends it: far above any object the API server stores
# (etcd holds 1.5 MiB), it only stops a runaway server from filling the memory.
MAX_LINE_BYTES = 64 * 1024 * 1024


class LeanStream:
    """A 2xx answer whose body is read a line at a time as it arrives (`lines`); `close()`, from any thread, ends
    it. Its connection goes back to the pool only if the body was read to its end, else it is closed."""

    def __init__(self, pool: HTTPConnectionPool, exchange: _Unread) -> None:
        self.status = exchange.head.status
        self._pool = pool
        self._exchange = exchange
        self._closed = False
        self._released = False

    def lines(self) -> Iterator[bytes]:
        """The body's non-empty lines (without their newline); the connection is released when they end. Raises
        MalformedResponse past MAX_LINE_BYTES or for a framing error, the socket's errors as they come."""
        head, reader, _ = self._exchange
        ended = False
        try:
            pending: list[bytes] = []
            size = 0
            for piece in http11.body_pieces(reader, head):
                if b"\n" not in piece:
                    pending.append(piece)
                    size += len(piece)
                    if size > MAX_LINE_BYTES:
                        raise http11.MalformedResponse(f"a line of the response exceeded {MAX_LINE_BYTES} bytes")
                    continue
                if pending:
                    piece = b"".join((*pending, piece))
                    pending, size = [], 0
                *complete, rest = piece.split(b"\n")
                for line in complete:
                    if line:
                        yield line
                if rest:
                    pending, size = [rest], len(rest)
            if pending:
                yield b"".join(pending)
            ended = True
        finally:
            self._release(reusable=ended and head.keep_alive and not reader.leftover)

    def close(self) -> None:
        """End the stream: a reader blocked in recv returns at once (as kubernetes.watch.Watch.stop does)."""
        self._closed = True
        sock = getattr(self._exchange.conn, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _release(self, *, reusable: bool) -> None:
        if self._released:  # (lines() read twice)
            return
        self._released = True
        conn = self._exchange.conn
        if reusable and not self._closed:
            self._pool._put_conn(conn)
        else:
            conn.close()
            self._pool._put_conn(None)


class LeanResponse:
    """A response read to its end, with what callers and ApiException read of rest.RESTResponse (and urllib3's Retry
    of urllib3's response)."""

    __slots__ = ("_head", "_headers", "data", "reason", "status")

    def __init__(self, head: http11.Head, data: bytes) -> None:
        self.status = head.status
        self.reason = head.reason
        self.data = data
        self._head = head
        self._headers: urllib3.HTTPHeaderDict | None = None

    def read(self) -> bytes:
        return self.data

    @property
    def headers(self) -> urllib3.HTTPHeaderDict:
        if self._headers is None:  # built when asked (an ApiException's text): most answers never are
            self._headers = urllib3.HTTPHeaderDict()
            for name, value in self._head.headers:
                self._headers.add(name, value)
        return self._headers

    def getheaders(self) -> urllib3.HTTPHeaderDict:
        return self.headers

    def getheader(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name, default)

    def get_redirect_location(self) -> str | bool:
        return self._head.redirect_location()


@dataclass(frozen=True)
class _Target:
    """One API server as a pool manager reaches it: its urllib3 pool, and what each request needs of it."""

    pool: HTTPConnectionPool
    key: Any  # the pool's key in the manager (None if it was gone before it was found)
    prefix: str  # the configuration host's path, if it has one
    host_header: str
    retries: Retry


# Per pool manager (each ApiClient has its own), per configuration host: found once rather than through the
# manager's pool-key construction on every request.
_targets: weakref.WeakKeyDictionary[urllib3.PoolManager, dict[str, _Target]] = weakref.WeakKeyDictionary()
_targets_lock = threading.Lock()


def _target_of(pool_manager: urllib3.PoolManager, host: str) -> _Target:
    by_host = _targets.get(pool_manager)
    target = by_host.get(host) if by_host is not None else None
    # Still the manager's pool? It drops its pools on clear() (ApiClient.close()) and the least used past num_pools.
    if target is not None and pool_manager.pools.get(target.key) is target.pool:
        return target
    prefix, scheme, hostname, port = _parsed_host(host)
    pool = pool_manager.connection_from_host(hostname, port=port, scheme=scheme)
    keys = pool_manager.pools.keys()  # a snapshot under its lock: the container itself refuses iteration
    key = next((key for key in keys if pool_manager.pools.get(key) is pool), None)
    retries = Retry.from_int(None, redirect=False, default=pool.retries)
    target = _Target(pool, key, prefix, _host_header(pool), retries)
    with _targets_lock:
        _targets.setdefault(pool_manager, {})[host] = target
    return target


def _host_header(pool: HTTPConnectionPool) -> str:
    """The Host header http.client sends for the pool's connections: brackets for IPv6, no default port."""
    host = (pool.host or "").rstrip(".")
    if ":" in host:
        host = f"[{host}]"
    default_port = 443 if pool.scheme == "https" else 80
    return host if pool.port in (None, default_port) else f"{host}:{pool.port}"


class _Unread(NamedTuple):
    """A response whose head is read and body is not, on the connection it came on."""

    head: http11.Head
    reader: http11.Reader
    conn: Any


class _StaleConnection(Exception):
    """A reused connection turned out closed by the server before any byte of the answer; nothing was done."""


def _round_trip(target: _Target, method: str, url: str, data: bytes, timeouts: _Timeouts) -> _Unread | LeanResponse:
    """One request through the pool, as urlopen makes it: the pool's Retry decides about connection errors and
    Retry-After answers, and raises what urlopen would raise."""
    pool = target.pool
    retries = target.retries
    while True:
        conn = pool._get_conn()  # a pooled connection (checked not dropped) or a new one, not connected yet
        try:
            try:
                head, reader = _attempt(pool, conn, method, url, data, timeouts, may_resend=True)
            except _StaleConnection:
                conn.close()
                conn = pool._new_conn()  # fresh, not another pooled one: those may be as stale (a restarted server)
                head, reader = _attempt(pool, conn, method, url, data, timeouts, may_resend=False)
        except _CONNECTION_FAILURES as exc:
            conn.close()
            pool._put_conn(None)  # the slot, as urlopen gives it back
            error = _as_urllib3_error(exc)
            retries = retries.increment(method, url, error=error, _pool=pool, _stacktrace=exc.__traceback__)
            retries.sleep()
            _urllib3_log.warning("Retrying (%r) after connection broken by '%r': %s", retries, exc, url)
            continue
        except BaseException:
            conn.close()
            pool._put_conn(None)
            raise
        exchange = _Unread(head, reader, conn)
        if not retries.is_retry(method, head.status, head.retry_after):
            return exchange
        response = _finish(pool, exchange, drain=True)
        try:
            retries = retries.increment(method, url, response=response, _pool=pool)  # type: ignore[arg-type]
        except MaxRetryError:
            if retries.raise_on_status:
                raise
            return response
        retries.sleep(response)  # type: ignore[arg-type]
        _urllib3_log.debug("Retry: %s", url)


def _attempt(
    pool: HTTPConnectionPool,
    conn: Any,
    method: str,
    url: str,
    data: bytes,
    timeouts: _Timeouts,
    *,
    may_resend: bool,
) -> tuple[http11.Head, http11.Reader]:
    """Send the request on `conn` (connecting it if it is new) and read the answer's head.

    _StaleConnection (when `may_resend`) if `conn` was reused and the server had closed it, when resending cannot
    repeat a side effect: the request did not go out whole (the server cannot have acted on it), or nothing of an
    answer came and the method has no side effects. urllib3 and http.client resend nothing: a socket closed just
    after their dropped-connection check failed the call.
    """
    started = time.monotonic() if timeouts.total is not None else 0.0
    reused = conn.sock is not None
    conn.timeout = timeouts.connect
    if not reused:
        _connect(pool, conn, url)
    read_timeout = timeouts.read
    if timeouts.total is not None:
        read_timeout = max(0.0, timeouts.total - (time.monotonic() - started))
        if read_timeout == 0:
            raise ReadTimeoutError(pool, url, f"Read timed out. (read timeout={read_timeout})")
    sock = conn.sock
    sock.settimeout(read_timeout)
    try:
        sock.sendall(data)
    except OSError as exc:  # ssl.SSLError included
        if reused and may_resend and not _is_timeout(exc):
            raise _StaleConnection from exc
        if exc.errno not in _SEND_ERRNOS_TO_READ_PAST:
            raise
    reader = http11.Reader(sock.recv)
    try:
        return http11.read_head(reader, method), reader
    except (BaseSSLError, OSError) as exc:
        if _is_timeout(exc):
            raise ReadTimeoutError(pool, url, f"Read timed out. (read timeout={read_timeout})") from exc
        closed = isinstance(exc, _CLOSED) and reader.received == 0
        if closed and reused and may_resend and method in SAFE_TO_RESEND:
            raise _StaleConnection from exc
        raise


def _connect(pool: HTTPConnectionPool, conn: Any, url: str) -> None:
    """Connect `conn` with the pool's settings (TLS included), with urllib3's errors for a failure."""
    try:
        try:
            pool._validate_conn(conn)  # an HTTPS pool connects here, and warns if unverified
            if conn.sock is None:
                conn.connect()
        except (TimeoutError, BaseSSLError) as exc:
            if _is_timeout(exc):  # a handshake that timed out, as urllib3 reports it
                raise ReadTimeoutError(pool, url, f"Read timed out. (read timeout={conn.timeout})") from exc
            raise
    except (BaseSSLError, CertificateError) as exc:
        raise SSLError(exc) from exc


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, SocketTimeout) or getattr(exc, "errno", None) in (errno.EAGAIN, errno.EWOULDBLOCK)


def _as_urllib3_error(exc: BaseException) -> BaseException:
    """What urlopen hands its Retry for a failure (and raises if it does not retry)."""
    if isinstance(exc, BaseSSLError | CertificateError):
        return SSLError(exc)
    if isinstance(exc, HTTPError):
        return exc
    return ProtocolError("Connection aborted.", exc)


def _finish(pool: HTTPConnectionPool, exchange: _Unread, *, drain: bool = False) -> LeanResponse:
    """Read the body and give the connection back (reusable only if the answer was framed and nothing followed).

    Failures are urllib3's for a response's read(); with `drain` (an answer Retry throws away) they are not raised.
    """
    head, reader, conn = exchange
    try:
        data = http11.read_body(reader, head)
    except BaseException as exc:
        conn.close()
        pool._put_conn(None)
        if not isinstance(exc, HTTPError | OSError | HTTPException):
            raise
        if drain:
            return LeanResponse(head, b"")
        if isinstance(exc, HTTPError):  # the body's framing (MalformedResponse) or encoding (DecodeError)
            raise
        raise _as_read_error(pool, exc) from exc
    if head.keep_alive and not reader.leftover:
        pool._put_conn(conn)
    else:
        conn.close()
        pool._put_conn(None)
    return LeanResponse(head, data)


def _as_read_error(pool: HTTPConnectionPool, exc: BaseException) -> BaseException:
    """As urllib3's HTTPResponse reports a socket's failure while reading a body."""
    if isinstance(exc, SocketTimeout) or (isinstance(exc, BaseSSLError) and "read operation timed out" in str(exc)):
        return ReadTimeoutError(pool, None, "Read timed out.")  # type: ignore[arg-type]
    if isinstance(exc, BaseSSLError):
        return SSLError(exc)
    return ProtocolError(f"Connection broken: {exc!r}", exc)
