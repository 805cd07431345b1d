"""Benchmark of the import controller against two in-memory clusters (prints figures; not a test).

- time from import creation to its Secret being ready (median and p95 over sequential imports);
- time for N imports (default 1,000) to converge (all Ready), created as fast as the API allows;
- API calls per import on the two clusters together, by verb;
- API calls by the controller during a steady-state window (leader election renewals shown apart).

Each in-memory API server runs in a process of its own, as a real API server is not in the controller's
process; --in-process puts them in the benchmark's process (all of it then shares one GIL).

Usage: python bench/bench_controller.py [--imports 1000] [--workers 4] [--window 5] [--in-process] [--argocd]
(--argocd: every import also keeps an Argo CD cluster Secret, spec.argoCD)
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from kubernetes.client.exceptions import ApiException

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.run import Controller, Options
from kubemcsa import api, kube
from kubemcsa.testing import ApiServer

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
SYSTEM_NS = api.SYSTEM_NAMESPACE
CONTROLLER_SA = "service-account-import-controller"


def _serve(name: str, conn) -> None:
    """Child process: run one ApiServer and answer the parent's method calls over a pipe until told to stop."""
    server = ApiServer(name=name).start()
    conn.send(None)
    while True:
        method, args, kwargs = conn.recv()
        if method == "stop":
            server.stop()
            conn.send(None)
            return
        value = server.requests if method == "requests" else getattr(server, method)(*args, **kwargs)
        conn.send(value)


class ServerProcess:
    """The part of ApiServer's interface this benchmark uses, for a server running in another process."""

    def __init__(self, name: str) -> None:
        self._conn, child = multiprocessing.Pipe()
        self._process = multiprocessing.get_context("spawn").Process(target=_serve, args=(name, child), daemon=True)
        self._process.start()
        self._conn.recv()

    def _call(self, method: str, *args, **kwargs):
        self._conn.send((method, args, kwargs))
        return self._conn.recv()

    @property
    def requests(self):
        return self._call("requests")

    def reset_requests(self) -> None:
        self._call("reset_requests")

    def issue_token(self, *args, **kwargs) -> str:
        return self._call("issue_token", *args, **kwargs)

    def write_kubeconfig(self, *args, **kwargs) -> str:
        return self._call("write_kubeconfig", *args, **kwargs)

    def client_for_token(self, token: str):
        from kubernetes import config

        return config.new_client_from_config_dict(self._call("kubeconfig", token=token))

    def admin_client(self):
        return self.client_for_token(self._call("kubeconfig")["users"][0]["user"]["token"])

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self._call("stop")
        self._process.join(10)


def create(client, obj):
    try:
        return kube.Resource(client, kube.resource_type_of(obj)).create(obj, obj["metadata"].get("namespace"))
    except ApiException as exc:
        if exc.status != 409:
            raise
        return None


def setup(c1, c2, tmp: str):
    admin1, admin2 = c1.admin_client(), c2.admin_client()
    for path in (
        "crd/serviceaccountimports.yaml",
        "namespace.yaml",
        "controller/serviceaccount.yaml",
        "controller/rbac.yaml",
    ):
        for doc in yaml.safe_load_all((MANIFESTS / path).read_text()):
            if doc:
                create(admin1, doc)
    create(
        admin2,
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "pod-lister", "namespace": "default"}},
    )
    create(
        admin2,
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "import-controller", "namespace": "default"},
        },
    )
    create(
        admin2,
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "token-requester", "namespace": "default"},
            "rules": [{"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]}],
        },
    )
    create(
        admin2,
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "token-requester", "namespace": "default"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "token-requester"},
            "subjects": [{"kind": "ServiceAccount", "name": "import-controller", "namespace": "default"}],
        },
    )
    source = f"{tmp}/sources"
    c2.write_kubeconfig(
        source, context="cluster2", token=c2.issue_token("default", "import-controller", expiration_seconds=86400)
    )
    local = c1.client_for_token(c1.issue_token(SYSTEM_NS, CONTROLLER_SA, expiration_seconds=86400))
    return admin1, local, source


def import_body(name: str, argocd: bool = False) -> dict:
    spec = {"clusterName": "cluster2", "namespace": "default", "name": "pod-lister"}
    if argocd:
        spec["argoCD"] = {}
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


def is_ready(obj: dict) -> bool:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready" and cond.get("status") == "True":
            return True
    return False


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--imports", type=int, default=1000)
    parser.add_argument("--single", type=int, default=20)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--window", type=float, default=5.0)
    parser.add_argument("--in-process", action="store_true", help="run the API servers in this process")
    parser.add_argument("--argocd", action="store_true", help="imports with spec.argoCD (an Argo CD Secret each)")
    args = parser.parse_args()

    server = ApiServer if args.in_process else ServerProcess
    where = "in the benchmark's process" if args.in_process else "each in its own process"
    print(f"two in-memory API servers, {where}; the controller with {args.workers} workers")
    with tempfile.TemporaryDirectory() as tmp, server(name="cluster1") as c1, server(name="cluster2") as c2:
        admin1, local, source = setup(c1, c2, tmp)
        controller_user = f"system:serviceaccount:{SYSTEM_NS}:{CONTROLLER_SA}"
        remote_user = "system:serviceaccount:default:import-controller"
        imports = kube.Resource(admin1, kube.SERVICE_ACCOUNT_IMPORTS)

        # Watch imports to see readiness without polling the API.
        ready_at: dict[str, float] = {}
        lock = threading.Lock()
        watcher = kube.Informer(imports, namespace="default")

        def on_event(kind: str, obj: dict, old: dict | None) -> None:
            if kind != "DELETED" and is_ready(obj):
                with lock:
                    ready_at.setdefault(obj["metadata"]["name"], time.perf_counter())

        watcher.add_handler(on_event)
        watcher.start()
        watcher.wait_for_sync(30)

        controller = Controller(
            local, Options(source_kubeconfig=source, workers=args.workers, leader_election=True, retry_period=2.0)
        )
        controller.start()
        controller.wait_until_ready(30)
        while not controller.is_leader:
            time.sleep(0.01)

        # 1. Creation to ready, one import at a time.
        latencies = []
        for i in range(args.single):
            name = f"single-{i}"
            start = time.perf_counter()
            imports.create(import_body(name, args.argocd), "default")
            while name not in ready_at:
                time.sleep(0.001)
            latencies.append(ready_at[name] - start)
        latencies.sort()
        p95 = latencies[max(0, int(len(latencies) * 0.95) - 1)]
        print(
            f"creation -> Ready, one at a time ({args.single} imports): median "
            f"{statistics.median(latencies) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms"
        )

        # 2. N imports at once.
        time.sleep(0.5)
        c1.reset_requests()
        c2.reset_requests()
        names = [f"bulk-{i}" for i in range(args.imports)]
        start = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: imports.create(import_body(n, args.argocd), "default"), names))
        created = time.perf_counter() - start
        deadline = time.monotonic() + 300
        while any(n not in ready_at for n in names) and time.monotonic() < deadline:
            time.sleep(0.01)
        done = sum(1 for n in names if n in ready_at)
        converged = max(ready_at[n] for n in names if n in ready_at) - start
        print(
            f"{args.imports} imports: created in {created:.2f} s, {done} Ready {converged:.2f} s after the first "
            f"creation ({args.workers} workers)"
        )
        time.sleep(1.0)  # let the last status writes' watch events be reconciled before counting

        def calls(server, user: str) -> Counter:
            return Counter(
                f"{r.verb} {r.resource}{'/' + r.subresource if r.subresource else ''}"
                for r in server.requests
                if r.user == user and r.verb not in ("watch", "list") and r.resource != "leases"
            )

        local_calls, remote_calls = calls(c1, controller_user), calls(c2, remote_user)
        total = sum(local_calls.values()) + sum(remote_calls.values())
        print(
            f"API calls per new import (both clusters): {total / args.imports:.2f}  "
            f"local {dict(local_calls)}  remote {dict(remote_calls)}"
        )

        # 3. Steady state.
        c1.reset_requests()
        c2.reset_requests()
        time.sleep(args.window)
        steady = calls(c1, controller_user) + calls(c2, remote_user)
        leases = sum(1 for r in c1.requests if r.user == controller_user and r.resource == "leases")
        print(
            f"steady state, {args.window:.0f} s window, {len(ready_at)} imports: {sum(steady.values())} API calls "
            f"{dict(steady) or ''}(plus {leases} leader-election lease renewals)"
        )

        controller.stop()
        watcher.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
