"""A trivial uvicorn HTTPS server and a raw TLS client, for the certificate tests (not collected by pytest)."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
from dataclasses import dataclass, field

import uvicorn

from kubemcsa.certificates.reloader import CertificateReloader
from kubemcsa_testing.wait import wait_for


async def _app(scope, receive, send):
    """Answers every request with "ok", and every AdmissionReview with allowed: true (an always-allow webhook)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    answer, content_type = b"ok", b"text/plain"
    if scope["method"] == "POST":
        review = json.loads(body)
        review["response"] = {"uid": review["request"]["uid"], "allowed": True}
        review.pop("request")
        answer, content_type = json.dumps(review).encode(), b"application/json"
    headers = [(b"content-type", content_type), (b"content-length", str(len(answer)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


class TLSServer:
    """uvicorn serving `_app` over TLS from cert_file/key_file, with a CertificateReloader bound to its loop."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.config = uvicorn.Config(
            _app, ssl_certfile=cert_file, ssl_keyfile=key_file, log_level="warning", lifespan="on"
        )
        self.config.load()
        self.server = uvicorn.Server(self.config)
        self.loop = asyncio.new_event_loop()
        self.reloader = CertificateReloader(self.config.ssl, cert_file, key_file, loop=self.loop)
        self.reloader.mark_loaded()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve(sockets=[self.sock]))

    def start(self) -> TLSServer:
        self._thread.start()
        wait_for(lambda: self.server.started, "the TLS server to start")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(10)
        self.loop.close()
        self.sock.close()


def client_context(ca_pem: bytes) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.check_hostname = True
    return context


def request(context: ssl.SSLContext, port: int, server_hostname: str) -> bytes:
    """One GET on a new connection, verifying the server as `server_hostname`; the server's certificate (DER)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname) as tls_sock,
    ):
        tls_sock.sendall(f"GET / HTTP/1.1\r\nHost: {server_hostname}\r\nConnection: close\r\n\r\n".encode())
        response = b""
        while chunk := tls_sock.recv(4096):
            response += chunk
        if not response.startswith(b"HTTP/1.1 200") or not response.endswith(b"ok"):
            raise AssertionError(f"unexpected response {response[:80]!r}")
        return tls_sock.getpeercert(binary_form=True)


@dataclass
class RequestLoop:
    """Threads making requests on new connections continuously; records each certificate and each failure."""

    context: ssl.SSLContext
    port: int
    server_hostname: str
    threads: int = 2
    certificates: list[bytes] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._run, daemon=True) for _ in range(self.threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                der = request(self.context, self.port, self.server_hostname)
            except (OSError, AssertionError) as exc:
                with self._lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            with self._lock:
                self.certificates.append(der)

    def count(self, der: bytes) -> int:
        with self._lock:
            return sum(1 for seen in self.certificates if seen == der)

    def __enter__(self) -> RequestLoop:
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(15)
