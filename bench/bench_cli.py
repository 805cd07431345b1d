"""Benchmark the kubemcsa command line and client helpers; prints figures, asserts nothing.

    python bench/bench_cli.py [--repeat 20]

1. bootstrap against two in-memory clusters: from nothing, then the no-op re-run; time and API calls per cluster.
2. export: time and API calls.
3. The rotation hook of a client built from a mounted import: cost per request with and without the hook, and
   requests per second through one long-lived ApiClient.
4. kubemcsa demo, end to end.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kubernetes.client import Configuration

from kubemcsa import cli, config, demo
from kubemcsa.client import kube
from kubemcsa.contract.credentials import Credentials, build_kubeconfig
from kubemcsa_testing import ApiServer

CRD = ROOT / "manifests" / "crd" / "serviceaccountimports.yaml"


def calls(server: ApiServer) -> int:
    return len(server.requests)


def bench_bootstrap(tmp: Path) -> None:
    with ApiServer(name="cluster1") as c1, ApiServer(name="cluster2") as c2:
        kube.Resource(c1.admin_client(), kube.CRDS).create(yaml.safe_load(CRD.read_text()))
        argv = ["bootstrap", "--target-context", "cluster1", "--source-context", "cluster2"]
        for server in (c1, c2):
            path = tmp / f"{server.name}.yaml"
            server.write_kubeconfig(str(path), context=server.name)
            argv += [f"--{'target' if server is c1 else 'source'}-kubeconfig", str(path)]
        for label in ("from nothing", "no-op re-run"):
            c1.reset_requests()
            c2.reset_requests()
            started = time.perf_counter()
            with redirect_stdout(io.StringIO()):
                assert cli.main(argv) == 0
            elapsed = time.perf_counter() - started
            print(
                f"bootstrap {label:13} {elapsed * 1000:7.1f} ms   API calls: source {calls(c2):2}, target {calls(c1):2}"
            )


def bench_export(tmp: Path, repeat: int) -> None:
    with ApiServer(name="cluster2") as c2:
        kube.Resource(c2.admin_client(), kube.SERVICE_ACCOUNTS).create({"metadata": {"name": "bot"}}, "default")
        path = tmp / "export.yaml"
        c2.write_kubeconfig(str(path), context="cluster2")
        samples = []
        c2.reset_requests()
        for _ in range(repeat):
            started = time.perf_counter()
            with redirect_stdout(io.StringIO()):
                assert cli.main(["export", "bot", "--kubeconfig", str(path)]) == 0
            samples.append(time.perf_counter() - started)
        print(
            f"export               {statistics.median(samples) * 1000:7.1f} ms median   "
            f"API calls per export: {calls(c2) / repeat:.0f}"
        )


def bench_rotation_hook(tmp: Path, repeat: int) -> None:
    with ApiServer(name="cluster2") as c2:
        admin = c2.admin_client()
        kube.Resource(admin, kube.SERVICE_ACCOUNTS).create({"metadata": {"name": "bot"}}, "default")
        rules = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
        kube.Resource(admin, kube.ROLES).create({"metadata": {"name": "bot"}, "rules": rules}, "default")
        binding = {
            "metadata": {"name": "bot"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "bot"},
            "subjects": [{"kind": "ServiceAccount", "name": "bot", "namespace": "default"}],
        }
        kube.Resource(admin, kube.ROLE_BINDINGS).create(binding, "default")
        token = c2.issue_token("default", "bot")
        directory = tmp / "imports" / "cluster2-bot"
        directory.mkdir(parents=True)
        creds = Credentials(server=c2.url, ca_crt=c2.ca_pem, token=token, namespace="default")
        files = {"ca.crt": c2.ca_pem, "namespace": b"default", "token": token.encode(), "server": c2.url.encode()}
        files["config"] = build_kubeconfig(creds, "cluster2").encode()
        for name, content in files.items():
            (directory / name).write_bytes(content)
        cfg = config.import_config_and_namespace("cluster2-bot", tmp / "imports")
        plain = Configuration(host=c2.url)
        plain.api_key["BearerToken"] = token
        n = repeat * 1000
        for label, configuration in (("with the rotation hook", cfg.config), ("without (static token)", plain)):
            started = time.perf_counter()
            for _ in range(n):
                configuration.auth_settings()
            print(f"auth_settings() {label:24} {(time.perf_counter() - started) / n * 1e6:6.2f} us per request")
        with cfg.api_client() as client:
            pods = kube.Resource(client, kube.PODS)
            started = time.perf_counter()
            count = repeat * 10
            for _ in range(count):
                pods.list("default")
            elapsed = time.perf_counter() - started
        print(f"LIST through one long-lived client from a mounted import: {count / elapsed:6.0f} requests/s")


def bench_demo() -> None:
    started = time.perf_counter()
    assert demo.main(out=lambda line: None) == 0
    print(f"kubemcsa demo, end to end: {time.perf_counter() - started:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        bench_bootstrap(tmp)
        bench_export(tmp, args.repeat)
        bench_rotation_hook(tmp, args.repeat)
    bench_demo()


if __name__ == "__main__":
    main()
