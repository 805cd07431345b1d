"""WebhookServer over real TLS: serving, certificate hot reload while requests flow, graceful stop, CLI errors."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kubemcsa import api, tls
from kubemcsa.testing.wait import wait_for
from webhook.__main__ import WebhookServer, main
from webhook.app import MUTATE_PATH
from webhook.cache import StaticCache

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
