"""kubemcsa.certificates.reloader and kubemcsa.certificates.manager.write_files: a running HTTPS server swaps
its certificate, dropping nothing."""

import asyncio
import datetime
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from certs_tls_server import RequestLoop, TLSServer, client_context, request, wait_for

from kubemcsa.certificates import manager
from kubemcsa.certificates import plan as planning
from kubemcsa.certificates.reloader import CertificateReloader
from kubemcsa.client import tls

NAMES = tls.service_dns_names("webhook", "mcsa")
HOST = NAMES[0]


def _bundle(material: planning.Material) -> manager.CertificateBundle:
    return manager.CertificateBundle(
        material.ca_bundle_pem, material.cert_pem, material.key_pem, tls.not_after(material.cert_pem)
    )


def _der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


def _keep_alive_request(sock: ssl.SSLSocket) -> None:
    sock.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    response = b""
    while not response.endswith(b"\r\n\r\nok"):
        chunk = sock.recv(4096)
        assert chunk, f"connection closed after {response!r}"
        response += chunk
    assert response.startswith(b"HTTP/1.1 200")


@pytest.fixture
def materials():
    """A certificate issued 340 days ago (due for renewal now) and its renewal by the same CA, both valid now."""
    now = datetime.datetime.now(datetime.UTC)
    old = planning.plan(None, NAMES, now - datetime.timedelta(days=340)).material
    new = planning.plan(old, NAMES, now)
    assert new.actions == (planning.ACTION_ISSUED_CERT,)
    return old, new.material


@pytest.fixture
def server(tmp_path, materials):
    cert_file, key_file = manager.write_files(_bundle(materials[0]), tmp_path)
    tls_server = TLSServer(cert_file, key_file).start()
    yield tls_server
    tls_server.stop()


def test_write_files_is_atomic_private_and_idempotent(tmp_path, materials):
    bundle = _bundle(materials[0])
    cert_file, key_file = manager.write_files(bundle, tmp_path / "certs")
    assert Path(cert_file).read_bytes() == bundle.cert_pem
    assert Path(key_file).read_bytes() == bundle.key_pem
    assert (tmp_path / "certs" / "ca.crt").read_bytes() == bundle.ca_pem
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    before = os.stat(cert_file).st_ino, os.stat(key_file).st_ino
    manager.write_files(bundle, tmp_path / "certs")
    assert (os.stat(cert_file).st_ino, os.stat(key_file).st_ino) == before  # unchanged files are not rewritten
    assert sorted(p.name for p in (tmp_path / "certs").iterdir()) == ["ca.crt", "tls.crt", "tls.key"]


def test_bundle_repr_hides_the_key(materials):
    bundle = _bundle(materials[0])
    assert "PRIVATE" not in repr(bundle) and "hidden" in repr(bundle)
    assert "PRIVATE" not in str(bundle)


def test_renewal_while_requests_flow_drops_nothing(server, materials, tmp_path):
    old, new = materials
    context = client_context(old.ca_bundle_pem)
    # A connection opened before the swap goes on with its session afterwards.
    with (
        socket.create_connection(("127.0.0.1", server.port)) as raw,
        context.wrap_socket(raw, server_hostname=HOST) as kept,
    ):
        _keep_alive_request(kept)
        with RequestLoop(context, server.port, HOST) as requests:
            wait_for(lambda: requests.count(_der(old.cert_pem)) >= 20, "requests with the old certificate")
            manager.write_files(_bundle(new), tmp_path)
            assert server.reloader.check()
            swapped_at = len(requests.certificates)
            assert not server.reloader.check()  # nothing changed since
            wait_for(lambda: requests.count(_der(new.cert_pem)) >= 20, "requests with the new certificate")
        assert requests.failures == []
        # Once swapped, every new handshake presents the new certificate (a request per thread may have been
        # in flight with the old one).
        assert set(requests.certificates[swapped_at + requests.threads :]) == {_der(new.cert_pem)}
        assert request(context, server.port, HOST) == _der(new.cert_pem)
        _keep_alive_request(kept)
        assert kept.getpeercert(binary_form=True) == _der(old.cert_pem)
    assert server.reloader.reloads == 1


def test_a_half_written_or_bad_pair_keeps_the_old_certificate(server, materials, tmp_path, caplog):
    old, new = materials
    context = client_context(old.ca_bundle_pem)
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"

    # The new key has landed but not the new certificate yet (write_files writes the key first).
    key_file.write_bytes(new.key_pem)
    assert not server.reloader.check()
    assert "do not belong together" not in caplog.text  # the reason is a class name, never key material
    assert "PRIVATE" not in caplog.text
    assert request(context, server.port, HOST) == _der(old.cert_pem)

    # Garbage, then an empty file: still the old certificate, and checking again does not retry the same bytes.
    cert_file.write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    assert not server.reloader.check()
    cert_file.write_bytes(b"")
    assert not server.reloader.check()
    assert not server.reloader.check()
    assert request(context, server.port, HOST) == _der(old.cert_pem)

    # Missing files are survived too.
    cert_file.unlink()
    assert not server.reloader.check()
    assert request(context, server.port, HOST) == _der(old.cert_pem)

    # The complete pair loads.
    cert_file.write_bytes(new.cert_pem)
    assert server.reloader.check()
    assert request(context, server.port, HOST) == _der(new.cert_pem)
    assert server.reloader.reloads == 1


def test_reloader_without_a_loop_loads_directly(tmp_path, materials):
    old, new = materials
    cert_file, key_file = manager.write_files(_bundle(old), tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    reloader = CertificateReloader(context, cert_file, key_file)
    assert reloader.check()  # not marked as loaded: the first check loads the same pair again
    assert not reloader.check()
    # Swaps in quick succession (same timestamp tick, recycled inodes) are each noticed.
    for index in range(6):
        manager.write_files(_bundle((new, old)[index % 2]), tmp_path)
        assert reloader.check()
    assert reloader.reloads == 7
    assert "tls.key" in repr(reloader) and "PRIVATE" not in repr(reloader)


def test_the_client_refuses_a_name_the_certificate_does_not_have(server, materials):
    context = client_context(materials[0].ca_bundle_pem)
    with pytest.raises(ssl.SSLCertVerificationError):
        request(context, server.port, "webhook.other.svc")


def test_a_busy_event_loop_delays_the_swap_without_losing_it(tmp_path, materials):
    old, new = materials
    cert_file, key_file = manager.write_files(_bundle(old), tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    busy = threading.Event()
    try:
        wait_for(loop.is_running, "the event loop to run")
        reloader = CertificateReloader(context, cert_file, key_file, loop=loop, swap_timeout=0.2)
        reloader.mark_loaded()
        loop.call_soon_threadsafe(busy.wait)  # a handler hogging the loop
        manager.write_files(_bundle(new), tmp_path)
        assert not reloader.check()  # timed out: not the pair's fault, so not remembered as bad
        busy.set()
        assert reloader.check()
        assert reloader.reloads == 1
    finally:
        busy.set()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


class _RefusingContext(ssl.SSLContext):
    """A server context whose every load fails as OpenSSL fails (an SSLError, which is an OSError)."""

    def load_cert_chain(self, certfile, keyfile=None, password=None):
        raise ssl.SSLError(ssl.SSL_ERROR_SSL, "KEY_VALUES_MISMATCH")


def test_an_openssl_error_keeps_the_old_certificate_and_leaks_nothing(tmp_path, materials, caplog):
    old, new = materials
    cert_file, key_file = manager.write_files(_bundle(old), tmp_path)
    reloader = CertificateReloader(_RefusingContext(ssl.PROTOCOL_TLS_SERVER), cert_file, key_file)
    open_files = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    manager.write_files(_bundle(new), tmp_path)
    assert not reloader.check()
    assert not reloader.check()  # the same pair is not retried until the files change
    assert reloader.reloads == 0
    assert "does not load" in caplog.text and "PRIVATE" not in caplog.text
    if open_files is not None:
        assert len(os.listdir("/proc/self/fd")) == open_files
