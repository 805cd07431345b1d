"""One client cannot lock the webhook out (issue 17): connections are capped per client address as well as in
total, an idle connection of the biggest holder makes room at the cap, idle keep-alive connections close, and
/healthz, /readyz and /metrics have a port of their own that the caps do not count.

The attackers connect from other loopback addresses (127.0.0.2, ...), the API server's stand-in from 127.0.0.1,
all over real TLS to a real WebhookServer.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from pathlib import Path

import httpx
import pytest

from kubemcsa.client import tls
from kubemcsa.contract import api
from kubemcsa_testing.wait import wait_for
from webhook.app import MUTATE_PATH
from webhook.cli import build_parser
from webhook.connections import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_CLIENT, ConnectionLimits
from webhook.lookups import StaticCache
from webhook.server import WebhookServer
from webhook.workers import WorkerPool

FIXTURES = Path(__file__).parent / "fixtures"
NS = "capture-demo"
ENABLED = {api.NAMESPACE_LABEL: api.NAMESPACE_LABEL_VALUE}
IMPORTS = {(NS, "cluster2-default-pod-lister"), (NS, "cluster3-default-pod-lister")}
BODY = (FIXTURES / "admissionreview-v1-pod.json").read_bytes()
ATTACKER = "127.0.0.2"


def _loopback_alias_usable(address: str) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


pytestmark = pytest.mark.skipif(not _loopback_alias_usable(ATTACKER), reason=f"cannot bind {ATTACKER} here")


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return tls.make_ca("test-webhook-connections-ca")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory, ca: tuple[bytes, bytes]) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = tls.make_serving_cert(ca[0], ca[1], ["localhost"], ["127.0.0.1"])
    (directory / "tls.crt").write_bytes(cert)
    (directory / "tls.key").write_bytes(key)
    return directory / "tls.crt", directory / "tls.key"


def webhook(certificate: tuple[Path, Path], **options: object) -> WebhookServer:
    cache = StaticCache({NS: ENABLED}, IMPORTS)
    return WebhookServer(None, *certificate, cache=cache, health_port=0, **options)  # type: ignore[arg-type]


class Holder:
    """Connections opened from `address` in a thread of their own, each kept alive after one answered request."""

    def __init__(self, url: str, ca_pem: bytes, address: str, count: int, headers: str = "") -> None:
        self.host, port = url.removeprefix("https://").rsplit(":", 1)
        self.port = int(port)
        self.context = ssl.create_default_context(cadata=ca_pem.decode())
        self.address, self.count = address, count
        self.headers = headers  # extra header lines, each ending in CRLF
        self.kept = 0  # answered and still open
        self.refused = 0  # closed by the server before or instead of an answer
        self.done = threading.Event()
        self._release: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(),), daemon=True)

    def __enter__(self) -> Holder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._release is not None:
            self._loop.call_soon_threadsafe(self._release.set)
        self._thread.join(30)

    async def _run(self) -> None:
        self._loop, self._release = asyncio.get_running_loop(), asyncio.Event()
        handshakes = asyncio.Semaphore(32)
        request = f"GET /healthz HTTP/1.1\r\nHost: {self.host}\r\n{self.headers}\r\n".encode()
        writers = []

        async def one() -> None:
            async with handshakes:
                try:
                    reader, writer = await asyncio.open_connection(
                        self.host, self.port, ssl=self.context, local_addr=(self.address, 0)
                    )
                except (OSError, ssl.SSLError):
                    self.refused += 1
                    return
                writers.append(writer)
                try:
                    writer.write(request)
                    await writer.drain()
                    answer = await asyncio.wait_for(reader.readuntil(b"ok"), timeout=30)
                except (OSError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError):
                    self.refused += 1
                    return
                if b" 200 " in answer:
                    self.kept += 1

        await asyncio.gather(*(one() for _ in range(self.count)))
        self.done.set()
        await self._release.wait()
        for writer in writers:
            writer.close()


def served_from_localhost(server: WebhookServer | WorkerPool, ca: tuple[bytes, bytes]) -> bool:
    """A new connection from 127.0.0.1 (the API server's stand-in) gets its review answered."""
    context = ssl.create_default_context(cadata=ca[0].decode())
    try:
        with httpx.Client(verify=context, timeout=5) as client:
            response = client.post(server.url + MUTATE_PATH + "?timeout=5s", content=BODY)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and response.json()["response"]["patchType"] == "JSONPatch"


def test_2048_kept_alive_connections_from_one_address_leave_new_connections_of_another_served(
    certificate: tuple[Path, Path], ca: tuple[bytes, bytes]
) -> None:
    # On the old webhook: the 2,048 connections of one pod filled the cap and no new connection was served.
    with webhook(certificate) as server, Holder(server.url, ca[0], ATTACKER, DEFAULT_MAX_CONNECTIONS) as attack:
        assert attack.done.wait(120), "the attacker's connections were neither answered nor closed"
        assert attack.kept == DEFAULT_MAX_CONNECTIONS_PER_CLIENT, (attack.kept, attack.refused)
        assert wait_for(lambda: served_from_localhost(server, ca), what="a review served from 127.0.0.1")
        # The health port is not counted by the webhook port's caps, even for the address that fills them.
        with httpx.Client(timeout=5, transport=httpx.HTTPTransport(local_address=ATTACKER)) as client:
            assert client.get(server.health_url + "/readyz").text == "ok"
            assert "kubemcsa_webhook_requests_total" in client.get(server.health_url + "/metrics").text


def test_at_the_total_cap_an_idle_connection_of_the_biggest_holder_makes_room(
    certificate: tuple[Path, Path], ca: tuple[bytes, bytes]
) -> None:
    # Four pods at the per-address cap fill the total: the fifth address still gets in, at their expense.
    limits = ConnectionLimits(max_connections=32, max_connections_per_client=8)
    with webhook(certificate, limits=limits) as server:
        holders = [Holder(server.url, ca[0], f"127.0.0.{2 + i}", 8) for i in range(4)]
        for holder in holders:
            holder.__enter__()
        try:
            for holder in holders:
                assert holder.done.wait(60) and holder.kept == 8, (holder.kept, holder.refused)
            assert wait_for(lambda: served_from_localhost(server, ca), what="a review served from 127.0.0.1")
        finally:
            for holder in holders:
                holder.__exit__()


def test_a_forwarded_header_neither_lifts_a_clients_cap_nor_spends_another_addresss(
    certificate: tuple[Path, Path], ca: tuple[bytes, bytes]
) -> None:
    # The attacker's every request claims to come from 127.0.0.1 (and from a proxy in front of it): the caps
    # count the socket's address, and the server honours no forwarded header, so the attacker keeps its own 8
    # and the address it names keeps all of its own.
    forged = "X-Forwarded-For: 127.0.0.1\r\nX-Real-IP: 127.0.0.1\r\nForwarded: for=127.0.0.1\r\n"
    with webhook(certificate, limits=ConnectionLimits(max_connections=64, max_connections_per_client=8)) as server:
        with Holder(server.url, ca[0], ATTACKER, 16, headers=forged) as attack:
            assert attack.done.wait(60) and attack.kept == 8, (attack.kept, attack.refused)
            with Holder(server.url, ca[0], "127.0.0.1", 8) as named:
                assert named.done.wait(60) and named.kept == 8, (named.kept, named.refused)


def test_the_limits_reach_every_serving_worker(certificate: tuple[Path, Path], ca: tuple[bytes, bytes]) -> None:
    # `--workers N` hands the limits to each serving process in its start-up config: the pod opening 16
    # connections to the one worker keeps the per-client cap's 4, and 127.0.0.1 is still served.
    cache = StaticCache({NS: ENABLED}, IMPORTS)
    limits = ConnectionLimits(max_connections=64, max_connections_per_client=4)
    with WorkerPool(cache, *certificate, workers=1, limits=limits, log_level="warning") as pool:
        with Holder(pool.url, ca[0], ATTACKER, 16) as attack:
            assert attack.done.wait(60) and attack.kept == 4, (attack.kept, attack.refused)
            assert served_from_localhost(pool, ca)


def test_an_idle_kept_alive_connection_is_closed_by_the_server(
    certificate: tuple[Path, Path], ca: tuple[bytes, bytes]
) -> None:
    with webhook(certificate, limits=ConnectionLimits(idle_timeout=0.2)) as server:
        context = ssl.create_default_context(cadata=ca[0].decode())
        host, port = server.url.removeprefix("https://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname=host) as conn:
                conn.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                received = b""
                while True:  # the answer, then the end of the stream once the server closes the idle connection
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    received += chunk
        assert received.startswith(b"HTTP/1.1 200") and received.endswith(b"ok")


def test_the_flags_reach_the_server() -> None:
    args = build_parser().parse_args(
        ["--max-connections-per-client", "7", "--idle-timeout", "30", "--health-port", "0"]
    )
    assert (args.max_connections_per_client, args.idle_timeout, args.health_port) == (7, 30.0, 0)
    defaults = build_parser().parse_args([])
    assert defaults.health_port == 8080 and defaults.max_connections_per_client == DEFAULT_MAX_CONNECTIONS_PER_CLIENT
