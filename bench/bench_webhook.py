"""Benchmark the admission webhook over TLS against a bare uvicorn app, in the same run.

    python bench/bench_webhook.py [--seconds 4] [--rounds 4] [--connections 1 8]

Both servers run at once, each in its own process: the webhook as deployed (WebhookServer, its cache holding
the imports), and a bare app (a plain ASGI callable that parses the JSON and answers allowed: true). The load
generator is a third process with one keep-alive HTTPS connection per thread, posting a realistic AdmissionReview
(the kubectl fixture, annotated with three imports); the servers are measured in alternating short rounds, so
that changes in the machine's load hit both alike. Prints requests per second and p50/p99 latency as a table.
Target (issue 4): at 8 connections, >= 70 % of the bare app's requests per second and p99 < 5 ms on 2 cores.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FIXTURE = ROOT / "tests" / "fixtures" / "admissionreview-v1-pod.json"
NAMESPACE = "capture-demo"
IMPORTS = ["cluster2-default-pod-lister", "cluster3-default-pod-lister", "cluster4-default-pod-lister"]
PATH = "/mutate-pods?timeout=5s"


def review_body() -> bytes:
    from kubemcsa import api

    document = json.loads(FIXTURE.read_text())
    document["request"]["object"]["metadata"]["annotations"][api.IMPORT_ANNOTATION] = ",".join(IMPORTS)
    return json.dumps(document).encode()


# --- servers (run in their own process) ---------------------------------------------------------------------------


async def bare_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """What any webhook must do at least: read the body, parse it, answer allowed: true with the uid."""
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    uid = json.loads(body)["request"]["uid"]
    answer = json.dumps(
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": {"uid": uid, "allowed": True}}
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


def serve(kind: str, port: int, cert_file: str, key_file: str) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    if kind == "webhook":
        from kubemcsa import api
        from webhook.__main__ import WebhookServer
        from webhook.cache import StaticCache

        cache = StaticCache(
            {NAMESPACE: {api.NAMESPACE_LABEL: api.NAMESPACE_LABEL_VALUE}}, {(NAMESPACE, name) for name in IMPORTS}
        )
        server = WebhookServer(None, cert_file, key_file, port=port, cache=cache)
        server.start()
        print("ready", flush=True)
        sys.stdin.read()  # until the parent closes our stdin
        server.stop()
        return
    import uvicorn

    config = uvicorn.Config(
        bare_app,
        host="127.0.0.1",
        port=port,
        ssl_certfile=cert_file,
        ssl_keyfile=key_file,
        lifespan="off",
        access_log=False,
        log_config=None,
        timeout_keep_alive=65,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    print("ready", flush=True)
    sys.stdin.read()
    server.should_exit = True
    thread.join(10)


# --- load generator (runs in its own process) ---------------------------------------------------------------------


def load(port: int, ca_file: str, connections: int, seconds: float) -> None:
    body = review_body()
    context = ssl.create_default_context(cafile=ca_file)
    latencies: list[list[float]] = [[] for _ in range(connections)]
    errors = [0] * connections
    start_gate = threading.Barrier(connections + 1)
    deadline = [0.0]

    def worker(index: int) -> None:
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        connection.request("POST", PATH, body=body, headers=headers)  # handshake and warm-up
        connection.getresponse().read()
        start_gate.wait()
        own = latencies[index]
        while True:
            started = time.perf_counter()
            if started >= deadline[0]:
                break
            connection.request("POST", PATH, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            own.append(time.perf_counter() - started)
            if response.status != 200:
                errors[index] += 1
        connection.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    deadline[0] = time.perf_counter() + seconds + 10  # provisional, until every worker is connected
    start_gate.wait()
    began = time.perf_counter()
    deadline[0] = began + seconds
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    merged = sorted(x for own in latencies for x in own)
    print(json.dumps({"requests": len(merged), "elapsed": elapsed, "errors": sum(errors), "latencies": merged}))


# --- orchestration ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], fraction: float) -> float:
    return values[min(len(values) - 1, int(len(values) * fraction))] if values else float("nan")


def run_case(port: int, ca_file: str, connections: int, seconds: float) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--load", str(port), "--ca", ca_file]
    argv += ["--connections", str(connections), "--seconds", str(seconds)]
    return json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)


def summarize(rounds: list[dict[str, Any]]) -> dict[str, float]:
    latencies = sorted(x for r in rounds for x in r["latencies"])
    return {
        "rps": sum(r["requests"] for r in rounds) / sum(r["elapsed"] for r in rounds),
        "p50": percentile(latencies, 0.50) * 1000,
        "p99": percentile(latencies, 0.99) * 1000,
        "errors": sum(r["errors"] for r in rounds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per server and case")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds the seconds are split into")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--serve", choices=["webhook", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--load", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cert", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    parser.add_argument("--ca", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.cert, args.key)
        return
    if args.load:
        load(args.load, args.ca, args.connections[0], args.seconds)
        return

    from kubemcsa import tls

    with tempfile.TemporaryDirectory(prefix="bench-webhook-") as directory:
        ca_cert, ca_key = tls.make_ca("bench-ca")
        cert, key = tls.make_serving_cert(ca_cert, ca_key, ["localhost"], ["127.0.0.1"])
        files = {name: os.path.join(directory, name) for name in ("ca.crt", "tls.crt", "tls.key")}
        for name, content in zip(files, (ca_cert, cert, key), strict=True):
            Path(files[name]).write_bytes(content)
        servers: dict[str, tuple[subprocess.Popen[str], int]] = {}
        results: dict[tuple[str, int], dict[str, float]] = {}
        try:
            for kind in ("bare", "webhook"):
                port = free_port()
                argv = [sys.executable, __file__, "--serve", kind, "--port", str(port)]
                argv += ["--cert", files["tls.crt"], "--key", files["tls.key"]]
                server = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                servers[kind] = (server, port)
                assert server.stdout is not None and server.stdout.readline().strip() == "ready"
                run_case(port, files["ca.crt"], 2, 1.0)  # warm-up
            # Short alternating rounds, so that a change in the machine's load hits both servers alike.
            for connections in args.connections:
                rounds: dict[str, list[dict[str, Any]]] = {kind: [] for kind in servers}
                for _ in range(args.rounds):
                    for kind, (_, port) in servers.items():
                        rounds[kind].append(run_case(port, files["ca.crt"], connections, args.seconds / args.rounds))
                for kind in servers:
                    results[kind, connections] = summarize(rounds[kind])
        finally:
            for server, _ in servers.values():
                assert server.stdin is not None
                server.stdin.close()
                server.wait(20)

    print(f"\nAdmission webhook over TLS, pod with {len(IMPORTS)} imports, {args.seconds:.0f} s per server and case")
    print(f"{'server':<10}{'conns':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'vs bare':>9}")
    for (kind, connections), result in sorted(results.items(), key=lambda item: (item[0][1], item[0][0])):
        ratio = result["rps"] / results["bare", connections]["rps"]
        print(
            f"{kind:<10}{connections:>6}{result['rps']:>10.0f}{result['p50']:>9.2f}{result['p99']:>9.2f}"
            f"{result['errors']:>8}{ratio:>8.0%}"
        )
    if ("webhook", 8) in results:
        webhook, bare = results["webhook", 8], results["bare", 8]
        ok = webhook["rps"] >= 0.7 * bare["rps"] and webhook["p99"] < 5
        print(f"\ntarget at 8 connections (>= 70 % of bare rps, p99 < 5 ms): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
