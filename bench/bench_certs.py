"""Benchmark the webhook's certificate handling; prints figures, asserts nothing.

    python bench/bench_certs.py [--seconds 3]

1. The cost of issuing: a CA, a serving certificate, a no-op renewal decision.
2. ensure_webhook_certificates against the in-memory API server: from nothing, and a no-op run (what every
   replica does every renewal interval).
3. Hot reload under load: an HTTPS server (uvicorn) swaps between two certificates as fast as it can while client
   threads open new verified connections continuously; counts failed handshakes and reload latency, with the swap
   on the server's event loop (how the webhook does it) and, for comparison, from another thread.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from certs_tls_server import RequestLoop, TLSServer, client_context

from kubemcsa.certificates import manager
from kubemcsa.certificates import plan as planning
from kubemcsa.client import kube, tls
from kubemcsa_testing import ApiServer

NAMES = tls.service_dns_names("webhook", "mcsa")


def timed(fn, repeat: int) -> tuple[float, float]:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples), max(samples)


def bench_issuing() -> None:
    ca = tls.make_ca("bench")
    material = planning.plan(None, NAMES).material
    print("issuing (ms, median / max of 50)")
    print("  make_ca            {:6.2f} / {:6.2f}".format(*timed(lambda: tls.make_ca("bench"), 50)))
    print("  make_serving_cert  {:6.2f} / {:6.2f}".format(*timed(lambda: tls.make_serving_cert(*ca, NAMES), 50)))
    print("  plan (no change)   {:6.2f} / {:6.2f}".format(*timed(lambda: planning.plan(material, NAMES), 50)))


def bench_ensure() -> None:
    with ApiServer(name="bench") as server:
        client = server.admin_client()
        kube.Resource(client, kube.NAMESPACES).create(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "mcsa"}}
        )
        kube.Resource(client, kube.MUTATING_WEBHOOK_CONFIGURATIONS).create(
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "MutatingWebhookConfiguration",
                "metadata": {"name": "webhook"},
                "webhooks": [
                    {
                        "name": "w.example.com",
                        "admissionReviewVersions": ["v1"],
                        "sideEffects": "None",
                        "clientConfig": {"service": {"name": "webhook", "namespace": "mcsa"}},
                    }
                ],
            }
        )
        args = {
            "namespace": "mcsa",
            "secret_name": "cert",
            "service_name": "webhook",
            "webhook_configuration_name": "webhook",
        }
        start = time.perf_counter()
        manager.ensure_webhook_certificates(client, **args)
        first = (time.perf_counter() - start) * 1000
        print("ensure_webhook_certificates against the in-memory API server (ms)")
        print(f"  from nothing       {first:6.2f}")
        median, worst = timed(lambda: manager.ensure_webhook_certificates(client, **args), 30)
        print(f"  no-op (median/max) {median:6.2f} / {worst:6.2f}")


def bench_reload(seconds: float, on_loop: bool) -> None:
    now = datetime.datetime.now(datetime.UTC)
    first = planning.plan(None, NAMES, now).material
    renewed = tls.make_serving_cert(first.ca_bundle_pem, first.ca_key_pem, NAMES, now=now)
    pairs = [
        manager.CertificateBundle(first.ca_bundle_pem, cert_pem, key_pem, tls.not_after(cert_pem))
        for cert_pem, key_pem in ((first.cert_pem, first.key_pem), renewed)
    ]
    with tempfile.TemporaryDirectory() as directory:
        cert_file, key_file = manager.write_files(pairs[0], directory)
        server = TLSServer(cert_file, key_file).start()
        if not on_loop:
            server.reloader.loop = None
        reload_ms = []
        try:
            with RequestLoop(client_context(first.ca_bundle_pem), server.port, NAMES[0], threads=2) as requests:
                deadline = time.monotonic() + seconds
                index = 0
                while time.monotonic() < deadline:
                    index += 1
                    manager.write_files(pairs[index % 2], directory)
                    start = time.perf_counter()
                    if not server.reloader.check():
                        raise AssertionError(f"the reloader did not load a new pair at swap {index}")
                    reload_ms.append((time.perf_counter() - start) * 1000)
                    time.sleep(0.005)
            ok, failed = len(requests.certificates), len(requests.failures)
            sample = f" (e.g. {requests.failures[0][:60]})" if requests.failures else ""
        finally:
            server.stop()
    where = "on the event loop" if on_loop else "from another thread"
    print(
        f"  swap {where:20s}: {len(reload_ms):4d} reloads, {ok:5d} requests ok, {failed:3d} failed; "
        f"reload p50 {statistics.median(reload_ms):.2f} ms, max {max(reload_ms):.2f} ms{sample}"
    )


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    bench_issuing()
    bench_ensure()
    print(f"hot reload under load ({args.seconds:.0f} s each, new connection per request, 2 client threads)")
    bench_reload(args.seconds, on_loop=True)
    bench_reload(args.seconds, on_loop=False)


if __name__ == "__main__":
    main()
