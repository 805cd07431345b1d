"""The lean path (kubemcsa.client.lean.json_request) over real HTTPS: against the API server of the tier, and against
a scripted TLS server for what an API server does not do on demand (close a kept-alive socket as a request arrives,
answer late or chunked, ask for a client certificate)."""

from __future__ import annotations

import base64
import datetime
import json
import os
import socket
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import urllib3
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes.client import ApiClient, Configuration
from kubernetes.client.exceptions import ApiException

from kubemcsa.client import connect, kube, tls
from kubemcsa.client.connect import client_for_credentials
from kubemcsa.client.kubeconfig import api_client_for, load_api_client, resolve_context
from kubemcsa.contract.credentials import Credentials
from kubemcsa_testing.tls import ServingCerts, make_serving_certs

TOKEN = "lean-path-test-token-0123456789"


# --- a scripted TLS server -----------------------------------------------------------------------------------------


class ScriptedServer:
    """HTTPS on 127.0.0.1 that records each request (connection number, method, path) and answers as
    `action(connection, request number, method)` says: "answer", "chunked", "answer and close", "close" (read the
    request, close without a byte of answer) or "silent" (never answer). With `client_ca`, a client certificate
    signed by it is required, and answers say its common name."""

    def __init__(self, action: Callable[[int, int, str], str] | None = None, client_ca: bytes | None = None) -> None:
        self.certs: ServingCerts = make_serving_certs("scripted")
        self.context = self.certs.server_context()
        if client_ca is not None:
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_verify_locations(cadata=client_ca.decode())
        self.action = action or (lambda connection, number, method: "answer")
        self.requests: list[tuple[int, str, str]] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def credentials(self, token: str = TOKEN) -> Credentials:
        return Credentials(server=self.url, ca_crt=self.certs.ca_pem, token=token, namespace="default")

    def stop(self) -> None:
        self._released.set()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
            threading.Thread(target=self._serve, args=(raw, number), daemon=True).start()

    def _serve(self, raw: socket.socket, connection: int) -> None:
        try:
            with self.context.wrap_socket(raw, server_side=True) as sock:
                subject = dict(item[0] for item in (sock.getpeercert() or {}).get("subject", ()))
                pending = b""
                while True:
                    request, pending = _read_request(sock, pending)
                    if request is None:
                        return
                    method, path = request
                    with self._lock:
                        self.requests.append((connection, method, path))
                        number = len(self.requests)
                    action = self.action(connection, number, method)
                    if action == "close":
                        return
                    if action == "silent":
                        self._released.wait(30)
                        return
                    sock.sendall(
                        _answer(action, {"path": path, "connection": connection, "cn": subject.get("commonName")})
                    )
                    if action == "answer and close":
                        return
        except OSError:  # a client that went away, or a handshake it refused
            return


def _read_request(sock: ssl.SSLSocket, pending: bytes) -> tuple[tuple[str, str] | None, bytes]:
    while b"\r\n\r\n" not in pending:
        data = sock.recv(65536)
        if not data:
            return None, b""
        pending += data
    head, _, pending = pending.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ")
    length = next((int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")), 0)
    while len(pending) < length:
        data = sock.recv(65536)
        if not data:
            return None, b""
        pending += data
    return (method, path), pending[length:]


def _answer(action: str, document: dict) -> bytes:
    payload = json.dumps(document).encode()
    if action == "chunked":
        pieces = [payload[i : i + 7] for i in range(0, len(payload), 7)]
        body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"
        return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    close = b"Connection: close\r\n" if action == "answer and close" else b""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n" % (close, len(payload))
    return head + payload


@pytest.fixture
def scripted():
    servers: list[ScriptedServer] = []

    def make(*args, **kwargs) -> ScriptedServer:
        servers.append(ScriptedServer(*args, **kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


def _client_certificate(ca_pem: bytes, ca_key_pem: bytes, common_name: str) -> tuple[bytes, bytes]:
    """A client certificate (clientAuth) signed by the CA: (cert_pem, key_pem)."""
    ca = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- against the API server of the tier ----------------------------------------------------------------------------


@pytest.mark.real_tier
def test_a_tls_failure_is_an_api_exception_without_a_status_nor_the_token(cluster1):
    wrong_ca = make_serving_certs("not-the-cluster").ca_pem
    client = client_for_credentials(Credentials(cluster1.url, wrong_ca, TOKEN, "default"))  # retries off
    for call in (
        lambda: kube.Resource(client, kube.CONFIG_MAPS).get("x", "default"),
        lambda: kube.Resource(client, kube.CONFIG_MAPS).create({"metadata": {"name": "x", "namespace": "default"}}),
    ):
        with pytest.raises(ApiException) as info:
            call()
        assert info.value.status == 0
        assert info.value.reason.startswith("SSLError\n") and "CERTIFICATE_VERIFY_FAILED" in info.value.reason
        assert TOKEN not in str(info.value) and TOKEN not in repr(info.value)
    # With urllib3's default retries (a kubeconfig's client), what urllib3 raises after them, as before.
    configuration = Configuration(host=cluster1.url)
    configuration.ca_cert_data = wrong_ca.decode()
    configuration.api_key = {"authorization": f"Bearer {TOKEN}"}
    with pytest.raises(urllib3.exceptions.MaxRetryError) as info:
        kube.Resource(ApiClient(configuration), kube.CONFIG_MAPS).get("x", "default")
    assert isinstance(info.value.reason, urllib3.exceptions.SSLError) and TOKEN not in str(info.value)


@pytest.mark.real_tier
def test_a_rotated_token_file_is_used_from_the_next_call(cluster1, tmp_path):
    admin = cluster1.admin_client()
    for name in ("alice", "bob"):
        kube.Resource(admin, kube.SERVICE_ACCOUNTS).create({"metadata": {"name": name}}, "default")
    token_file = tmp_path / "token"
    token_file.write_text(cluster1.issue_token("default", "alice"))
    config = cluster1.kubeconfig(token="unused-inline-token")
    config["users"][0]["user"] = {"tokenFile": str(token_file)}
    client = api_client_for(resolve_context(config))
    assert kube.whoami(client)["username"] == "system:serviceaccount:default:alice"
    rotated = tmp_path / "token.new"
    rotated.write_text(cluster1.issue_token("default", "bob"))
    os.replace(rotated, token_file)  # as the kubelet swaps a projected token
    assert kube.whoami(client)["username"] == "system:serviceaccount:default:bob"


@pytest.mark.real_tier
def test_api_errors_keep_the_rest_clients_shape(cluster1):
    maps = kube.Resource(cluster1.admin_client(), kube.CONFIG_MAPS)
    with pytest.raises(ApiException) as info:
        maps.get("missing", "default")
    error = info.value
    assert (error.status, error.reason, type(error).__name__) == (404, "Not Found", "NotFoundException")
    assert error.headers["content-type"].startswith("application/json")
    assert kube.error_reason(error) == "NotFound" and json.loads(error.body)["code"] == 404


@pytest.mark.real_tier
def test_large_lists_and_concurrent_calls_read_whole(cluster1):
    maps = kube.Resource(cluster1.admin_client(), kube.CONFIG_MAPS)
    filler = "x" * 2000
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: maps.create(_configmap(f"big-{i}", v=filler)), range(150)))
    listed = maps.list("default", label_selector="lean=test")
    assert sorted(item["metadata"]["name"] for item in listed["items"]) == sorted(f"big-{i}" for i in range(150))
    assert len(json.dumps(listed)) > 300_000  # many reads of a TLS socket, chunked on kube-apiserver

    def reads(i: int) -> list[str]:
        return [maps.get(f"big-{(i * 7 + k) % 150}", "default")["metadata"]["name"] for k in range(25)]

    with ThreadPoolExecutor(8) as pool:
        for i, names in enumerate(pool.map(reads, range(8))):
            assert names == [f"big-{(i * 7 + k) % 150}" for k in range(25)]


def _configmap(name: str, **data: str) -> dict:
    labels = {"lean": "test"}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "data": data,
    }


def test_a_kept_alive_connection_the_server_closed_is_replaced(cluster1):
    client = client_for_credentials(Credentials(cluster1.url, cluster1.ca_pem, cluster1.admin_token, "default"))
    namespaces = kube.Resource(client, kube.NAMESPACES)
    namespaces.get("default")
    before = cluster1.connection_attempts
    namespaces.get("default")
    assert cluster1.connection_attempts == before  # kept alive
    cluster1.make_unreachable()  # cuts every open connection
    cluster1.make_reachable()
    assert namespaces.get("default")["metadata"]["name"] == "default"
    assert cluster1.connection_attempts == before + 1
    client.close()  # the pool's sockets with it; a later call opens its own
    assert namespaces.get("default")["metadata"]["name"] == "default"
    assert cluster1.connection_attempts == before + 2


def test_calls_from_many_threads_share_a_bounded_set_of_connections(cluster1):
    client = cluster1.admin_client()
    namespaces = kube.Resource(client, kube.NAMESPACES)
    before = cluster1.connection_attempts
    with ThreadPoolExecutor(6) as pool:
        names = list(pool.map(lambda _: namespaces.get("default")["metadata"]["name"], range(300)))
    assert names == ["default"] * 300
    assert cluster1.connection_attempts - before <= 6  # one per thread at most: each goes back to the pool


def test_a_watch_is_read_as_it_arrives_and_its_connection_reused_once_it_ended(cluster1):
    client = cluster1.admin_client()
    maps = kube.Resource(client, kube.CONFIG_MAPS)
    version = maps.list("default")["metadata"]["resourceVersion"]
    maps.create(_configmap("watched-1", big="x" * 200_000))  # one event over many TLS records and reads
    maps.create(_configmap("watched-2"))
    before = cluster1.connection_attempts
    events = list(maps.watch("default", resource_version=version, timeout_seconds=1))
    names = [event["object"]["metadata"]["name"] for event in events if event["type"] == "ADDED"]
    assert names == ["watched-1", "watched-2"]
    assert len(events[0]["object"]["data"]["big"]) == 200_000
    maps.get("watched-2", "default")  # the watch's connection, read to its end, carries the next call
    assert cluster1.connection_attempts - before <= 1


def test_closing_a_watch_from_another_thread_ends_it_at_once_and_drops_its_connection(cluster1):
    client = cluster1.admin_client()
    maps = kube.Resource(client, kube.CONFIG_MAPS)
    watch = maps.watch("default", resource_version=maps.list("default")["metadata"]["resourceVersion"])
    ended = threading.Event()

    def follow() -> None:
        try:
            for _ in watch:
                pass
        except kube.CONNECTION_ERRORS:
            pass  # what a reader whose socket was shut sees (the informer, stopping, ignores it)
        ended.set()

    threading.Thread(target=follow, daemon=True).start()
    watch.close()
    assert ended.wait(10), "a closed watch kept its reader blocked"
    before = cluster1.connection_attempts
    assert "items" in maps.list("default")
    assert cluster1.connection_attempts - before <= 1  # a half-read stream is never handed to the next call


def test_a_pool_with_room_for_every_worker_opens_no_connection_per_request(cluster1):
    configuration = cluster1.admin_client().configuration
    configuration.connection_pool_maxsize = 2  # as the official client sizes it on a small host (5 per core)
    small = ApiClient(configuration)
    client = connect.with_room_for(small, 8)
    assert client is small and client.rest_client.pool_manager.connection_pool_kw["maxsize"] == 8
    assert connect.with_room_for(client, 4).rest_client is client.rest_client  # room enough: left as it is
    namespaces = kube.Resource(client, kube.NAMESPACES)
    before = cluster1.connection_attempts
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: namespaces.get("default"), range(400)))
    assert cluster1.connection_attempts - before <= 8  # not one per request past the second thread


# --- against a scripted server -------------------------------------------------------------------------------------


def _closes_the_second_request(connection: int, number: int, method: str) -> str:
    return "close" if number == 2 else "answer"


def test_a_read_whose_kept_alive_socket_closes_on_it_is_sent_again_on_a_fresh_one(scripted):
    server = scripted(_closes_the_second_request)
    client = client_for_credentials(server.credentials())  # no urllib3 retries: the resend is the lean path's own
    assert kube.get_path(client, "/first")["connection"] == 1
    assert kube.get_path(client, "/second")["connection"] == 2
    assert server.requests == [(1, "GET", "/first"), (1, "GET", "/second"), (2, "GET", "/second")]


@pytest.mark.parametrize("retries", [False, None])  # none, or urllib3's default (it never resends a POST either)
def test_a_write_whose_kept_alive_socket_closes_on_it_is_not_sent_again(scripted, retries):
    server = scripted(_closes_the_second_request)
    client = client_for_credentials(server.credentials())
    client.configuration.retries = retries
    client = ApiClient(client.configuration)
    secrets = kube.Resource(client, kube.SECRETS)
    secrets.create({"metadata": {"name": "a", "namespace": "default"}})
    with pytest.raises(urllib3.exceptions.ProtocolError):
        secrets.create({"metadata": {"name": "b", "namespace": "default"}})
    assert [method for _, method, _ in server.requests] == ["POST", "POST"]  # the server may have acted on it
    assert server.connections == 1


def test_chunked_answers_and_connection_close_are_followed(scripted):
    actions = {1: "chunked", 2: "answer and close", 3: "chunked"}
    server = scripted(lambda connection, number, method: actions.get(number, "answer"))
    client = client_for_credentials(server.credentials())
    assert [kube.get_path(client, f"/{n}")["connection"] for n in range(1, 5)] == [1, 1, 2, 2]


def test_a_late_answer_is_a_read_timeout_and_is_not_sent_again(scripted):
    server = scripted(lambda connection, number, method: "silent")
    client = client_for_credentials(server.credentials())
    for timeout in ((5, 0.3), 0.3):
        with pytest.raises(urllib3.exceptions.ReadTimeoutError):
            kube.get_path(client, "/late", timeout=timeout)
    assert len(server.requests) == 2


def test_a_client_certificate_authenticates(scripted, tmp_path):
    ca_pem, ca_key_pem = tls.make_ca("clients")
    server = scripted(client_ca=ca_pem)
    cert_pem, key_pem = _client_certificate(ca_pem, ca_key_pem, "system:node:worker-1")
    config = {
        "clusters": [
            {"name": "c", "cluster": {"server": server.url, "certificate-authority-data": _b64(server.certs.ca_pem)}}
        ],
        "users": [{"name": "u", "user": {"client-certificate-data": _b64(cert_pem), "client-key-data": _b64(key_pem)}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    }
    client = api_client_for(resolve_context(config))
    assert kube.get_path(client, "/whoami")["cn"] == "system:node:worker-1"
    assert kube.get_path(client, "/again") == {"path": "/again", "connection": 1, "cn": "system:node:worker-1"}
    # From a kubeconfig file too (the certificate and key in files it names).
    (tmp_path / "tls.crt").write_bytes(cert_pem)
    (tmp_path / "tls.key").write_bytes(key_pem)
    config["users"][0]["user"] = {"client-certificate": "tls.crt", "client-key": "tls.key"}
    (tmp_path / "config").write_text(json.dumps(config))
    assert kube.get_path(load_api_client(str(tmp_path / "config")), "/file")["cn"] == "system:node:worker-1"
    # Without one, the server refuses the handshake: no answer, an error of the connection.
    anonymous = client_for_credentials(Credentials(server.url, server.certs.ca_pem, TOKEN, "default"))
    with pytest.raises((ApiException, *kube.CONNECTION_ERRORS)) as info:
        kube.get_path(anonymous, "/anonymous")
    assert getattr(info.value, "status", 0) == 0 and TOKEN not in str(info.value)
    assert all(path != "/anonymous" for _, _, path in server.requests)
