"""Real control planes for the test suite: kube-apiserver, etcd and kube-controller-manager on loopback.

envtest's convention: `KUBEBUILDER_ASSETS` names a folder holding `kube-apiserver` and `etcd` (and optionally
`kube-controller-manager`, which deletes namespaces, collects garbage, creates each namespace's `default`
ServiceAccount and fills legacy token Secrets). `ControlPlane` starts one cluster from it and offers the part of
`ApiServer`'s interface that a real cluster can offer (`url`, `ca_pem`, `admin_token`, `kubeconfig`,
`write_kubeconfig`, `admin_client`, `client_for_token`, `issue_token`, `register_service`,
`configure_authentication`), so that a test written against `cluster1`/`cluster2` runs on either tier.

Webhooks registered with `clientConfig.service` are reached as kube-apiserver reaches them in a cluster: it
resolves the Service to its cluster IP and dials it, here through an egress selector (`--egress-selector-config-file`,
the "cluster" network) that is a small HTTP CONNECT proxy on loopback mapping `clusterIP:port` to where the test's
webhook really listens (`register_service`). TLS is still verified against `SERVICE.NAMESPACE.svc` and the caBundle.

Nothing is copied from the asset folder (it may be read-only): data, certificates and logs go under `workdir`.
Processes are stopped with TERM, a grace period, then KILL, etcd last; `stop()` is also registered with atexit, and
on Linux each child is killed if the thread that started it ends (PR_SET_PDEATHSIG): start them from the main thread.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import http.client
import json
import os
import secrets
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kubemcsa_testing.clients import ClusterClients
from kubemcsa_testing.tls import make_serving_certs

ASSETS_ENV = "KUBEBUILDER_ASSETS"
REQUIRED_BINARIES = ("kube-apiserver", "etcd")
SERVICE_CIDR = "10.96.0.0/16"
START_TIMEOUT = 90.0
STOP_GRACE = 5.0
SECOND_SIGNAL_AFTER = 0.5  # a component still running then gets its second TERM
# kube-controller-manager's controllers that need nodes or a cloud are left out (there is no kubelet).
CONTROLLERS = "*,-nodeipam,-nodelifecycle,-route,-service,-cloud-node-lifecycle,-persistentvolume-binder,-attachdetach"
ENABLE_HINT = (
    "real-control-plane tier skipped: set KUBEBUILDER_ASSETS to a folder with kube-apiserver and etcd "
    "(e.g. `setup-envtest use 1.36 -p path`) to run the end-to-end tests on real API servers too"
)


class ControlPlaneError(RuntimeError):
    """A control plane did not start; the message says which process and ends with its last log lines."""


def assets_folder(environ: dict[str, str] | None = None) -> Path | None:
    """The envtest asset folder named by KUBEBUILDER_ASSETS, if it holds the binaries a control plane needs."""
    value = (environ if environ is not None else os.environ).get(ASSETS_ENV, "").strip()
    if not value:
        return None
    folder = Path(value).expanduser().resolve()
    if not all(os.access(folder / name, os.X_OK) for name in REQUIRED_BINARIES):
        return None
    return folder


def missing_assets_reason(environ: dict[str, str] | None = None) -> str:
    """Why assets_folder() found nothing, for the one line the test session prints."""
    value = (environ if environ is not None else os.environ).get(ASSETS_ENV, "").strip()
    if not value:
        return ENABLE_HINT
    return f"real-control-plane tier skipped: {ASSETS_ENV}={value} lacks an executable kube-apiserver or etcd"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGKILL when the test process dies, whatever kills it."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Process:
    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.log = log
        self._file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            argv,
            stdout=self._file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = STOP_GRACE) -> None:
        """TERM, then TERM again, then KILL. kube-controller-manager's graceful stop outlasts the grace (it took the
        full 5 s every time); the Kubernetes components exit at once on a second signal, as their signal handler
        says, and what they keep is thrown away with the session's data."""
        for wait in (SECOND_SIGNAL_AFTER, grace):
            if not self.alive():
                break
            with contextlib.suppress(ProcessLookupError):
                self.popen.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(wait)
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
            self.popen.wait(grace)
        self._file.close()


class _ConnectProxy:
    """The API server's egress for the "cluster" network: HTTP CONNECT to `ip:port`, relayed to what
    `routes` maps it to (a registered webhook), or to that address itself."""

    def __init__(self, path: Path) -> None:
        # A Unix socket: kube-apiserver's HTTPConnect over TCP insists on mutual TLS, over a socket it needs none.
        self.routes: dict[str, tuple[str, int]] = {}
        self._tunnels: dict[str, set[socket.socket]] = {}
        self._lock = threading.Lock()
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(64)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="egress-proxy", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            conn.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 8192:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(line) < 2 or line[0] != "CONNECT":
                conn.sendall(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                return
            host, _, port = line[1].rpartition(":")
            with self._lock:
                target = self.routes.get(line[1], (host, int(port)))
                self._tunnels.setdefault(line[1], set()).add(conn)
            try:
                upstream = socket.create_connection(target, timeout=10)
            except OSError:
                conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
                return
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            conn.settimeout(None)
            upstream.settimeout(None)
            self._relay(conn, upstream)
        except OSError:
            pass
        finally:
            with self._lock:
                for tunnels in self._tunnels.values():
                    tunnels.discard(conn)
            conn.close()
            if upstream is not None:
                upstream.close()

    def route(self, address: str, target: tuple[str, int]) -> None:
        """Send new connections for `address` to `target`, and cut the open ones: as when a Service's only
        endpoint is replaced, the API server's kept-alive connections to the old one end."""
        with self._lock:
            self.routes[address] = target
            tunnels = self._tunnels.pop(address, set())
        for tunnel in tunnels:
            with contextlib.suppress(OSError):
                tunnel.shutdown(socket.SHUT_RDWR)

    def _relay(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        while not self._stopping.is_set():
            readable, _, _ = select.select(list(peers), [], [], 1.0)
            for sock in readable:
                data = sock.recv(65536)
                if not data:
                    return
                peers[sock].sendall(data)

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._sock.close()


def _rsa_key_pair() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class ControlPlane(ClusterClients):
    """One real cluster on loopback; see the module docstring. `start()` launches, `wait_ready()` waits."""

    tier = "real"

    def __init__(
        self,
        name: str,
        assets: Path,
        workdir: Path,
        authentication_config: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.assets = Path(assets)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.admin_token = secrets.token_urlsafe(32)
        self._port = free_port()
        self._certs = make_serving_certs(f"{name}-apiserver")
        self._authentication_config = authentication_config
        self._authentication_file = self.workdir / "authentication-config.yaml"
        self._processes: list[_Process] = []
        self._proxy: _ConnectProxy | None = None
        self._stopped = False
        self.max_token_expiration_seconds: int | None = None

    def __repr__(self) -> str:
        return f"ControlPlane(name={self.name!r}, url={self.url!r})"

    # What ApiServer offers too -------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self._port}"

    @property
    def issuer(self) -> str:
        """The service-account token issuer: the API URL, as the in-memory server's."""
        return self.url

    @property
    def ca_pem(self) -> bytes:
        return self._certs.ca_pem

    def issue_token(
        self, namespace: str, name: str, audiences: list[str] | None = None, expiration_seconds: int = 3600
    ) -> str:
        """A TokenRequest for an existing service account (kube-apiserver refuses less than 600 seconds)."""
        spec: dict[str, Any] = {"expirationSeconds": max(int(expiration_seconds), 600)}
        if audiences:
            spec["audiences"] = audiences
        return self.token_request(namespace, name, spec)["status"]["token"]

    def token_request(self, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"
        return self._request("POST", path, body)

    def register_service(self, namespace: str, name: str, port: int, url: str) -> None:
        """Route the API server's calls to Service NAMESPACE/NAME:PORT (as the manifests create it) to `url`."""
        assert self._proxy is not None
        from kubernetes import client

        service = client.CoreV1Api(self.admin_client()).read_namespaced_service(name, namespace)
        host, _, target_port = url.removeprefix("https://").rstrip("/").rpartition(":")
        self._proxy.route(f"{service.spec.cluster_ip}:{int(port or 443)}", (host, int(target_port)))

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """The in-memory server's controllers can be waited for; a real cluster's cannot (tests wait on state)."""
        return True

    def configure_authentication(self, config: dict[str, Any] | str | None, timeout: float = 30.0) -> None:
        """Rewrite the `--authentication-config` file and wait until kube-apiserver has loaded it (its metric
        `apiserver_authentication_config_controller_last_config_info` names the file's hash)."""
        if self._authentication_config is None and config is None:
            return
        text = config if isinstance(config, str) else yaml.safe_dump(config or no_jwt_issuers(), sort_keys=False)
        if self._authentication_file.exists() and self._authentication_file.read_text() == text:
            return
        self._authentication_file.write_text(text)
        self._authentication_config = config if isinstance(config, dict) else yaml.safe_load(text)
        digest = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
        deadline = time.monotonic() + timeout
        delay = 0.05
        while digest not in self._get_text("/metrics"):
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"{self.name}: kube-apiserver did not reload {self._authentication_file}")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    # Lifecycle ------------------------------------------------------------------------------------

    def start(self) -> ControlPlane:
        """Launch etcd and kube-apiserver (kube-controller-manager once the API answers, in wait_ready)."""
        etcd_port, peer_port = free_port(), free_port()
        data = self.workdir / "etcd"
        etcd = [
            str(self.assets / "etcd"),
            f"--name={self.name}",
            f"--data-dir={data}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster={self.name}=http://127.0.0.1:{peer_port}",
            "--unsafe-no-fsync",  # a throwaway store: no durability needed, much less I/O
            # As kubeadm: the API server's watch cache learns the current revision on quiet resources, so a watch
            # from a fresh list's resourceVersion starts instead of waiting for "Too large resource version".
            "--experimental-watch-progress-notify-interval=1s",
        ]
        self._processes.append(_Process("etcd", etcd, self.workdir / "etcd.log"))
        files = self._write_files()
        # A socket path must be short (about 100 bytes): a directory of its own under the system's temp.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="kubemcsa-egress-"))
        self._proxy = _ConnectProxy(self._socket_dir / "proxy.sock")
        egress = {
            "apiVersion": "apiserver.k8s.io/v1beta1",
            "kind": "EgressSelectorConfiguration",
            "egressSelections": [
                {
                    "name": "cluster",
                    "connection": {
                        "proxyProtocol": "HTTPConnect",
                        "transport": {"uds": {"udsName": str(self._proxy.path)}},
                    },
                }
            ],
        }
        (self.workdir / "egress.yaml").write_text(yaml.safe_dump(egress))
        apiserver = [
            str(self.assets / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self._port}",
            f"--tls-cert-file={files['cert']}",
            f"--tls-private-key-file={files['key']}",
            f"--client-ca-file={files['ca']}",
            f"--token-auth-file={files['tokens']}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-issuer={self.issuer}",
            f"--service-account-key-file={files['sa_pub']}",
            f"--service-account-signing-key-file={files['sa_key']}",
            f"--api-audiences={self.issuer}",
            f"--service-account-jwks-uri={self.url}/openid/v1/jwks",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            f"--egress-selector-config-file={self.workdir / 'egress.yaml'}",
            f"--cert-dir={self.workdir / 'cert-dir'}",
        ]
        if self._authentication_config is not None:
            self._authentication_file.write_text(yaml.safe_dump(self._authentication_config, sort_keys=False))
            apiserver.append(f"--authentication-config={self._authentication_file}")
        self._processes.append(_Process("kube-apiserver", apiserver, self.workdir / "kube-apiserver.log"))
        atexit.register(self.stop)
        return self

    def _write_files(self) -> dict[str, Path]:
        files = {
            "ca": self.workdir / "ca.crt",
            "cert": self.workdir / "apiserver.crt",
            "key": self.workdir / "apiserver.key",
            "tokens": self.workdir / "tokens.csv",
            "sa_key": self.workdir / "sa.key",
            "sa_pub": self.workdir / "sa.pub",
            "kubeconfig": self.workdir / "admin.kubeconfig",
        }
        files["ca"].write_bytes(self._certs.ca_pem)
        files["cert"].write_bytes(self._certs.cert_pem + self._certs.ca_pem)
        _write_private(files["key"], self._certs.key_pem)
        _write_private(files["tokens"], f"{self.admin_token},admin,admin,system:masters\n".encode())
        private, public = _rsa_key_pair()
        _write_private(files["sa_key"], private)
        files["sa_pub"].write_bytes(public)
        self.write_kubeconfig(files["kubeconfig"])
        return files

    def wait_ready(self, timeout: float = START_TIMEOUT, after_ready: Callable[[], None] | None = None) -> None:
        """Until /readyz and /openapi/v2 answer, then start kube-controller-manager and wait for the
        `default` ServiceAccount it creates (what pods and tests need)."""
        deadline = time.monotonic() + timeout
        self._wait("/readyz", deadline)
        self._wait("/openapi/v2", deadline)
        if after_ready is not None:
            after_ready()
        manager = self.assets / "kube-controller-manager"
        if os.access(manager, os.X_OK) and not any(p.name == "kube-controller-manager" for p in self._processes):
            kubeconfig = self.workdir / "admin.kubeconfig"
            argv = [
                str(manager),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--service-account-private-key-file={self.workdir / 'sa.key'}",
                f"--root-ca-file={self.workdir / 'ca.crt'}",
                f"--controllers={CONTROLLERS}",
                f"--cert-dir={self.workdir / 'kcm-cert-dir'}",
            ]
            self._processes.append(
                _Process("kube-controller-manager", argv, self.workdir / "kube-controller-manager.log")
            )
            self._wait("/api/v1/namespaces/default/serviceaccounts/default", deadline)

    def _wait(self, path: str, deadline: float) -> None:
        delay = 0.05
        while True:
            for process in self._processes:
                if not process.alive():
                    raise ControlPlaneError(
                        f"{self.name}: {process.name} exited with {process.popen.returncode}:\n{process.tail()}"
                    )
            try:
                self._get_text(path, timeout=5)
                return
            except (OSError, http.client.HTTPException, ValueError):
                pass
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.tail()}" for p in self._processes)
                raise ControlPlaneError(f"{self.name}: {path} did not answer 200 in time\n{logs}")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.ca_pem.decode())

    def _get_text(self, path: str, timeout: float = 10) -> str:
        """The body of a GET that answered 200 (OSError otherwise, as when nothing listens yet)."""
        http_ = _Http(self, timeout)
        try:
            status, body = http_.call("GET", path, accept="*/*")
        finally:
            http_.close()
        if status != 200:
            raise OSError(f"GET {path}: {status}")
        return body if isinstance(body, str) else json.dumps(body)

    def _request(self, method: str, path: str, body: Any) -> dict[str, Any]:
        http_ = _Http(self)
        try:
            status, answer = http_.call(method, path, body)
        finally:
            http_.close()
        if status >= 300:
            raise ControlPlaneError(f"{method} {path} answered {status}: {answer}")
        return answer

    # Sharing one cluster between tests ------------------------------------------------------------

    def snapshot_baseline(self) -> None:
        """Remember what exists now: reset() removes anything created later."""
        http_ = _Http(self)
        try:
            kinds = _discover(http_)
            self._baseline: set[tuple[str, str, str]] = set()
            self._baseline_namespaces: dict[str, dict[str, Any]] = {}
            for plural in CLUSTER_SCOPED:
                for item in _items(http_, kinds[plural].collection()):
                    self._baseline.add((plural, "", item["metadata"]["name"]))
                    if plural == "namespaces":
                        meta = item["metadata"]
                        self._baseline_namespaces[meta["name"]] = {
                            "labels": meta.get("labels") or {},
                            "annotations": meta.get("annotations") or {},
                        }
            for namespace in self._baseline_namespaces:
                for plural in BASELINE_NAMESPACED:
                    if plural in kinds:
                        for item in _items(http_, kinds[plural].collection(namespace)):
                            self._baseline.add((plural, namespace, item["metadata"]["name"]))
            self._startup_authentication = self._authentication_config
        finally:
            http_.close()

    def reset(self) -> None:
        """Back to the baseline: what tests created (namespaces with their content, objects in the first
        namespaces, cluster-scoped RBAC, webhook configurations, CRDs) is deleted, and at once: a namespace is
        emptied here and finalized, not left to kube-controller-manager's 5-second deletion grace period."""
        http_ = _Http(self)
        try:
            kinds = _discover(http_)
            namespaced = [kind for kind in kinds.values() if kind.namespaced and kind.plural != "events"]
            doomed = [
                item["metadata"]["name"]
                for item in _items(http_, kinds["namespaces"].collection())
                if ("namespaces", "", item["metadata"]["name"]) not in self._baseline
            ]
            for namespace in doomed:
                http_.call("DELETE", f"/api/v1/namespaces/{namespace}")  # no new object can be created in it now
            for namespace in doomed:
                for kind in namespaced:
                    _delete_all(http_, kind, namespace, lambda _name: True)
                status, ns = http_.call("GET", f"/api/v1/namespaces/{namespace}")
                if status == 200:
                    ns["spec"]["finalizers"] = []
                    http_.call("PUT", f"/api/v1/namespaces/{namespace}/finalize", ns)
            for namespace, metadata in self._baseline_namespaces.items():
                for plural in BASELINE_NAMESPACED:
                    if plural in kinds:
                        _delete_all(http_, kinds[plural], namespace, lambda n, p=plural, ns=namespace: (
                            (p, ns, n) not in self._baseline))  # fmt: skip
                self._restore_metadata(http_, namespace, metadata)
            for plural in CLUSTER_SCOPED[1:]:
                _delete_all(http_, kinds[plural], "", lambda n, p=plural: (p, "", n) not in self._baseline)
            crd = kinds["customresourcedefinitions"]
            deadline = time.monotonic() + 30
            while any(("customresourcedefinitions", "", item["metadata"]["name"]) not in self._baseline
                      for item in _items(http_, crd.collection())):  # fmt: skip
                if time.monotonic() > deadline:
                    raise ControlPlaneError(f"{self.name}: a CustomResourceDefinition was not deleted in time")
                time.sleep(0.05)
            if self._authentication_config != self._startup_authentication:
                self.configure_authentication(self._startup_authentication)
        finally:
            http_.close()

    def _restore_metadata(self, http_: _Http, namespace: str, metadata: dict[str, Any]) -> None:
        _, current = http_.call("GET", f"/api/v1/namespaces/{namespace}")
        patch: dict[str, Any] = {}
        for key in ("labels", "annotations"):
            now = (current.get("metadata") or {}).get(key) or {}
            if now != metadata[key]:
                patch[key] = {**{k: None for k in now if k not in metadata[key]}, **metadata[key]}
        if patch:
            http_.call("PATCH", f"/api/v1/namespaces/{namespace}", {"metadata": patch})

    def stop(self) -> None:
        """Stop kube-controller-manager, then kube-apiserver, then etcd (TERM, wait, KILL)."""
        if self._stopped:
            return
        self._stopped = True
        for process in reversed(self._processes):
            process.stop()
        if self._proxy is not None:
            self._proxy.stop()
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)


# What a test may leave behind outside its own namespaces, removed by reset(): namespaced kinds in the namespaces
# that exist from the start, and cluster-scoped kinds. Everything else cluster-scoped (APIServices, flow control,
# ServiceCIDRs, IPAddresses) belongs to the control plane itself.
BASELINE_NAMESPACED = (
    "serviceaccounts", "secrets", "configmaps", "pods", "services", "roles", "rolebindings", "leases",
    "deployments", "serviceaccountimports",
)  # fmt: skip
CLUSTER_SCOPED = (
    "namespaces", "clusterroles", "clusterrolebindings", "mutatingwebhookconfigurations",
    "validatingwebhookconfigurations", "customresourcedefinitions",
)  # fmt: skip
_AGGREGATED = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json"


@dataclass(frozen=True)
class _Kind:
    path: str  # /api/v1 or /apis/GROUP/VERSION
    plural: str
    namespaced: bool

    def collection(self, namespace: str = "") -> str:
        return f"{self.path}/namespaces/{namespace}/{self.plural}" if namespace else f"{self.path}/{self.plural}"


class _Http:
    """One kept-alive HTTPS connection with the admin token, for the many small calls of a reset."""

    def __init__(self, plane: ControlPlane, timeout: float = 30) -> None:
        self._plane = plane
        self._conn = http.client.HTTPSConnection("127.0.0.1", plane.port, context=plane._ssl(), timeout=timeout)

    def call(self, method: str, path: str, body: Any = None, accept: str = "application/json") -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self._plane.admin_token}", "Accept": accept}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/merge-patch+json" if method == "PATCH" else "application/json"
        for attempt in range(2):
            try:
                self._conn.request(method, path, body=data, headers=headers)
                response = self._conn.getresponse()
                raw = response.read()
                break
            except (http.client.HTTPException, OSError):
                self._conn.close()
                if attempt:
                    raise
        try:
            return response.status, json.loads(raw) if raw else None
        except ValueError:
            return response.status, raw.decode(errors="replace")

    def close(self) -> None:
        self._conn.close()


def _discover(http_: _Http) -> dict[str, _Kind]:
    """Every listable kind by plural (aggregated discovery: two calls), the preferred version of each group."""
    kinds: dict[str, _Kind] = {}
    for root in ("/api", "/apis"):
        _, doc = http_.call("GET", root, accept=_AGGREGATED)
        for group in doc.get("items") or []:
            versions = group.get("versions") or []
            if not versions:
                continue
            version = versions[0]  # the preferred one comes first
            name = (group.get("metadata") or {}).get("name") or ""
            path = f"/api/{version['version']}" if root == "/api" else f"/apis/{name}/{version['version']}"
            for resource in version.get("resources") or []:
                if "list" in (resource.get("verbs") or []) and "delete" in (resource.get("verbs") or []):
                    kinds.setdefault(
                        resource["resource"], _Kind(path, resource["resource"], resource.get("scope") == "Namespaced")
                    )
    return kinds


def _items(http_: _Http, path: str) -> list[dict[str, Any]]:
    status, doc = http_.call("GET", path)
    if status == 404:
        return []
    if status != 200:
        raise ControlPlaneError(f"GET {path} answered {status}: {doc}")
    return doc.get("items") or []


def _delete_all(http_: _Http, kind: _Kind, namespace: str, doomed: Callable[[str], bool]) -> None:
    """Delete the objects of `kind` whose names `doomed` picks, finalizers removed first (nothing runs them)."""
    for item in _items(http_, kind.collection(namespace)):
        name = item["metadata"]["name"]
        if not doomed(name):
            continue
        path = f"{kind.collection(namespace)}/{name}"
        if item["metadata"].get("finalizers"):
            http_.call("PATCH", path, {"metadata": {"finalizers": None}})
        http_.call("DELETE", path, {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0})


def no_jwt_issuers() -> dict[str, Any]:
    """An AuthenticationConfiguration that trusts no JWT issuer (yet)."""
    return {"apiVersion": "apiserver.config.k8s.io/v1beta1", "kind": "AuthenticationConfiguration", "jwt": []}
