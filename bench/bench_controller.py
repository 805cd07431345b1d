"""Benchmark of the import controller at fleet scale (prints figures; not a test).

One local cluster and --sources source clusters (default 10), each in-memory API server in a process of its own,
and the controller as `python -m controller` in its own process, as in production. --imports (default 10,000)
imports are spread evenly over the sources and created as fast as the API allows. Printed:
- time from the first creation until every import is Ready (the per-source rate limit bounds it: imports per
  source / --source-qps), timed inside the local server's process as it stores each status, so that the bench
  does not watch 10,000 imports on the cores it measures;
- the controller's peak RSS (VmHWM);
- API calls per new import (both sides, by verb);
- API calls in the steady state (a --window of seconds; leader-election renewals shown apart);
- the same after a controller restart: calls until every import was looked at again, token requests among them,
  and the new process's peak RSS;
- what the export check costs (per source: two SelfSubjectAccessReviews, then one list and one watch of exported
  service accounts; lists and watches are not in the per-import figures above), and how long a withdrawn export
  takes to turn every import of it NotExported with its token gone.

Usage: python bench/bench_controller.py [--imports 10000] [--sources 10] [--source-qps 5] [--source-burst 10]
       [--workers 8] [--window 10] [--argocd] [--py-spy FILE] [--py-spy-local FILE]
       python bench/bench_controller.py --fairness [--imports 10000] [--ready 50] [--flood-window 620]
(--argocd: every import also keeps an Argo CD cluster Secret, spec.argoCD; --py-spy, --py-spy-local: a profile
(GIL holder) of the controller, of the local API server, during the cold start;
--fairness: the second namespace's first-token latency while a first floods, and expired tokens among Ready
imports meanwhile: 600 s tokens are refreshed after 480 s, so the window must outlast that)
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml
from kubernetes.client.exceptions import ApiException

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controller.options import DEFAULT_WORKERS
from kubemcsa.client import kube
from kubemcsa.client.informer import Informer
from kubemcsa.contract import api
from kubemcsa_testing import ApiServer

MANIFESTS = ROOT / "manifests"
SYSTEM_NS = api.SYSTEM_NAMESPACE
CONTROLLER_SA = "service-account-import-controller"
CONTROLLER_USER = f"system:serviceaccount:{SYSTEM_NS}:{CONTROLLER_SA}"
REMOTE_USER = "system:serviceaccount:default:import-controller"


IMPORTS_STORAGE = f"{api.GROUP}/{api.PLURAL}"


class ConditionClock:
    """In the local server's process: when each import first turned Ready, and first NotExported (time.monotonic,
    one clock for every process of this machine). It reads the server's own writes, so the bench need not watch
    10,000 imports over HTTPS: that watch (two events per import, each decoded here) is the bench's cost, not the
    controller's, yet it took the same two cores from the system measured."""

    def __init__(self) -> None:
        self.ready_at: dict[str, float] = {}
        self.not_exported_at: dict[str, float] = {}

    def __call__(self, event) -> None:  # a Store listener: runs under the store's lock, so it only records
        if event.storage_key != IMPORTS_STORAGE or event.type == "DELETED":
            return
        name = event.obj["metadata"]["name"]
        if is_ready(event.obj):
            self.ready_at.setdefault(name, time.monotonic())
        if reason_of(event.obj) == api.REASON_NOT_EXPORTED:
            self.not_exported_at.setdefault(name, time.monotonic())


def _serve(name: str, conn) -> None:
    """Child process: run one ApiServer and answer the parent's method calls over a pipe until told to stop."""
    server = ApiServer(name=name).start()
    clock = ConditionClock()
    server.cluster.store.add_listener(clock)
    conn.send(None)
    while True:
        method, args, kwargs = conn.recv()
        if method == "stop":
            server.stop()
            conn.send(None)
            return
        if method == "calls":  # counted in the child: the request log of 10,000 imports is large to ship
            conn.send(_calls(server.requests, *args))
            continue
        if method == "export_calls":
            conn.send(_export_calls(server.requests, *args))
            continue
        if method == "token_times":  # when each token request was served (time.monotonic)
            conn.send([r.at for r in server.requests if r.subresource == "token" and r.user == args[0]])
            continue
        if method == "ready_count":
            conn.send(len(clock.ready_at))
            continue
        if method == "condition_times":  # shipped once, at the end of a phase
            conn.send((dict(clock.ready_at), dict(clock.not_exported_at)))
            continue
        if method == "not_exported":
            wanted = set(*args)
            conn.send(sum(1 for n in clock.not_exported_at if n in wanted))
            continue
        value = getattr(server, method)(*args, **kwargs)
        conn.send(value)


def _export_calls(requests, user: str) -> Counter:
    """The export check's calls: access reviews, and lists and watches of service accounts."""
    return Counter(
        f"{r.verb} {r.resource}"
        for r in requests
        if r.user == user
        and (r.resource == "selfsubjectaccessreviews" or (r.resource == "serviceaccounts" and not r.subresource))
    )


def _calls(requests, user: str) -> tuple[Counter, int]:
    """Calls by `user` that are not watches or lists, by verb and resource; and lease calls apart."""
    counts = Counter(
        f"{r.verb} {r.resource}{'/' + r.subresource if r.subresource else ''}"
        for r in requests
        if r.user == user and r.verb not in ("watch", "list") and r.resource != "leases"
    )
    return counts, sum(1 for r in requests if r.user == user and r.resource == "leases")


class ServerProcess:
    def __init__(self, name: str) -> None:
        self.name = name
        self._conn, child = multiprocessing.Pipe()
        self._process = multiprocessing.get_context("spawn").Process(target=_serve, args=(name, child), daemon=True)
        self._process.start()
        self._conn.recv()

    @property
    def pid(self) -> int:
        return self._process.pid

    def call(self, method: str, *args, **kwargs):
        self._conn.send((method, args, kwargs))
        return self._conn.recv()

    def client(self, token: str | None = None):
        from kubernetes import config

        return config.new_client_from_config_dict(self.call("kubeconfig", token=token))

    def stop(self) -> None:
        self.call("stop")
        self._process.join(10)


def create(client, obj) -> None:
    try:
        kube.Resource(client, kube.resource_type_of(obj)).create(obj, obj["metadata"].get("namespace"))
    except ApiException as exc:
        if exc.status != 409:
            raise


def setup_local(c1: ServerProcess, tmp: str) -> str:
    admin = c1.client()
    for path in ("crd/serviceaccountimports.yaml", "namespace.yaml", "controller/serviceaccount.yaml"):
        for doc in yaml.safe_load_all((MANIFESTS / path).read_text()):
            if doc:
                create(admin, doc)
    for doc in yaml.safe_load_all((MANIFESTS / "controller" / "rbac.yaml").read_text()):
        if doc:
            create(admin, doc)
    path = f"{tmp}/local"
    c1.call("write_kubeconfig", path, token=c1.call("issue_token", SYSTEM_NS, CONTROLLER_SA, expiration_seconds=86400))
    return path


def setup_source(source: ServerProcess) -> dict:
    """The source's objects, and its kubeconfig entry for the controller (context = cluster name)."""
    admin = source.client()
    # pod-lister's owner exports it to every namespace of cluster1 (kubemcsa allow ... --to 'cluster1/*').
    exported = {"labels": {api.EXPORTED_LABEL: "true"}, "annotations": {api.EXPORT_TO_ANNOTATION: "cluster1/*"}}
    sa = {"apiVersion": "v1", "kind": "ServiceAccount"}
    create(admin, {**sa, "metadata": {"name": "pod-lister", "namespace": "default", **exported}})
    create(admin, {**sa, "metadata": {"name": "import-controller", "namespace": "default"}})
    # As bootstrap grants: list and watch service accounts everywhere, to see the exports.
    rbac = "rbac.authorization.k8s.io"
    watch_rules = [{"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["list", "watch"]}]
    create(
        admin,
        {"apiVersion": f"{rbac}/v1", "kind": "ClusterRole", "metadata": {"name": "exports"}, "rules": watch_rules},
    )
    create(
        admin,
        {
            "apiVersion": f"{rbac}/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "exports"},
            "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": "exports"},
            "subjects": [{"kind": "ServiceAccount", "name": "import-controller", "namespace": "default"}],
        },
    )
    rules = [{"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]}]
    create(
        admin,
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "token-requester", "namespace": "default"},
            "rules": rules,
        },
    )
    create(
        admin,
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "token-requester", "namespace": "default"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "token-requester"},
            "subjects": [{"kind": "ServiceAccount", "name": "import-controller", "namespace": "default"}],
        },
    )
    token = source.call("issue_token", "default", "import-controller", expiration_seconds=86400 * 30)
    return source.call("kubeconfig", context=source.name, token=token)


def merged_kubeconfig(configs: list[dict]) -> dict:
    merged: dict = {"apiVersion": "v1", "kind": "Config", "clusters": [], "users": [], "contexts": []}
    for config in configs:
        for key in ("clusters", "users", "contexts"):
            merged[key].extend(config[key])
    return merged


def import_body(name: str, cluster: str, argocd: bool = False) -> dict:
    spec: dict = {"clusterName": cluster, "namespace": "default", "name": "pod-lister"}
    if argocd:
        spec["argoCD"] = {}
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


def reason_of(obj: dict) -> str | None:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return condition.get("reason")
    return None


def is_ready(obj: dict) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (obj.get("status") or {}).get("conditions") or []
    )


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def user_system_seconds(pid: int) -> tuple[float, float]:
    """The process's own user and system CPU time, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def user_system_of(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of processes, summed."""
    times = [user_system_seconds(pid) for pid in pids]
    return sum(u for u, _ in times), sum(k for _, k in times)


def reconciled(port: int) -> float:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("kubemcsa_controller_reconciles_total{")
    )


def wait_until_quiet(port: int, quiet_seconds: float = 2.0, timeout: float = 120.0) -> float:
    """Wait until the controller's reconcile count holds still for `quiet_seconds` (its last writes' echoes seen);
    the count then."""
    deadline = time.monotonic() + timeout
    count, since = reconciled(port), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now_count = reconciled(port)
        if now_count != count:
            count, since = now_count, time.monotonic()
        elif time.monotonic() - since >= quiet_seconds:
            break
    return count


def start_controller(args, local: str, sources: str, port: int) -> subprocess.Popen:
    argv = [sys.executable, "-m", "controller", "--kubeconfig", local, "--source-kubeconfig", sources]
    argv += ["--metrics-port", str(port), "--workers", str(args.workers), "--imports-dir", "/nonexistent"]
    argv += ["--cluster-name", "cluster1"]
    argv += ["--source-qps", str(args.source_qps), "--source-burst", str(args.source_burst), "--log-level", "WARNING"]
    if args.controller_from:  # another checkout's controller (its own venv), against the same servers and bench
        root = Path(args.controller_from).resolve()
        argv[0] = str(root / ".venv" / "bin" / "python")
        return subprocess.Popen(argv, cwd=root)
    return subprocess.Popen(argv, cwd=ROOT)


def wait_until(condition, timeout: float, poll: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll)
    return False


def count_calls(c1: ServerProcess, sources: list[ServerProcess]) -> tuple[Counter, Counter, int]:
    local, leases = c1.call("calls", CONTROLLER_USER)
    remote: Counter = Counter()
    for source in sources:
        remote += source.call("calls", REMOTE_USER)[0]
    return local, remote, leases


def deciles(times: list[float]) -> str:
    """When each tenth of sorted `times` was reached: "10% 2.9, 20% 5.2, ..."."""
    return ", ".join(f"{tenth * 10}% {times[len(times) * tenth // 10 - 1]:.1f}" for tenth in range(1, 11))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--imports", type=int, default=10_000)
    parser.add_argument("--sources", type=int, default=10)
    parser.add_argument("--source-qps", type=float, default=5.0)
    parser.add_argument("--source-burst", type=int, default=10)
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="the controller's (its default)")
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--argocd", action="store_true", help="imports with spec.argoCD (an Argo CD Secret each)")
    parser.add_argument("--py-spy", metavar="FILE", help="profile the controller (GIL holder) during the cold start")
    parser.add_argument("--py-spy-local", metavar="FILE", help="profile the local API server during the cold start")
    parser.add_argument(
        "--controller-from",
        metavar="DIR",
        help="run the controller of another checkout (DIR/.venv/bin/python -m controller, in DIR): a before/after "
        "with the same servers and the same measurements",
    )
    parser.add_argument("--fairness", action="store_true", help="the fair-share bench instead (see fairness)")
    parser.add_argument("--ready", type=int, default=50, help="--fairness: Ready imports refreshed during the flood")
    parser.add_argument("--flood-window", type=float, default=620.0, help="--fairness: seconds to watch the flood")
    args = parser.parse_args()
    if args.fairness:
        return fairness(args)
    per_source = args.imports // args.sources
    total = per_source * args.sources
    print(
        f"{total} imports over {args.sources} source clusters; {args.sources + 1} API servers and the controller "
        f"each in its own process; --source-qps {args.source_qps:g} --source-burst {args.source_burst} "
        f"--workers {args.workers}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        c1 = ServerProcess("cluster1")
        sources = [ServerProcess(f"source{i}") for i in range(args.sources)]
        controller = None
        try:
            local = setup_local(c1, tmp)
            source_path = f"{tmp}/sources"
            Path(source_path).write_text(yaml.safe_dump(merged_kubeconfig([setup_source(s) for s in sources])))
            admin1 = c1.client()
            imports = kube.Resource(admin1, kube.SERVICE_ACCOUNT_IMPORTS)

            port = free_port()  # not a fixed one: other benchmarks may run on the same machine
            controller = start_controller(args, local, source_path, port)
            assert wait_until(lambda: _ready(port), 60), "the controller did not become ready"

            # 1. Cold start: every import created at once, as fast as the API takes them.
            names = [(f"imp-{s}-{i}", sources[s].name) for i in range(per_source) for s in range(args.sources)]
            profilers = [
                subprocess.Popen(
                    [
                        "py-spy",
                        "record",
                        "--gil",
                        "--nonblocking",
                        "-r",
                        "200",
                        "--format",
                        "raw",
                        "-o",
                        out,
                        "-p",
                        str(pid),
                    ],
                    stdout=subprocess.DEVNULL,
                )
                for out, pid in ((args.py_spy, controller.pid), (args.py_spy_local, c1.pid))
                if out
            ]
            processes = {
                "controller": [controller.pid],
                "local API server": [c1.pid],
                "source API servers": [s.pid for s in sources],
                "this bench (creates and watches)": [os.getpid()],
            }
            cpu_at_start = {role: user_system_of(pids) for role, pids in processes.items()}
            user_before, system_before = user_system_seconds(controller.pid)
            reconciles_before = reconciled(port)
            start = time.monotonic()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda item: imports.create(import_body(*item, args.argocd), "default"), names))
            created = time.monotonic() - start
            wait_until(lambda: c1.call("ready_count") >= total, timeout=3600, poll=0.5)
            ready_at, _ = c1.call("condition_times")
            all_ready = max(ready_at.values()) - start
            cpu_cold = {
                role: tuple(now - then for now, then in zip(user_system_of(pids), cpu_at_start[role], strict=True))
                for role, pids in processes.items()
            }
            for profiler in profilers:
                profiler.send_signal(signal.SIGINT)
                profiler.wait(30)
            reconciles = wait_until_quiet(port) - reconciles_before
            user_after, system_after = user_system_seconds(controller.pid)
            user_per_import = (user_after - user_before) / total
            system_per_import = (system_after - system_before) / total
            cpu_per_import = user_per_import + system_per_import
            local_calls, remote_calls, _ = count_calls(c1, sources)
            per_import = (sum(local_calls.values()) + sum(remote_calls.values())) / total
            print(f"created {total} imports in {created:.1f} s; all Ready {all_ready:.1f} s after the first creation")
            times = sorted(t - start for t in ready_at.values())
            print("  Ready by then (s after the first creation): " + deciles(times))
            bound = max(0.0, per_source - args.source_burst) / args.source_qps
            tokens = sorted(t - start for source in sources for t in source.call("token_times", REMOTE_USER))
            print(
                "  tokens served by then: "
                + deciles(tokens)
                + f" (the rate limit alone needs {bound:.0f} s: {per_source} per source, {args.source_burst} at once"
                f" then {args.source_qps:g} a second)"
            )
            print(
                f"controller CPU per new import: {cpu_per_import * 1000:.2f} ms (the controller process's own: "
                f"user {user_per_import * 1000:.2f}, system {system_per_import * 1000:.2f})"
            )
            print(
                f"  CPU seconds until all Ready ({os.cpu_count()} cores: {os.cpu_count() * all_ready:.0f} available): "
                + ", ".join(f"{role} {u + k:.1f} ({k:.1f} system)" for role, (u, k) in cpu_cold.items())
            )
            print(f"  reconciles per new import: {reconciles / total:.2f}")
            print(f"controller peak RSS: {peak_rss_mb(controller.pid):.0f} MB")
            print(f"API calls per new import: {per_import:.2f}  local {dict(local_calls)}  remote {dict(remote_calls)}")

            # 2. Steady state.
            for server in (c1, *sources):
                server.call("reset_requests")
            time.sleep(args.window)
            local_calls, remote_calls, leases = count_calls(c1, sources)
            steady = sum(local_calls.values()) + sum(remote_calls.values())
            print(
                f"steady state, {args.window:g} s: {steady} API calls {dict(local_calls + remote_calls) or ''}"
                f"(plus {leases} leader-election lease calls)"
            )

            # 3. Restart: SIGTERM, a new process, every import looked at again.
            controller.send_signal(signal.SIGTERM)
            controller.wait(30)
            for server in (c1, *sources):
                server.call("reset_requests")
            started = time.perf_counter()
            controller = start_controller(args, local, source_path, port)
            wait_until(lambda: reconciled(port) >= total, timeout=600)
            looked = time.perf_counter() - started
            time.sleep(2)
            local_calls, remote_calls, leases = count_calls(c1, sources)
            tokens = remote_calls.get("create serviceaccounts/token", 0)
            print(
                f"after a restart: every import looked at again in {looked:.1f} s; "
                f"{sum(local_calls.values()) + sum(remote_calls.values())} API calls, {tokens} token requests "
                f"{dict(local_calls + remote_calls) or ''}(plus {leases} lease calls); "
                f"peak RSS {peak_rss_mb(controller.pid):.0f} MB"
            )
            # 4. The export check: its calls so far, then one export withdrawn.
            exports = Counter()
            for server in sources:
                exports += server.call("export_calls", REMOTE_USER)
            print(f"export check, since the restart, all {args.sources} sources: {dict(exports)}")
            withdrawn = [name for name, cluster in names if cluster == sources[0].name]
            started = time.monotonic()
            kube.Resource(sources[0].client(), kube.SERVICE_ACCOUNTS).patch(
                "pod-lister", {"metadata": {"labels": {api.EXPORTED_LABEL: None}}}, "default"
            )
            wait_until(lambda: c1.call("not_exported", withdrawn) >= len(withdrawn), timeout=600, poll=0.05)
            secrets = kube.Resource(admin1, kube.SECRETS)

            def tokens_left() -> int:
                listed = secrets.list("default").get("items") or []
                mine = {api.secret_name_for_import(n) for n in withdrawn}
                return sum(
                    1 for s in listed if s["metadata"]["name"] in mine and api.KEY_TOKEN in (s.get("data") or {})
                )

            wait_until(lambda: tokens_left() == 0, timeout=600, poll=0.05)
            gone = time.monotonic() - started
            _, not_exported_at = c1.call("condition_times")
            last = max(not_exported_at[n] for n in withdrawn) - started
            print(
                f"export withdrawn on {sources[0].name}: its {len(withdrawn)} imports NotExported in {last:.2f} s, "
                f"every token gone from their Secrets in {gone:.2f} s"
            )
        finally:
            if controller is not None and controller.poll() is None:
                controller.send_signal(signal.SIGTERM)
                controller.wait(30)
            for server in (c1, *sources):
                server.stop()
    return 0


def fairness(args) -> int:
    """--fairness: one namespace floods a source with --imports imports while a second namespace creates one; and
    imports of a third namespace, Ready before the flood with the shortest tokens (600 s), must be refreshed all
    along. Prints the second namespace's first-token latency and how many Ready tokens expired during the flood."""
    print(
        f"fairness: {args.ready} Ready imports (600 s tokens) in namespace team, then {args.imports} imports in "
        f"namespace flood, then 1 in namespace quiet; one source; --source-qps {args.source_qps:g} "
        f"--source-burst {args.source_burst}; watched for {args.flood_window:g} s"
    )
    with tempfile.TemporaryDirectory() as tmp:
        c1 = ServerProcess("cluster1")
        source = ServerProcess("source0")
        controller = None
        try:
            local = setup_local(c1, tmp)
            source_path = f"{tmp}/sources"
            Path(source_path).write_text(yaml.safe_dump(merged_kubeconfig([setup_source(source)])))
            admin1 = c1.client()
            for namespace in ("team", "flood", "quiet"):
                create(admin1, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
            imports = kube.Resource(admin1, kube.SERVICE_ACCOUNT_IMPORTS)
            ready_at: dict[tuple[str, str], float] = {}
            expiry: dict[str, float] = {}  # team import -> its Secret's token expiry
            lock = threading.Lock()
            watcher = Informer(imports)
            secrets = Informer(kube.Resource(admin1, kube.SECRETS), namespace="team")

            def on_import(kind: str, obj: dict, old: dict | None) -> None:
                if kind != "DELETED" and is_ready(obj):
                    with lock:
                        ready_at.setdefault(kube.object_key(obj), time.perf_counter())

            def on_secret(kind: str, obj: dict, old: dict | None) -> None:
                annotations = (obj.get("metadata") or {}).get("annotations") or {}
                value = annotations.get("multicluster.admiralty.io/token-expiration")
                if kind != "DELETED" and value:
                    from kubemcsa.contract.timefmt import parse_time

                    with lock:
                        expiry[obj["metadata"]["name"]] = parse_time(value) or 0.0

            watcher.add_handler(on_import)
            secrets.add_handler(on_secret)
            watcher.start()
            secrets.start()
            watcher.wait_for_sync(30)
            secrets.wait_for_sync(30)
            port = free_port()
            controller = start_controller(args, local, source_path, port)
            assert wait_until(lambda: _ready(port), 60), "the controller did not become ready"

            def body(name: str, namespace: str, **spec) -> dict:
                obj = import_body(name, "source0")
                obj["metadata"]["namespace"] = namespace
                obj["spec"].update(spec)
                return obj

            for i in range(args.ready):
                imports.create(body(f"team-{i}", "team", expirationSeconds=600), "team")
            wait_until(lambda: sum(1 for k in ready_at if k[0] == "team") >= args.ready, timeout=600)
            print(f"{args.ready} team imports Ready")
            flood_start = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda i: imports.create(body(f"flood-{i}", "flood"), "flood"), range(args.imports)))
            print(f"{args.imports} flood imports created in {time.perf_counter() - flood_start:.1f} s")
            quiet_start = time.perf_counter()
            imports.create(body("quiet-0", "quiet"), "quiet")
            wait_until(lambda: ("quiet", "quiet-0") in ready_at, timeout=600, poll=0.02)
            latency = ready_at.get(("quiet", "quiet-0"), float("inf")) - quiet_start
            flooded = sum(1 for k in ready_at if k[0] == "flood")
            print(
                f"second namespace's first import Ready {latency:.2f} s after its creation "
                f"(with {args.imports - flooded} flood imports still waiting for a token)"
            )
            expired: set[str] = set()
            deadline = flood_start + args.flood_window
            while time.perf_counter() < deadline:
                now = time.time()
                with lock:
                    expired |= {name for name, at in expiry.items() if at <= now}
                time.sleep(1)
            flooded = sum(1 for k in ready_at if k[0] == "flood")
            print(
                f"during {args.flood_window:g} s of flood: {len(expired)} expired tokens among the {args.ready} "
                f"Ready team imports; {flooded} of {args.imports} flood imports Ready"
            )
            watcher.stop()
            secrets.stop()
        finally:
            if controller is not None and controller.poll() is None:
                controller.send_signal(signal.SIGTERM)
                controller.wait(30)
            for server in (c1, source):
                server.stop()
    return 0


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
