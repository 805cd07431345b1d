"""WebhookServer over real TLS: serving, certificate hot reload while requests flow, graceful stop, CLI errors."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kubemcsa.client import tls
from kubemcsa.contract import api
from kubemcsa_testing.wait import wait_for
from webhook.__main__ import main
from webhook.app import MUTATE_PATH
from webhook.connections import DEFAULT_REQUEST_READ_TIMEOUT, ConnectionLimits
from webhook.lookups import StaticCache
from webhook.server import WebhookServer

FIXTURES = Path(__file__).parent / "fixtures"
NS = "capture-demo"
ENABLED = {api.NAMESPACE_LABEL: api.NAMESPACE_LABEL_VALUE}
IMPORTS = {(NS, "cluster2-default-pod-lister"), (NS, "cluster3-default-pod-lister")}
BODY = (FIXTURES / "admissionreview-v1-pod.json").read_bytes()


def write_pair(directory: Path, ca: tuple[bytes, bytes]) -> tuple[Path, Path]:
    cert, key = tls.make_serving_cert(ca[0], ca[1], ["localhost"], ["127.0.0.1"])
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    # Key then certificate, each by rename: what the certificate renewal does.
    for path, content in ((key_file, key), (cert_file, cert)):
        temp = path.with_suffix(".tmp")
        temp.write_bytes(content)
        temp.replace(path)
    return cert_file, key_file


def served_certificate(url: str) -> bytes:
    host, port = url.removeprefix("https://").rsplit(":", 1)
    return ssl.get_server_certificate((host, int(port))).encode()


@pytest.fixture
def ca() -> tuple[bytes, bytes]:
    return tls.make_ca("test-webhook-ca")


@pytest.fixture
def server(tmp_path: Path, ca: tuple[bytes, bytes]) -> Iterator[WebhookServer]:
    cert_file, key_file = write_pair(tmp_path, ca)
    cache = StaticCache({NS: ENABLED}, IMPORTS)
    with WebhookServer(None, cert_file, key_file, cache=cache, reload_interval=0.05) as s:
        yield s


def client_for(ca: tuple[bytes, bytes]) -> httpx.Client:
    context = ssl.create_default_context(cadata=ca[0].decode())
    return httpx.Client(verify=context, timeout=5)


def test_serves_reviews_health_and_metrics_over_tls(server: WebhookServer, ca: tuple[bytes, bytes]) -> None:
    with client_for(ca) as c:
        response = c.post(server.url + MUTATE_PATH + "?timeout=5s", content=BODY)
        assert response.status_code == 200
        assert response.json()["response"]["patchType"] == "JSONPatch"
        assert c.get(server.url + "/healthz").status_code == 200
        assert c.get(server.url + "/readyz").status_code == 200
        assert "kubemcsa_webhook_requests_total" in c.get(server.url + "/metrics").text


def test_renewed_certificate_is_served_without_failed_requests(
    server: WebhookServer, ca: tuple[bytes, bytes], tmp_path: Path
) -> None:
    failures: list[BaseException] = []
    answered = 0
    stop = threading.Event()

    def load() -> None:
        nonlocal answered
        while not stop.is_set():
            # A new connection per request: each handshake sees whichever certificate is current.
            with client_for(ca) as c:
                try:
                    assert c.post(server.url + MUTATE_PATH, content=BODY).status_code == 200
                    answered += 1
                except BaseException as exc:
                    failures.append(exc)

    before = served_certificate(server.url)
    thread = threading.Thread(target=load)
    thread.start()
    try:
        wait_for(lambda: answered > 3)
        renewed_cert, _ = write_pair(tmp_path, ca)
        renewed = renewed_cert.read_bytes()
        assert renewed != before
        wait_for(lambda: served_certificate(server.url).strip() == renewed.strip())
        count = answered
        wait_for(lambda: answered > count + 3)
    finally:
        stop.set()
        thread.join()
    assert failures == []
    assert server.reloader is not None and server.reloader.reloads == 1


def test_stop_turns_readiness_off_first(server: WebhookServer, ca: tuple[bytes, bytes]) -> None:
    server.drain()
    with client_for(ca) as c:
        response = c.get(server.url + "/readyz")
    assert response.status_code == 503 and "shutting down" in response.text


def test_unusable_certificate_files_fail_at_start(tmp_path: Path) -> None:
    (tmp_path / "tls.crt").write_text("not a certificate")
    (tmp_path / "tls.key").write_text("not a key")
    server = WebhookServer(None, tmp_path / "tls.crt", tmp_path / "tls.key", cache=StaticCache())
    with pytest.raises(ssl.SSLError):
        server.start()


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "0"],
        ["--manage-certificates", "--tls-cert-file", "x", "--tls-key-file", "y"],
    ],
)
def test_cli_rejects_incomplete_tls_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "error:" in capsys.readouterr().err


def test_cli_without_cluster_configuration_says_what_to_do(
    tmp_path: Path, ca: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cert_file, key_file = write_pair(tmp_path, ca)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    code = main(["--tls-cert-file", str(cert_file), "--tls-key-file", str(key_file), "--port", "0"])
    assert code == 1
    assert "--kubeconfig" in capsys.readouterr().err


# --- slow clients ---------------------------------------------------------------------------------------------

SLOW_CONNECTIONS = 1000  # TLS, headers sent, body declared and never finished
SILENT_CONNECTIONS = 50  # TCP only: not even a TLS hello
READ_TIMEOUT = DEFAULT_REQUEST_READ_TIMEOUT  # the default, 10 s: time enough to open all of them on a busy machine


async def _slowloris(url: str, ca_pem: bytes, counts: dict[str, int]) -> None:
    """Open the slow connections and wait (up to 60 s each) for the server to close them."""
    import asyncio

    host, port = url.removeprefix("https://").rsplit(":", 1)
    context = ssl.create_default_context(cadata=ca_pem.decode())
    head = (
        f"POST {MUTATE_PATH}?timeout=5s HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        "Content-Length: 100000\r\n\r\n{"
    ).encode()
    handshakes = asyncio.Semaphore(50)  # connect in waves: the point is 1,000 held at once, not a SYN flood

    async def one(tls: bool) -> None:
        async with handshakes:
            reader, writer = await asyncio.open_connection(host, int(port), ssl=context if tls else None)
            if tls:
                writer.write(head)
                await writer.drain()
        counts["open"] += 1
        try:
            while await asyncio.wait_for(reader.read(65536), timeout=60):
                pass  # the answer to the unfinished request (a 400), if any; then the server closes
            counts["closed"] += 1
        except (TimeoutError, ConnectionError, ssl.SSLError):
            counts["errors"] += 1
        finally:
            writer.close()

    kinds = [True] * SLOW_CONNECTIONS + [False] * SILENT_CONNECTIONS
    await asyncio.gather(*(one(tls) for tls in kinds))


def test_a_slowloris_leaves_the_webhook_answering_and_is_closed_by_the_read_timeout(
    tmp_path: Path, ca: tuple[bytes, bytes]
) -> None:
    import asyncio

    cert_file, key_file = write_pair(tmp_path, ca)
    cache = StaticCache({NS: ENABLED}, IMPORTS)
    counts = {"open": 0, "closed": 0, "errors": 0}
    total = SLOW_CONNECTIONS + SILENT_CONNECTIONS
    # All from one address: the per-client cap (which would close most of them at once) is lifted, so that the
    # read timeout is what closes them.
    limits = ConnectionLimits(request_read_timeout=READ_TIMEOUT, max_connections_per_client=total)
    with WebhookServer(None, cert_file, key_file, cache=cache, limits=limits) as server:
        attack = threading.Thread(target=asyncio.run, args=(_slowloris(server.url, ca[0], counts),), daemon=True)
        attack.start()
        wait_for(lambda: counts["open"] == total, timeout=60, what="the slow connections to be open")
        held_at_once = counts["open"] - counts["closed"]
        # While they are held, the webhook answers as usual (on a new connection, as kube-apiserver might).
        with client_for(ca) as c:
            assert c.get(server.url + "/healthz").status_code == 200
            response = c.post(server.url + MUTATE_PATH + "?timeout=5s", content=BODY)
            assert response.status_code == 200 and response.json()["response"]["patchType"] == "JSONPatch"
        still_held = counts["open"] - counts["closed"]
        # The server closes every one of them (the client would wait a minute), none is left behind.
        wait_for(lambda: counts["closed"] + counts["errors"] == total, timeout=60, what="the server to close them")
        attack.join(5)
        with client_for(ca) as c:
            assert c.get(server.url + "/healthz").status_code == 200
    assert held_at_once > SLOW_CONNECTIONS / 2 and still_held > 0, (held_at_once, still_held)
    assert counts["closed"] == total, counts


def test_connections_beyond_the_cap_are_closed_and_the_others_served(tmp_path: Path, ca: tuple[bytes, bytes]) -> None:
    cert_file, key_file = write_pair(tmp_path, ca)
    cache = StaticCache({NS: ENABLED}, IMPORTS)
    with WebhookServer(None, cert_file, key_file, cache=cache, limits=ConnectionLimits(max_connections=2)) as server:
        with client_for(ca) as first, client_for(ca) as second:
            assert first.get(server.url + "/healthz").status_code == 200
            assert second.get(server.url + "/healthz").status_code == 200
            with client_for(ca) as third, pytest.raises(httpx.HTTPError):
                third.get(server.url + "/healthz")
            # The established (kept-alive) connections go on being served.
            assert first.post(server.url + MUTATE_PATH, content=BODY).status_code == 200
        with client_for(ca) as again:
            wait_for(lambda: _healthy(again, server.url), what="a free connection slot")


def _healthy(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url + "/healthz").status_code == 200
    except httpx.HTTPError:
        return False
