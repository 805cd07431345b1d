"""HTTP layer of the in-memory API server: TLS, routing, request bodies, watches, the ApiServer class.

A threaded synchronous HTTPS server (one thread per connection, HTTP/1.1 keep-alive). Routing follows
kube-apiserver's paths; every error is answered with a `kind: Status` body, never a dropped connection.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import secrets
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

from kubemcsa import jsonwire
from kubemcsa_testing import errors, openapi, patch, protobuf, rbac, table, tokens
from kubemcsa_testing.auth import ADMIN, Authenticator
from kubemcsa_testing.clients import ClusterClients
from kubemcsa_testing.cluster import Cluster, random_uuid
from kubemcsa_testing.controllers import Controllers
from kubemcsa_testing.errors import StatusError
from kubemcsa_testing.rbac import RequestAttributes, UserInfo
from kubemcsa_testing.resources import ResourceInfo
from kubemcsa_testing.store import DEFAULT_HISTORY, INITIAL_EVENTS_END, Watcher
from kubemcsa_testing.tls import ServingCerts, make_serving_certs

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 3 * 1024 * 1024  # kube-apiserver's limit for a request body
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024  # larger bodies are refused by closing the connection
DEFAULT_WATCH_SECONDS = 1800
JSON_TYPE = "application/json"
JWKS_TYPE = "application/jwk-set+json"
BOOKMARK_SECONDS = 1.0
WATCH_BATCH = 256  # queued watch events sent in one write at most
KUBE_VERSION = {
    "major": "1",
    "minor": "36",
    "gitVersion": "v1.36.0-kubemcsa",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "go1.22.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}
_PUBLIC_PATHS = ("/healthz", "/livez", "/readyz", "/version")


@dataclass(frozen=True)
class BearerToken:
    """What a request's bearer JWT claims to be, read without checking it, whether it authenticated or not: tests
    look for tokens that should never reach this server (say, a consumer controller's own). Never the token."""

    issuer: str
    subject: str
    audiences: tuple[str, ...]


@functools.lru_cache(maxsize=1024)  # a client sends the same header with every request
def bearer_token_of(authorization: str | None) -> BearerToken | None:
    """The unverified claims of the JWT in an `Authorization: Bearer` header (None for anything else)."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or token.count(".") != 2:
        return None
    try:
        claims = tokens.decode_unverified(token.strip())
    except ValueError:
        return None
    aud = claims.get("aud")
    audiences = (aud,) if isinstance(aud, str) else tuple(a for a in aud or () if isinstance(a, str))
    return BearerToken(str(claims.get("iss") or ""), str(claims.get("sub") or ""), audiences)


def compact_json(value: Any) -> bytes:
    """Compact JSON of an answer or a watch event, in UTF-8 as kube-apiserver writes it: orjson (the answers' JSON
    was the largest cost of this server at fleet scale), or the standard library's for what orjson refuses (a lone
    surrogate a client sent, an integer over 64 bits), so that whatever was stored can be answered."""
    try:
        return jsonwire.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":")).encode()


@dataclass(frozen=True)
class RequestRecord:
    """One API request, as tests count them."""

    user: str
    verb: str
    path: str
    namespace: str
    resource: str
    subresource: str
    name: str
    code: int
    at: float = 0.0  # time.monotonic() when the request was served
    token: BearerToken | None = None  # the bearer JWT it came with, as it claims to be (never the token itself)


@dataclass
class Route:
    """What a path and method ask for."""

    verb: str
    info: ResourceInfo | None = None
    namespace: str = ""
    name: str = ""
    subresource: str = ""
    group: str = ""
    version: str = ""
    discovery: Any = None  # a document to answer as-is (discovery)

    def attributes(self, path: str) -> RequestAttributes:
        if self.info is None:
            return RequestAttributes(verb=self.verb, path=path, resource_request=False)
        return RequestAttributes(
            verb=self.verb,
            api_group=self.info.group,
            resource=self.info.plural,
            subresource=self.subresource,
            namespace=self.namespace,
            name=self.name,
            path=path,
        )


def _warning_header(text: str) -> str:
    """A Warning header as kube-apiserver writes it: `299 - "text"` (one line, quotes escaped)."""
    clean = " ".join(text.split()).replace("\\", "\\\\").replace('"', '\\"')
    return f'299 - "{clean}"'


def _not_found() -> StatusError:
    return StatusError(404, "NotFound", "the server could not find the requested resource", {})


def _flag(query: dict[str, list[str]], key: str) -> bool:
    value = (query.get(key) or [""])[-1].lower()
    return value in ("true", "1")


def _param(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[-1] if values else None


_MAX_HEADER_LINE = 65536  # http.client's limits: longer lines and more headers are 431
_MAX_HEADERS = 100
_HEADER_LINE = re.compile(rb"[\041-\071\073-\176]*:")  # a field name and its colon, as the email parser reads


class RequestHeaders:
    """A request's header fields, answering as http.client's HTTPMessage does where this server asks (`get`:
    the first value of a name in any case, leading blanks dropped; `get_all`), without the email package's
    parser, which cost more than routing and authorizing a request."""

    __slots__ = ("_fields", "_first")

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        self._fields = fields
        self._first: dict[str, str] = {}
        for name, value in fields:
            self._first.setdefault(name.lower(), value)

    @classmethod
    def parse(cls, lines: list[bytes]) -> RequestHeaders:
        """From the lines up to the blank one, as HTTPMessage reads them: a line that starts with a blank
        continues the previous field; parsing stops at a line that is no field."""
        fields: list[tuple[str, str]] = []
        for raw in lines:
            if raw in (b"\r\n", b"\n", b""):
                break
            line = raw.decode("iso-8859-1")
            if line[0] in " \t":
                if fields:  # a first line that continues nothing is dropped, as the email parser does
                    name, value = fields[-1]
                    fields[-1] = (name, value + line)
                continue
            if not _HEADER_LINE.match(raw):
                break
            name, _, value = line.partition(":")
            fields.append((name, value.lstrip(" \t")))
        return cls([(name, value.rstrip("\r\n")) for name, value in fields])

    def get(self, name: str, default: Any = None) -> Any:
        return self._first.get(name.lower(), default)

    def get_all(self, name: str, default: Any = None) -> Any:
        wanted = name.lower()
        return [value for key, value in self._fields if key.lower() == wanted] or default

    def __getitem__(self, name: str) -> str | None:
        return self._first.get(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._first

    def items(self) -> list[tuple[str, str]]:
        return list(self._fields)


class _Connection(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kubemcsa-apiserver"
    timeout = 300  # idle keep-alive connections are closed after this

    def setup(self) -> None:
        self.request.settimeout(30)
        try:
            self.request.do_handshake()
        except (OSError, ssl.SSLError):
            self.close_connection = True
            raise
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()

    def handle(self) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):  # the client went away
            super().handle()

    def parse_request(self) -> bool:
        """BaseHTTPRequestHandler.parse_request (request line, keep-alive, Expect), with RequestHeaders."""
        self.command = None  # type: ignore[assignment]  # in case of an error on the first line
        self.request_version = version = self.default_request_version
        self.close_connection = True
        self.requestline = requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = requestline.split()
        if not words:
            return False
        if len(words) >= 3:
            version = words[-1]
            numbers = version[5:].split(".") if version.startswith("HTTP/") else []
            if len(numbers) != 2 or not all(n.isdigit() and len(n) <= 10 for n in numbers):
                self.send_error(400, f"Bad request version ({version!r})")
                return False
            if (int(numbers[0]), int(numbers[1])) >= (2, 0):
                self.send_error(505, f"Invalid HTTP version ({version[5:]})")
                return False
            if (int(numbers[0]), int(numbers[1])) >= (1, 1):
                self.close_connection = False
            self.request_version = version
        if not 2 <= len(words) <= 3:
            self.send_error(400, f"Bad request syntax ({requestline!r})")
            return False
        command, path = words[:2]
        if len(words) == 2:
            self.close_connection = True
            if command != "GET":
                self.send_error(400, f"Bad HTTP/0.9 request type ({command!r})")
                return False
        self.command, self.path = command, path
        if self.path.startswith("//"):
            self.path = "/" + self.path.lstrip("/")  # as the standard library (gh-87389)
        lines: list[bytes] = []
        while True:
            line = self.rfile.readline(_MAX_HEADER_LINE + 1)
            if len(line) > _MAX_HEADER_LINE:
                explain = f"got more than {_MAX_HEADER_LINE} bytes when reading header line"
                self.send_error(431, "Line too long", explain)
                return False
            lines.append(line)
            if len(lines) > _MAX_HEADERS:
                self.send_error(431, "Too many headers", f"got more than {_MAX_HEADERS} headers")
                return False
            if line in (b"\r\n", b"\n", b""):
                break
        self.headers = RequestHeaders.parse(lines)  # type: ignore[assignment]
        connection = (self.headers.get("Connection") or "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive":
            self.close_connection = False
        if (self.headers.get("Expect") or "").lower() == "100-continue" and self.request_version >= "HTTP/1.1":
            return self.handle_expect_100()
        return True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _dispatch(self) -> None:
        self.server.api.handle(self)  # type: ignore[attr-defined]

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _dispatch

    def send_json(
        self,
        code: int,
        body: Any,
        headers: list[tuple[str, str]] | None = None,
        content_type: str = JSON_TYPE,
        payload: bytes | None = None,
    ) -> None:
        """Answer `body` as JSON (`payload`: its JSON already encoded)."""
        if payload is None:
            payload = compact_json(body)
        head = [
            f"HTTP/1.1 {code} {self.responses.get(code, ('',))[0]}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(payload)}",
            "Cache-Control: no-cache, private",
            f"Audit-Id: {random_uuid()}",  # a random UUID, as kube-apiserver's
        ]
        for key, value in headers or ():
            head.append(f"{key}: {value}")
        if self.close_connection:
            head.append("Connection: close")
        data = ("\r\n".join(head) + "\r\n\r\n").encode()
        self.wfile.write(data if self.command == "HEAD" else data + payload)

    def send_text(self, text: str) -> None:
        payload = text.encode()
        head = ("HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(payload)}\r\nCache-Control: no-cache, private\r\n\r\n")  # fmt: skip
        self.wfile.write(head.encode() + (b"" if self.command == "HEAD" else payload))

    def start_chunked(self) -> None:
        head = [
            "HTTP/1.1 200 OK",
            "Content-Type: application/json",
            "Transfer-Encoding: chunked",
            "Cache-Control: no-cache, private",
        ]
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode())

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def write_chunks(self, lines: list[bytes]) -> None:
        """Each line a chunk of its own, all in one write."""
        self.wfile.write(b"".join(b"%x\r\n%s\r\n" % (len(data), data) for data in lines))

    def end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")


class _EncodedObjects:
    """The JSON of stored objects, by identity: a stored object is never modified (a write stores a new dict), so
    its JSON is encoded once for the answer to the write and every watch that sends it. Holding the object keeps
    its id from being reused; bounded, the oldest entries go first."""

    def __init__(self, max_entries: int = 2048) -> None:
        self.max_entries = max_entries
        self._entries: dict[int, tuple[dict[str, Any], bytes]] = {}
        self._lock = threading.Lock()

    def encode(self, obj: dict[str, Any]) -> bytes:
        """JSON of `obj`, which must be a stored object (or one as immutable)."""
        with self._lock:
            entry = self._entries.get(id(obj))
        if entry is not None and entry[0] is obj:
            return entry[1]
        data = compact_json(obj)
        with self._lock:
            if len(self._entries) >= self.max_entries:
                del self._entries[next(iter(self._entries))]
            self._entries[id(obj)] = (obj, data)
        return data


class _HTTPSServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext, api: ApiServer) -> None:
        self.context = context
        self.api = api
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Connection)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        self.api._count_connection()
        if self.api.unreachable:
            # As a load balancer with no live backend: the connection is reset before any TLS byte.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            raise OSError("unreachable")  # socketserver drops the request
        tls = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        with self.connections_lock:
            self.connections.add(tls)
        return tls, addr

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # TLS handshakes that fail and clients that vanish are not server errors

    def close_all(self) -> None:
        with self.connections_lock:
            conns = list(self.connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class ApiServer(ClusterClients):
    """An in-memory Kubernetes API server over HTTPS on 127.0.0.1; see the package docstring."""

    def __init__(
        self,
        name: str = "cluster1",
        max_token_expiration_seconds: int | None = None,
        port: int = 0,
        bookmark_seconds: float = BOOKMARK_SECONDS,
        history_size: int = DEFAULT_HISTORY,
        authentication_config: dict[str, Any] | str | None = None,
    ) -> None:
        """`history_size`: how many past events a watch may resume from (older resourceVersions get 410 Gone).

        `authentication_config`: an AuthenticationConfiguration (as kube-apiserver's `--authentication-config`
        file) whose `jwt` issuers this server trusts; change it later with configure_authentication().
        """
        self.name = name
        self.max_token_expiration_seconds = max_token_expiration_seconds
        self.bookmark_seconds = bookmark_seconds
        self._port = port
        self._certs: ServingCerts = make_serving_certs(f"{name}-apiserver")
        self.admin_token = secrets.token_urlsafe(32)
        self.cluster = Cluster(name, self._certs.ca_pem, history_size)
        self._authority: tokens.TokenAuthority | None = None
        self._auth: Authenticator | None = None
        self._controllers: Controllers | None = None
        self._httpd: _HTTPSServer | None = None
        self._thread: threading.Thread | None = None
        self._services: dict[tuple[str, str, int], str] = {}
        self._requests: list[RequestRecord] = []
        self._requests_lock = threading.Lock()
        self._bootstrapped = False
        self._stopping = threading.Event()
        self._request_local = threading.local()  # per-request state: the admission warnings to send back
        # A misbehaving source, for tests: maps the (namespace, name) a TokenRequest asks for to the account whose
        # token is answered instead (a real kube-apiserver never does; a proxy or an impostor might).
        self.token_request_answers_as: Callable[[str, str], tuple[str, str]] | None = None
        self._authentication_config = authentication_config
        self.unreachable = False
        self._connections = 0
        self._connections_lock = threading.Lock()
        self._encoded = _EncodedObjects()

    def __repr__(self) -> str:
        return f"ApiServer(name={self.name!r}, url={self.url if self._port else None!r})"

    # Lifecycle ------------------------------------------------------------------------------------

    def start(self) -> ApiServer:
        if self._httpd is not None:
            return self
        self._stopping.clear()
        httpd = _HTTPSServer(("127.0.0.1", self._port), self._certs.server_context(), self)
        self._port = httpd.server_address[1]
        if self._authority is None:
            self._authority = tokens.TokenAuthority(self.url)
            self._auth = Authenticator(self.cluster.store, self._authority, self.admin_token)
            self._auth.jwt.configure(self._authentication_config)
            authority = self._authority
            self._controllers = Controllers(
                self.cluster,
                lambda ns, sa, secret: authority.legacy_token(namespace=ns, service_account=sa, secret=secret),
            )
            self.cluster.admit = self._admit
            self.cluster.check_write = self._check_escalation
        assert self._controllers is not None
        self._controllers.start()
        if not self._bootstrapped:
            self.cluster.bootstrap(rbac.default_cluster_roles(), rbac.default_cluster_role_bindings())
            self._bootstrapped = True
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, name=f"apiserver-{self.name}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        self.cluster.store.close_watches()
        httpd.shutdown()
        httpd.server_close()
        httpd.close_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._controllers is not None:
            self._controllers.stop()

    def make_unreachable(self) -> None:
        """Keep the address but answer nothing, as a dead API server behind its load balancer: every new
        connection is counted and reset, open ones (watches, kept-alive connections) are cut."""
        self.unreachable = True
        self.cluster.store.close_watches()
        if self._httpd is not None:
            self._httpd.close_all()

    def make_reachable(self) -> None:
        self.unreachable = False

    @property
    def connection_attempts(self) -> int:
        """TCP connections accepted so far (while unreachable too): what a client's retries cost the server."""
        with self._connections_lock:
            return self._connections

    def _count_connection(self) -> None:
        with self._connections_lock:
            self._connections += 1

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self._port}"

    @property
    def ca_pem(self) -> bytes:
        return self._certs.ca_pem

    @property
    def authority(self) -> tokens.TokenAuthority:
        if self._authority is None:
            raise RuntimeError("start the ApiServer first: its token issuer is its URL")
        return self._authority

    def configure_authentication(self, config: dict[str, Any] | str | None) -> None:
        """Trust the JWT issuers of this AuthenticationConfiguration from now on (None: none), as kube-apiserver
        reloads its `--authentication-config` file; oidc.ConfigurationError if kube-apiserver would refuse it."""
        if self._auth is None:
            from kubemcsa_testing.oidc import parse_authentication_configuration

            parse_authentication_configuration(config) if config is not None else None
            self._authentication_config = config
            return
        self._auth.jwt.configure(config)
        self._authentication_config = config

    # Clients --------------------------------------------------------------------------------------

    def issue_token(
        self, namespace: str, name: str, audiences: list[str] | None = None, expiration_seconds: int = 3600
    ) -> str:
        """A token for an existing service account, as a TokenRequest would return."""
        sa = self.cluster.store.get("/serviceaccounts", namespace, name)
        if sa is None:
            raise errors.not_found("serviceaccounts", name)
        spec: dict[str, Any] = {"expirationSeconds": expiration_seconds}
        if audiences:
            spec["audiences"] = audiences
        response = self.authority.token_request(
            {"spec": spec},
            namespace=namespace,
            service_account=sa,
            max_expiration_seconds=self.max_token_expiration_seconds,
        )
        return response["status"]["token"]

    def register_service(self, namespace: str, name: str, port: int, url: str) -> None:
        """Where a webhook's clientConfig.service (namespace, name, port) really listens, e.g. https://127.0.0.1:N."""
        self._services[(namespace, name, int(port))] = url.rstrip("/")

    def resolve_service(self, namespace: str, name: str, port: int) -> str:
        url = self._services.get((namespace, name, int(port or 443)))
        if url is None:
            raise StatusError(
                500,
                "InternalError",
                f'Internal error occurred: failed calling webhook: service "{namespace}/{name}:{port}" is not '
                "registered with the in-memory API server (call register_service)",
            )
        return url

    @property
    def requests(self) -> list[RequestRecord]:
        with self._requests_lock:
            return list(self._requests)

    def reset_requests(self) -> None:
        with self._requests_lock:
            self._requests.clear()

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """True once the background controllers have handled every change so far."""
        return self._controllers.wait_idle(timeout) if self._controllers else True

    # Admission ------------------------------------------------------------------------------------

    def _check_escalation(self, info: ResourceInfo, obj: dict[str, Any], user: UserInfo) -> None:
        """RBAC objects may only grant what their writer holds (or may `escalate`/`bind`), as in kube."""
        if info.group != "rbac.authorization.k8s.io" or "system:masters" in user.groups:
            return
        store = self.cluster.store
        with store.lock:
            policy = {
                "roles": store.list("rbac.authorization.k8s.io/roles")[0],
                "cluster_roles": store.list("rbac.authorization.k8s.io/clusterroles")[0],
                "role_bindings": store.list("rbac.authorization.k8s.io/rolebindings")[0],
                "cluster_role_bindings": store.list("rbac.authorization.k8s.io/clusterrolebindings")[0],
            }
        rbac.check_escalation(user, obj, **policy)

    def _admit(
        self,
        info: ResourceInfo,
        operation: str,
        obj: dict[str, Any],
        old: dict[str, Any] | None,
        namespace: str,
        user: UserInfo | None,
        dry_run: bool,
        subresource: str,
    ) -> dict[str, Any]:
        """Mutating admission webhooks (admission.py); kube never calls them for webhook configurations."""
        if info.group == "admissionregistration.k8s.io":
            return obj
        configs, _ = self.cluster.store.list("admissionregistration.k8s.io/mutatingwebhookconfigurations")
        if not configs:
            return obj
        from kubemcsa_testing import admission

        ns_labels = None
        if info.namespaced:
            ns_obj = self.cluster.store.get("/namespaces", "", namespace)
            ns_labels = dict((ns_obj or {}).get("metadata", {}).get("labels") or {})
        elif info.plural == "namespaces" and info.group == "":
            ns_labels = dict(obj.get("metadata", {}).get("labels") or {})
        attrs = admission.AdmissionAttributes(
            obj=obj,
            old_obj=old,
            operation=operation,
            kind={"group": info.group, "version": info.version, "kind": info.kind},
            resource={"group": info.group, "version": info.version, "resource": info.plural},
            sub_resource=subresource,
            namespace=namespace if info.namespaced else "",
            name=str(obj.get("metadata", {}).get("name") or ""),
            namespace_labels=ns_labels,
            user=user or ADMIN,
            dry_run=dry_run,
        )
        warnings = getattr(self._request_local, "warnings", None)
        return admission.run_mutating_webhooks(configs, attrs, resolve_service=self.resolve_service, warnings=warnings)

    # Requests -------------------------------------------------------------------------------------

    def _record(
        self,
        user: UserInfo | None,
        route: Route | None,
        path: str,
        verb: str,
        code: int,
        token: BearerToken | None = None,
    ) -> None:
        record = RequestRecord(
            user=user.username if user else "",
            verb=route.verb if route else verb,
            path=path,
            namespace=route.namespace if route else "",
            resource=route.info.plural if route and route.info else "",
            subresource=route.subresource if route else "",
            name=route.name if route else "",
            code=code,
            at=time.monotonic(),
            token=token,
        )
        with self._requests_lock:
            self._requests.append(record)

    def handle(self, conn: _Connection) -> None:
        split = urlsplit(conn.path)
        path = split.path or "/"
        query = parse_qs(split.query, keep_blank_values=True)
        user: UserInfo | None = None
        route: Route | None = None
        warnings: list[str] = []
        self._request_local.warnings = warnings
        token = bearer_token_of(conn.headers.get("Authorization"))
        self._request_local.content_type = JSON_TYPE
        try:
            body = self._read_body(conn)
            assert self._auth is not None
            user = self._auth.authenticate(conn.headers.get("Authorization"))
            user = self._auth.impersonate(
                user,
                conn.headers.get("Impersonate-User"),
                conn.headers.get_all("Impersonate-Group") or [],
                conn.headers.get("Impersonate-Uid"),
            )
            route = self._route(conn.command, path, query)
            self._auth.authorize(user, route.attributes(path))
            if route.verb == "watch":
                self._serve_watch(conn, route, query, lambda: self._record(user, route, path, "watch", 200, token))
                return
            code, result = self._serve(conn, route, query, body, user)
            info = route.info
            if (
                code == 200
                and info is not None
                and route.verb in ("get", "list")
                and table.wants_table(conn.headers.get("Accept"))
            ):
                result = table.to_table(result, self._printer_columns(info), custom=info.custom)
        except _Plain as plain:
            # Recorded before answering, so that a client that got its answer finds its request recorded.
            self._record(user, route, path, conn.command.lower(), 200, token)
            conn.send_text(plain.text)
            return
        except StatusError as exc:
            code, result = exc.code, exc.to_status()
        except (OSError, ssl.SSLError):
            conn.close_connection = True
            return
        except Exception as exc:  # a bug: answer 500 with a Status rather than drop the connection
            log.exception("in-memory API server failed on %s %s", conn.command, path)
            code, result = 500, errors.internal(type(exc).__name__).to_status()
        self._record(user, route, path, conn.command.lower(), code, token)
        with contextlib.suppress(OSError, ssl.SSLError):
            content_type = self._request_local.content_type if code < 400 else JSON_TYPE
            payload = self._encoded.encode(result) if self._is_stored(route, code, result) else None
            headers = [("Warning", _warning_header(w)) for w in warnings]
            conn.send_json(code, result, headers, content_type, payload)

    def _is_stored(self, route: Route | None, code: int, result: Any) -> bool:
        """Is the answer an object as stored now (a get, or a write's result), whose JSON may be shared?"""
        if route is None or route.info is None or code >= 300 or route.verb not in ("get", "create", "update", "patch"):
            return False
        meta = result.get("metadata") if isinstance(result, dict) else None
        if not isinstance(meta, dict):
            return False
        return self.cluster.find(route.info, meta.get("namespace") or "", meta.get("name") or "") is result

    def _printer_columns(self, info: ResourceInfo) -> list[dict[str, Any]] | None:
        """A custom resource's additionalPrinterColumns, from its CRD (None for built-in resources)."""
        if not info.custom:
            return None
        crd = self.cluster.store.get(
            "apiextensions.k8s.io/customresourcedefinitions", "", f"{info.plural}.{info.group}"
        )
        for version in ((crd or {}).get("spec") or {}).get("versions") or []:
            if version.get("name") == info.version:
                return version.get("additionalPrinterColumns") or None
        return None

    def _read_body(self, conn: _Connection) -> bytes | None:
        if conn.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked(conn)
        length_header = conn.headers.get("Content-Length")
        if length_header is None:
            return None
        try:
            length = int(length_header)
        except ValueError:
            conn.close_connection = True
            raise errors.bad_request("invalid Content-Length") from None
        if length > MAX_BODY_BYTES:
            if length <= DRAIN_LIMIT_BYTES:  # read it so the client sees the answer, not a reset connection
                remaining = length
                while remaining > 0:
                    chunk = conn.rfile.read(min(remaining, 1 << 16))
                    if not chunk:
                        break
                    remaining -= len(chunk)
            else:
                conn.close_connection = True
            raise errors.too_large()
        return conn.rfile.read(length) if length > 0 else b""

    def _read_chunked(self, conn: _Connection) -> bytes:
        parts, total = [], 0
        while True:
            line = conn.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                conn.close_connection = True
                raise errors.bad_request("malformed chunked body") from None
            if size == 0:
                while conn.rfile.readline(1024).strip():
                    pass
                return b"".join(parts)
            total += size
            if total > MAX_BODY_BYTES:
                conn.close_connection = True
                raise errors.too_large()
            parts.append(conn.rfile.read(size))
            conn.rfile.readline(16)

    # Routing --------------------------------------------------------------------------------------

    def _route(self, method: str, path: str, query: dict[str, list[str]]) -> Route:
        segs = [unquote(s) for s in path.split("/") if s]  # kube-apiserver decodes each segment (e.g. %3A in names)
        verb = {
            "GET": "get",
            "HEAD": "get",
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete",
        }.get(method, method.lower())
        registry = self.cluster.registry
        if not segs or segs[0] not in ("api", "apis"):
            return Route(verb=method.lower() if method not in ("GET", "HEAD") else "get")
        if segs[0] == "api":
            if len(segs) == 1:
                return Route(
                    "get",
                    discovery={
                        "kind": "APIVersions",
                        "versions": ["v1"],
                        "serverAddressByClientCIDRs": [
                            {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{self.port}"}
                        ],
                    },
                )
            group, version, rest = "", segs[1], segs[2:]
        else:
            if len(segs) == 1:
                return Route("get", discovery=registry.api_group_list())
            if len(segs) == 2:
                doc = registry.api_group(segs[1])
                if doc is None:
                    raise _not_found()
                return Route("get", discovery=doc)
            group, version, rest = segs[1], segs[2], segs[3:]
        if not rest:
            doc = registry.resource_list(group, version)
            if doc is None:
                raise _not_found()
            return Route("get", discovery=doc)
        namespace = ""
        candidate = registry.lookup(group, version, rest[2]) if rest[0] == "namespaces" and len(rest) >= 3 else None
        if candidate is not None and candidate.namespaced:
            namespace, rest = rest[1], rest[2:]
        if len(rest) > 3:
            raise _not_found()
        info = registry.lookup(group, version, rest[0])
        if info is None:
            raise _not_found()
        name = rest[1] if len(rest) > 1 else ""
        sub = rest[2] if len(rest) > 2 else ""
        if sub and sub not in info.subresources:
            raise _not_found()
        if info.namespaced and not namespace and (name or method not in ("GET", "HEAD")):
            raise _not_found()
        if method in ("GET", "HEAD"):
            verb = "get" if name else ("watch" if _flag(query, "watch") else "list")
        elif method == "DELETE":
            verb = "delete" if name else "deletecollection"
        elif method == "POST":
            if name and not sub:
                raise errors.method_not_allowed()
            verb = "create"
        elif method in ("PUT", "PATCH"):
            if not name:
                raise errors.method_not_allowed()
        else:
            raise errors.method_not_allowed()
        if verb not in info.verbs and not sub:
            raise errors.method_not_allowed()
        return Route(verb, info, namespace, name, sub, group, version)

    # Serving --------------------------------------------------------------------------------------

    def _decode(self, conn: _Connection, body: bytes | None, patch_request: bool = False) -> tuple[str, Any]:
        if body is None or not body.strip():
            raise errors.bad_request("the request body is missing: send a JSON object")
        content_type = (conn.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if patch_request:
            if content_type not in patch.PATCH_TYPES:
                raise errors.unsupported_media_type(content_type)
        elif content_type == protobuf.CONTENT_TYPE:
            return content_type, protobuf.decode(body)
        elif content_type not in ("application/json", "application/yaml", "*/*", ""):
            raise errors.unsupported_media_type(content_type)
        try:
            if content_type == "application/yaml":
                return content_type, yaml.safe_load(body)
            return content_type, json.loads(body)
        except (ValueError, yaml.YAMLError) as exc:
            raise errors.bad_request(f"the request body is not valid JSON: {exc}") from None

    def _serve_nonresource(self, path: str, accept: str | None = None) -> tuple[int, Any]:
        if path in ("/healthz", "/livez", "/readyz") or path.startswith(("/healthz/", "/livez/", "/readyz/")):
            raise _Plain("ok")
        if path == "/version":
            return 200, KUBE_VERSION
        if path == "/.well-known/openid-configuration":
            _negotiate(accept, JSON_TYPE)
            return 200, self.authority.openid_configuration(f"{self.url}/openid/v1/jwks")
        if path == "/openid/v1/jwks":
            # kube-apiserver serves the keys as application/jwk-set+json only: `Accept: application/json` is 406.
            self._request_local.content_type = _negotiate(accept, JWKS_TYPE)
            return 200, self.authority.jwks()
        if path == "/openapi/v3":
            return 200, openapi.root_document(self.cluster.registry)
        if path.startswith("/openapi/v3/"):
            rest = path[len("/openapi/v3/") :].split("/")
            doc = None
            if len(rest) == 2 and rest[0] == "api":
                doc = openapi.gv_document(self.cluster.registry, "", rest[1])
            elif len(rest) == 3 and rest[0] == "apis":
                doc = openapi.gv_document(self.cluster.registry, rest[1], rest[2])
            if doc is not None:
                return 200, doc
        raise StatusError(404, "NotFound", "the server could not find the requested resource", {})

    def _serve(
        self, conn: _Connection, route: Route, query: dict[str, list[str]], body: bytes | None, user: UserInfo
    ) -> tuple[int, Any]:
        if route.discovery is not None:
            return 200, route.discovery
        if route.info is None:
            if conn.command not in ("GET", "HEAD"):
                raise errors.method_not_allowed()
            return self._serve_nonresource(urlsplit(conn.path).path, conn.headers.get("Accept"))
        info, ns, name, sub = route.info, route.namespace, route.name, route.subresource
        cluster = self.cluster
        dry_run = "All" in (query.get("dryRun") or [])
        strict = _param(query, "fieldValidation") == "Strict"
        if route.verb == "get":
            if sub == "status" or not sub:
                return 200, cluster.get(info, ns, name)
            raise errors.method_not_allowed()
        if route.verb == "list":
            limit = _param(query, "limit")
            try:
                limit_value = int(limit) if limit else None
            except ValueError:
                raise errors.bad_request(f"invalid limit {limit!r}: use a positive integer") from None
            return 200, cluster.list(
                info, ns or None, _param(query, "labelSelector"), _param(query, "fieldSelector"),
                limit=limit_value, continue_token=_param(query, "continue"),
            )  # fmt: skip
        if route.verb == "create":
            _, obj = self._decode(conn, body)
            if sub == "token":
                return 201, self._token_request(ns, name, obj)
            if info.plural == "tokenreviews":
                return 201, self._token_review(obj)
            if info.plural == "selfsubjectreviews":
                return 201, tokens.self_subject_review(user)
            if info.plural in ("selfsubjectaccessreviews", "subjectaccessreviews"):
                return 201, self._access_review(info, obj, user)
            # The decoded body is this request's alone: the cluster may keep it instead of copying it.
            return 201, cluster.create(info, ns, obj, user=user, dry_run=dry_run, strict=strict, owned=True)
        if route.verb == "update":
            _, obj = self._decode(conn, body)
            return 200, cluster.update(
                info, ns, name, obj, subresource=sub, user=user, dry_run=dry_run, strict=strict, owned=True
            )
        if route.verb == "patch":
            content_type, obj = self._decode(conn, body, patch_request=True)
            return 200, cluster.patch(
                info, ns, name, content_type, obj, subresource=sub, user=user, dry_run=dry_run, strict=strict
            )
        if route.verb == "delete":
            options = self._delete_options(conn, body, query)
            return cluster.delete(info, ns, name, options, dry_run=dry_run)
        if route.verb == "deletecollection":
            options = self._delete_options(conn, body, query)
            listed = cluster.list(info, ns or None, _param(query, "labelSelector"), _param(query, "fieldSelector"))
            for item in listed["items"]:
                try:
                    cluster.delete(
                        info, item["metadata"].get("namespace", ""), item["metadata"]["name"], options, dry_run=dry_run
                    )
                except StatusError as exc:
                    if exc.code != 404:
                        raise
            return 200, listed
        raise errors.method_not_allowed()

    def _delete_options(self, conn: _Connection, body: bytes | None, query: dict[str, list[str]]) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if body and body.strip():
            _, decoded = self._decode(conn, body)
            if not isinstance(decoded, dict):
                raise errors.bad_request("DeleteOptions must be a JSON object")
            options = decoded
        policy = _param(query, "propagationPolicy")
        if policy:
            options["propagationPolicy"] = policy
        if options.get("propagationPolicy") not in (None, "Orphan", "Background", "Foreground"):
            raise errors.invalid(
                "DeleteOptions",
                "",
                [
                    (
                        "propagationPolicy",
                        f'Unsupported value: "{options["propagationPolicy"]}": supported values: '
                        '"Foreground", "Background", "Orphan", "nil"',
                    )
                ],
            )
        return options

    def _token_request(self, namespace: str, name: str, body: Any) -> dict[str, Any]:
        if self.token_request_answers_as is not None:
            namespace, name = self.token_request_answers_as(namespace, name)
        sa = self.cluster.store.get("/serviceaccounts", namespace, name)
        if sa is None:
            raise errors.not_found("serviceaccounts", name)
        bound_pod, bound_uid = self._bound_pod(namespace, body)
        return self.authority.token_request(
            body,
            namespace=namespace,
            service_account=sa,
            max_expiration_seconds=self.max_token_expiration_seconds,
            bound_pod=bound_pod,
            bound_uid=bound_uid,
        )

    def _bound_pod(self, namespace: str, body: Any) -> tuple[dict[str, Any] | None, str | None]:
        """The Pod a TokenRequest's spec.boundObjectRef names (as the kubelet asks) and the uid it gave: 404 if
        the pod does not exist, 409 if its uid is another one's, as kube-apiserver answers."""
        spec = body.get("spec") if isinstance(body, dict) else None
        ref = spec.get("boundObjectRef") if isinstance(spec, dict) else None
        if not isinstance(ref, dict) or ref.get("kind") != "Pod":
            return None, None
        name = str(ref.get("name") or "")
        pod = self.cluster.store.get("/pods", namespace, name)
        if pod is None:
            raise errors.not_found("pods", name)
        uid = pod["metadata"].get("uid")
        if ref.get("uid") and ref["uid"] != uid:
            raise StatusError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on Pod "{name}": the UID in the bound object reference '
                f"({ref['uid']}) does not match the UID in record. The object might have been deleted and then "
                "recreated",
                {"name": name, "kind": "Pod"},
            )
        return pod, (str(ref["uid"]) if ref.get("uid") else None)

    def _token_review(self, body: Any) -> dict[str, Any]:
        store = self.cluster.store
        return self.authority.token_review(
            body,
            lookup_service_account=lambda ns, n: store.get("/serviceaccounts", ns, n),
            lookup_secret=lambda ns, n: store.get("/secrets", ns, n),
        )

    def _access_review(self, info: ResourceInfo, body: Any, user: UserInfo) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("spec"), dict):
            raise errors.bad_request(f"the body of a {info.kind} must be an object with a spec")
        spec = body["spec"]
        subject = user
        if info.plural == "subjectaccessreviews":
            subject = UserInfo(str(spec.get("user") or ""), tuple(spec.get("groups") or ()), str(spec.get("uid") or ""))
        ra, nra = spec.get("resourceAttributes"), spec.get("nonResourceAttributes")
        if isinstance(ra, dict):
            attrs = RequestAttributes(
                verb=str(ra.get("verb") or ""),
                api_group=str(ra.get("group") or ""),
                resource=str(ra.get("resource") or ""),
                subresource=str(ra.get("subresource") or ""),
                namespace=str(ra.get("namespace") or ""),
                name=str(ra.get("name") or ""),
            )
        elif isinstance(nra, dict):
            attrs = RequestAttributes(
                verb=str(nra.get("verb") or ""), path=str(nra.get("path") or ""), resource_request=False
            )
        else:
            raise errors.invalid(
                info.kind,
                "",
                [
                    (
                        "spec.resourceAttributes",
                        "Required value: exactly one of nonResourceAttributes or resourceAttributes must be specified",
                    )
                ],
                info.group,
            )
        assert self._auth is not None
        try:
            self._auth.authorize(subject, attrs)
            allowed = True
        except StatusError:
            allowed = False
        out = dict(body)
        out["apiVersion"], out["kind"] = info.api_version, info.kind
        out.setdefault("metadata", {})
        out["status"] = {"allowed": allowed, **({} if allowed else {"reason": ""})}
        return out

    # Watches --------------------------------------------------------------------------------------

    def _serve_watch(
        self, conn: _Connection, route: Route, query: dict[str, list[str]], record: Callable[[], None]
    ) -> None:
        info = route.info
        assert info is not None
        timeout_param = _param(query, "timeoutSeconds")
        try:
            timeout = float(timeout_param) if timeout_param else DEFAULT_WATCH_SECONDS
        except ValueError:
            raise errors.bad_request(f"invalid timeoutSeconds: {timeout_param!r}") from None
        bookmarks = _flag(query, "allowWatchBookmarks")
        send_initial = _flag(query, "sendInitialEvents")
        resource_version = _param(query, "resourceVersion")
        if send_initial:
            if not bookmarks or _param(query, "resourceVersionMatch") != "NotOlderThan":
                raise errors.invalid(
                    "ListOptions",
                    "",
                    [
                        (
                            "sendInitialEvents",
                            "Forbidden: sendInitialEvents requires allowWatchBookmarks=true and "
                            "resourceVersionMatch=NotOlderThan",
                        )
                    ],
                )
            resource_version = None  # initial state first (a given resourceVersion is a lower bound)
        try:
            watcher = self.cluster.watch(
                info,
                route.namespace or None,
                _param(query, "labelSelector"),
                _param(query, "fieldSelector"),
                resource_version,
            )
        except StatusError as exc:
            if exc.code != 410:
                raise
            record()
            conn.start_chunked()
            conn.write_chunk(json.dumps({"type": "ERROR", "object": exc.to_status()}).encode() + b"\n")
            conn.end_chunked()
            return
        conn.request.settimeout(None)
        store = self.cluster.store
        deadline = time.monotonic() + max(timeout, 0)
        next_bookmark = time.monotonic() + self.bookmark_seconds
        record()
        try:
            conn.start_chunked()
            while not self._stopping.is_set():
                now = time.monotonic()
                if now >= deadline:
                    break
                wait = deadline - now
                if bookmarks:
                    wait = min(wait, max(next_bookmark - now, 0))
                try:
                    item = watcher.next(timeout=wait)
                except EOFError:
                    break
                if item is not None:
                    # Whatever else is queued goes out in the same write (one chunk per event, as before): one
                    # system call and one wake-up of this thread for a burst of events instead of one each.
                    lines = []
                    for kind, obj in (item, *watcher.pending(WATCH_BATCH)):
                        if kind != INITIAL_EVENTS_END:
                            lines.append(self._event_line(info, kind, obj))
                        elif send_initial:
                            rv = obj["metadata"]["resourceVersion"]
                            lines.append(self._bookmark_line(info, rv, initial_end=True))
                    conn.write_chunks(lines)
                    continue
                if bookmarks and time.monotonic() >= next_bookmark:
                    self._maybe_bookmark(conn, info, watcher)
                    next_bookmark = time.monotonic() + self.bookmark_seconds
            if bookmarks and not self._stopping.is_set():
                self._maybe_bookmark(conn, info, watcher)
            conn.end_chunked()
        except (OSError, ssl.SSLError):
            conn.close_connection = True
        finally:
            store.stop_watch(watcher)
            if self._stopping.is_set():
                conn.close_connection = True

    def _maybe_bookmark(self, conn: _Connection, info: ResourceInfo, watcher: Watcher) -> None:
        # Under the lock, an empty queue means every event up to the current resourceVersion was sent.
        store = self.cluster.store
        with store.lock:
            if not watcher.queue.empty():
                return
            rv = str(store.resource_version)
        self._send_bookmark(conn, info, rv)

    def _event_line(self, info: ResourceInfo, kind: str, obj: dict[str, Any]) -> bytes:
        shown = self.cluster.present(info, obj)
        # As stored (or a watch's own DELETED copy): encoded once for every watch.
        data = self._encoded.encode(obj) if shown is obj else compact_json(shown)
        return b'{"type":"%s","object":%s}\n' % (kind.encode(), data)

    def _bookmark_line(self, info: ResourceInfo, rv: str, initial_end: bool = False) -> bytes:
        meta: dict[str, Any] = {"resourceVersion": rv}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        line = {"type": "BOOKMARK", "object": {"kind": info.kind, "apiVersion": info.api_version, "metadata": meta}}
        return compact_json(line) + b"\n"

    def _send_bookmark(self, conn: _Connection, info: ResourceInfo, rv: str, initial_end: bool = False) -> None:
        conn.write_chunk(self._bookmark_line(info, rv, initial_end))


def _negotiate(accept: str | None, offered: str) -> str:
    """`offered` if the Accept header admits it (absent, */*, type/* or the type itself), else 406 as kube says it."""
    ranges = [part.split(";")[0].strip().lower() for part in (accept or "").split(",") if part.strip()]
    kind = offered.split("/")[0]
    if not ranges or any(r in ("*/*", f"{kind}/*", offered) for r in ranges):
        return offered
    raise StatusError(406, "NotAcceptable", f"406: Not Acceptable\n\nAvailable representations: {offered}", {})


class _Plain(Exception):
    """Answer 200 with this text/plain body (health checks)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text
