"""Benchmark of federated imports (prints figures; not a test).

Two in-memory clusters in this process, cluster2 trusting cluster1's tokens (the configuration `kubemcsa federate`
prints), and the controller against cluster1. --imports federated imports (default 1,000) of cluster2 are created
as fast as the API allows. Printed:
- time from the first creation until every import is Ready (reason Federated);
- API calls per new import on cluster1 (by verb and resource), and on cluster2 (the trust checks);
- API calls in the steady state (a --window of seconds).

Usage: python bench/bench_federation.py [--imports 1000] [--workers 4] [--window 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controller.options import Options
from controller.run import Controller
from kubemcsa.cli import federate
from kubemcsa.client import apply, kube
from kubemcsa.contract import api, federation
from kubemcsa_testing import (
    ApiServer,
    crd_manifest,
)

SYSTEM = api.SYSTEM_NAMESPACE


def ready_count(imports: kube.Resource) -> int:
    count = 0
    for item in imports.list("default").get("items") or []:
        for cond in (item.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "Ready" and (cond.get("status"), cond.get("reason")) == ("True", "Federated"):
                count += 1
    return count


def by_call(requests: list, user: str | None = None) -> Counter:
    return Counter(
        f"{r.verb} {r.resource}{'/' + r.subresource if r.subresource else ''}"
        for r in requests
        if user is None or r.user == user
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imports", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--window", type=float, default=5.0)
    args = parser.parse_args()

    with ApiServer(name="cluster1") as c1, ApiServer(name="cluster2") as c2:
        admin1 = c1.admin_client()
        kube.Resource(admin1, kube.CRDS).create(crd_manifest())
        kube.Resource(admin1, kube.NAMESPACES).create({"metadata": {"name": SYSTEM}})
        # The identity whose tokens check trust (federate.apply creates it too, as the manifests do).
        kube.Resource(admin1, kube.SERVICE_ACCOUNTS).create(federation.trust_check_service_account(), SYSTEM)
        wanted = federation.FederatedSource("cluster2", c2.url, c2.ca_pem, "cluster2", "cluster1:")
        target = apply.Cluster("target", "cluster1", admin1, c1.url, c1.ca_pem)
        issuer, _ = federate.apply(wanted, target, report=lambda _: None)
        c2.configure_authentication(federation.authentication_configuration(issuer.url, c1.url, c1.ca_pem, wanted))

        controller = Controller(
            c1.admin_client(),
            Options(leader_election=False, workers=args.workers),
        )
        controller.start()
        assert controller.wait_until_ready(30)
        imports = kube.Resource(admin1, kube.SERVICE_ACCOUNT_IMPORTS)
        c1.reset_requests()
        c2.reset_requests()

        def create(i: int) -> None:
            spec = {"clusterName": "cluster2", "namespace": "default", "tokenType": "Federated"}
            body = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": f"fed-{i}"}, "spec": spec}
            imports.create(body, "default")

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, range(args.imports)))
        while ready_count(imports) < args.imports:
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        controller_calls = by_call(c1.requests, "admin")
        # The bench's own creations and polls are by admin too: count the controller's writes and token requests.
        writes = {k: v for k, v in controller_calls.items() if not k.startswith(("list", "get", "watch"))}
        writes.pop("create serviceaccountimports", None)
        source_calls = by_call(c2.requests)
        print(f"{args.imports} federated imports Ready in {elapsed:.1f}s ({args.imports / elapsed:.0f}/s)")
        print("cluster1, writes and token requests per new import:")
        for call, count in sorted(writes.items()):
            print(f"  {call}: {count / args.imports:.3f}")
        print(f"cluster2 (the source), calls in all: {dict(source_calls)}")

        c1.reset_requests()
        c2.reset_requests()
        time.sleep(args.window)  # the steady state: a window of seconds with nothing changing
        steady = by_call(c1.requests, "admin") + by_call(c2.requests)
        steady_calls = {k: v for k, v in steady.items() if k != "watch serviceaccountimports"}
        print(f"steady state over {args.window:g}s: {sum(steady_calls.values())} calls {dict(steady_calls)}")
        controller.stop()


if __name__ == "__main__":
    main()
