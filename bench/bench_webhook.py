"""Benchmark the admission webhook over TLS against a bare uvicorn app, in the same run, then under attack.

    python bench/bench_webhook.py [--seconds 4] [--rounds 4] [--connections 1 8] [--attack-seconds 4]

Both servers run at once, each in its own process: the webhook as deployed (WebhookServer, its cache holding
the imports), and a bare app (a plain ASGI callable that parses the JSON and answers allowed: true). The load
generator is a third process with one keep-alive HTTPS connection per thread, posting a realistic AdmissionReview
(the kubectl fixture, annotated with three imports); the servers are measured in alternating short rounds, so
that changes in the machine's load hit both alike. Prints requests per second and p50/p99 latency as a table.
Target (issue 4): at 8 connections, >= 70 % of the bare app's requests per second and p99 < 5 ms on 2 cores.

Then the worst requests the webhook accepts (issue 10): the costliest body it parses on its event loop (16 KiB of
nested lists, timed in this process: that is the longest the loop is busy with one request), the 80,000-name
annotation, a 4 MiB body of tiny objects with 32 imports and 250 containers, and a body over the cap; each one's
latency, then the ordinary request's req/s and p99 at 8 connections while an attacker process posts the worst
large body without pause on 2 connections (the figures to compare with the quiet ones above).
"""

from __future__ import annotations

import argparse
import asyncio
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
        callbacks: list[tuple[float, str]] = []
        _time_callbacks(callbacks)
        server = WebhookServer(None, cert_file, key_file, port=port, cache=cache)
        server.start()
        if hasattr(server.app.state, "parser"):  # (so that this script also measures older versions)
            server.app.state.parser.warm()
        from webhook import __main__ as webhook_main

        if hasattr(webhook_main, "settle_garbage_collector"):  # as main() does
            webhook_main.settle_garbage_collector()
        lags: list[float] = []
        loop = server._server.loop if server._server is not None else None
        if loop is not None:
            asyncio.run_coroutine_threadsafe(_watch_loop(lags), loop)
        print("ready", flush=True)
        for line in sys.stdin:  # until the parent closes our stdin
            if line.strip() == "lag":  # the event loop's callbacks and lateness since the last question
                late, lags[:] = sorted(lags), []
                spent, callbacks[:] = sorted(callbacks), []
                figures: dict[str, Any] = {"p99": percentile(late, 0.99), "max": max(late, default=0.0)}
                figures.update(callbacks=len(spent), busy_p9999=percentile([c for c, _ in spent], 0.9999))
                figures.update(busy_max=spent[-1][0] if spent else 0.0, longest=spent[-1][1] if spent else "")
                print(json.dumps(figures), flush=True)
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


async def _watch_loop(lags: list[float]) -> None:
    """Sleep 1 ms at a time on the server's event loop and record how late each wake-up comes (wall clock, so
    waiting for a core on a busy machine is included)."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(0.001)
        lags.append(loop.time() - started - 0.001)


def _describe(handle: asyncio.events.Handle) -> str:
    """The callback, and for a task's step the coroutine and where it stopped (just after the costly part)."""
    owner = getattr(getattr(handle, "_callback", None), "__self__", None)
    task = owner if isinstance(owner, asyncio.Task) else getattr(owner, "_task", None)
    if isinstance(task, asyncio.Task):
        coroutine = task.get_coro()
        frame = getattr(coroutine, "cr_frame", None)
        where = f" at line {frame.f_lineno}" if frame is not None else " (finished)"
        return f"step of {getattr(coroutine, '__qualname__', coroutine)}{where}"
    return repr(handle)[:160]


def _time_callbacks(records: list[tuple[float, str]]) -> None:
    """Record the CPU time of every callback the server's event loop runs (each step of each request's task):
    the loop is only ever blocked by one of them, so the longest is what this benchmark must show to be short."""
    run = asyncio.events.Handle._run

    def timed(handle: asyncio.events.Handle) -> None:
        started = time.thread_time()
        run(handle)
        spent = time.thread_time() - started
        records.append((spent, _describe(handle) if spent > 0.0005 else ""))

    asyncio.events.Handle._run = timed  # type: ignore[method-assign]


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


# --- the worst allowed requests ------------------------------------------------------------------------------------


def _review_with(annotation: str, **spec: Any) -> dict[str, Any]:
    from kubemcsa import api

    document = json.loads(FIXTURE.read_text())
    document["request"]["object"]["metadata"]["annotations"][api.IMPORT_ANNOTATION] = annotation
    document["request"]["object"]["spec"].update(spec)
    return document


def _filled(document: dict[str, Any], size: int) -> bytes:
    """The document with spec.filler of nested empty lists (the costliest JSON per byte), at most `size` bytes."""
    empty = json.dumps(document, separators=(",", ":")).encode()
    document["request"]["object"]["spec"]["filler"] = [[[]]] * max(0, (size - len(empty) - 20) // 7)
    body = json.dumps(document, separators=(",", ":")).encode()
    assert len(body) <= size, (len(body), size)
    return body


def worst_bodies() -> dict[str, bytes]:
    from kubemcsa import api
    from webhook import app, review

    cap = ",".join(IMPORTS + [f"import-{i}" for i in range(api.MAX_IMPORTS_PER_POD - len(IMPORTS))])
    containers = [{"name": f"c{i}", "image": "x"} for i in range(247)]  # + the fixture's 3: the 250 allowed
    return {
        "worst inline (16 KiB)": _filled(_review_with(cap), app.INLINE_BODY_BYTES),
        "80,000 names": json.dumps(_review_with(",".join(f"name-{i}" for i in range(80_000)))).encode(),
        "4 MiB, 32 imports x 250 containers": _filled(_review_with(cap, containers=containers), review.MAX_BODY_BYTES),
        "over the cap": b" " * (review.MAX_BODY_BYTES + 1),
    }


def inline_parse_ms(repeats: int = 1000) -> tuple[float, float]:
    """(median, p99) CPU ms of the event loop's work for the worst body it parses itself (parse + complete)."""
    from kubemcsa import api
    from webhook import __main__ as webhook_main
    from webhook import app, review
    from webhook.cache import StaticCache

    if hasattr(webhook_main, "settle_garbage_collector"):  # as the server does: no 35 ms full collections
        webhook_main.settle_garbage_collector()
    body = worst_bodies()["worst inline (16 KiB)"]
    names = json.loads(body)["request"]["object"]["metadata"]["annotations"][api.IMPORT_ANNOTATION].split(",")
    cache = StaticCache({NAMESPACE: {api.NAMESPACE_LABEL: api.NAMESPACE_LABEL_VALUE}}, {(NAMESPACE, n) for n in names})
    times = []
    for _ in range(repeats):
        started = time.thread_time()  # CPU time: on a busy machine, waiting for a core is not the loop's work
        parsed = review.parse(body, max_mounts=app.INLINE_MAX_MOUNTS)
        assert isinstance(parsed, review.Pending)
        review.complete(parsed, cache)
        times.append(time.thread_time() - started)
    times.sort()
    return percentile(times, 0.5) * 1000, percentile(times, 0.99) * 1000


def post_once(port: int, ca_file: str, body: bytes) -> tuple[float, int]:
    context = ssl.create_default_context(cafile=ca_file)
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    connection.connect()
    started = time.perf_counter()
    try:
        connection.request("POST", PATH, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return time.perf_counter() - started, response.status
    finally:
        connection.close()


def attack(port: int, ca_file: str, seconds: float) -> None:
    """Post the worst large body without pause on 2 connections for `seconds`; print its latencies."""
    body = worst_bodies()["4 MiB, 32 imports x 250 containers"]
    context = ssl.create_default_context(cafile=ca_file)
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    def worker() -> None:
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            connection.request("POST", PATH, body=body, headers={"Content-Type": "application/json"})
            connection.getresponse().read()
            latencies.append(time.perf_counter() - started)
        connection.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"latencies": sorted(latencies)}))


# --- orchestration ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], fraction: float) -> float:
    return values[min(len(values) - 1, int(len(values) * fraction))] if values else float("nan")


def event_loop_lag(server: subprocess.Popen[str]) -> dict[str, float]:
    """How late the webhook's event loop woke up since the last call (p99 and max, seconds)."""
    assert server.stdin is not None and server.stdout is not None
    server.stdin.write("lag\n")
    server.stdin.flush()
    return json.loads(server.stdout.readline())


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux): what a server spends, whatever else loads the machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_case(port: int, ca_file: str, connections: int, seconds: float, pid: int | None = None) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--load", str(port), "--ca", ca_file]
    argv += ["--connections", str(connections), "--seconds", str(seconds)]
    before = cpu_seconds(pid) if pid else 0.0
    result = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)
    result["cpu"] = cpu_seconds(pid) - before if pid else 0.0
    return result


def summarize(rounds: list[dict[str, Any]]) -> dict[str, float]:
    latencies = sorted(x for r in rounds for x in r["latencies"])
    return {
        "rps": sum(r["requests"] for r in rounds) / sum(r["elapsed"] for r in rounds),
        "p50": percentile(latencies, 0.50) * 1000,
        "p99": percentile(latencies, 0.99) * 1000,
        "errors": sum(r["errors"] for r in rounds),
        # Server CPU per request, in microseconds (includes the warm-up requests of each round: a few per 1000).
        "cpu_us": sum(r.get("cpu", 0.0) for r in rounds) / max(1, sum(r["requests"] for r in rounds)) * 1e6,
    }


class _Done(Exception):
    """The quiet figures are all that was asked for."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per server and case")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds the seconds are split into")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--attack-seconds", type=float, default=4.0, help="seconds of ordinary load under attack")
    parser.add_argument("--no-attack", action="store_true", help="measure the quiet figures only")
    parser.add_argument("--serve", choices=["webhook", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--attack", type=int, help=argparse.SUPPRESS)
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
    if args.attack:
        attack(args.attack, args.ca, args.seconds)
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
                    for kind, (process, port) in servers.items():
                        share = args.seconds / args.rounds
                        rounds[kind].append(run_case(port, files["ca.crt"], connections, share, process.pid))
                for kind in servers:
                    results[kind, connections] = summarize(rounds[kind])
            webhook_process, webhook_port = servers["webhook"]
            worst: dict[str, tuple[float, float, int]] = {}
            if args.no_attack:
                raise _Done
            for name, body in worst_bodies().items():
                tries = [post_once(webhook_port, files["ca.crt"], body) for _ in range(5)]
                worst[name] = (sorted(t for t, _ in tries)[2] * 1000, max(t for t, _ in tries) * 1000, tries[0][1])
            argv = [sys.executable, __file__, "--attack", str(webhook_port), "--ca", files["ca.crt"]]
            argv += ["--seconds", str(args.attack_seconds + 2)]
            quiet_lag = event_loop_lag(webhook_process)
            attacker = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
            time.sleep(1)  # let the attack get going
            event_loop_lag(webhook_process)
            under_attack = summarize([run_case(webhook_port, files["ca.crt"], 8, args.attack_seconds)])
            attack_lag = event_loop_lag(webhook_process)
            attacked = json.loads(attacker.communicate(timeout=120)[0])["latencies"]
        except _Done:
            pass
        finally:
            for server, _ in servers.values():
                assert server.stdin is not None
                server.stdin.close()
                server.wait(20)

    print(f"\nAdmission webhook over TLS, pod with {len(IMPORTS)} imports, {args.seconds:.0f} s per server and case")
    header = f"{'server':<10}{'conns':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'vs bare':>9}"
    print(header + f"{'CPU us/req':>12}")
    for (kind, connections), result in sorted(results.items(), key=lambda item: (item[0][1], item[0][0])):
        ratio = result["rps"] / results["bare", connections]["rps"]
        print(
            f"{kind:<10}{connections:>6}{result['rps']:>10.0f}{result['p50']:>9.2f}{result['p99']:>9.2f}"
            f"{result['errors']:>8}{ratio:>8.0%}{result['cpu_us']:>12.0f}"
        )
    if ("webhook", 8) in results:
        webhook, bare = results["webhook", 8], results["bare", 8]
        ok = webhook["rps"] >= 0.7 * bare["rps"] and webhook["p99"] < 5
        print(f"\ntarget at 8 connections (>= 70 % of bare rps, p99 < 5 ms): {'met' if ok else 'NOT met'}")

    if args.no_attack:
        return
    median, p99 = inline_parse_ms()
    print(
        f"\nLongest work on the event loop for one request (worst 16 KiB body): "
        f"median {median:.3f} ms, p99 {p99:.3f} ms"
    )
    print(f"\n{'worst allowed request':<40}{'median ms':>10}{'max ms':>9}{'HTTP':>6}")
    for name, (typical, slowest, status) in worst.items():
        print(f"{name:<40}{typical:>10.1f}{slowest:>9.1f}{status:>6}")
    print(
        f"\nordinary requests at 8 connections while the 4 MiB body is posted without pause on 2 connections:\n"
        f"  {under_attack['rps']:.0f} req/s, p50 {under_attack['p50']:.2f} ms, p99 {under_attack['p99']:.2f} ms, "
        f"errors {under_attack['errors']}"
    )
    if ("webhook", 8) in results:
        print(f"  ({under_attack['rps'] / results['webhook', 8]['rps']:.0%} of the quiet figure's req/s)")
    for name, lag in (("meanwhile", attack_lag), ("before (quiet rounds, worst requests)", quiet_lag)):
        print(
            f"  event loop {name}: {lag['callbacks']} callbacks, CPU per callback p99.99 "
            f"{lag['busy_p9999'] * 1000:.2f} ms, max {lag['busy_max'] * 1000:.2f} ms; a 1 ms sleep woke up late by "
            f"p99 {lag['p99'] * 1000:.2f} ms, max {lag['max'] * 1000:.2f} ms (waiting for a core included)\n"
            f"    longest callback: {lag['longest']}"
        )
    print(
        f"  the attacker's 4 MiB requests: {len(attacked)} answered, median "
        f"{percentile(attacked, 0.5) * 1000:.0f} ms, max {max(attacked, default=0) * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
