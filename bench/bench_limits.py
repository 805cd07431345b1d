"""Benchmark of issue 17's bounds (prints figures; not a test).

- The controller's CPU to refuse an export-to annotation of 100k entries (and to read one at the cap, 1,000
  entries, and one of 10k): the pure export verdict, as a reconcile runs it, each value new to the parse cache.
- How soon a new connection from 127.0.0.1 (the API server's stand-in) is served while one other address
  (127.0.0.2) has opened 2,048 kept-alive connections to the webhook, over TLS.

Usage: python bench/bench_limits.py [--connections 2048]
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kubemcsa.client import tls
from kubemcsa.contract import api
from kubemcsa.contract.export_policy import MAX_EXPORT_TO_ENTRIES, export_verdict


def export_to_cpu_ms(entries: int, cluster: str) -> tuple[float, bool, str]:
    salt = f"n{entries}{cluster}-"  # new to the parse cache
    value = ",".join(f"{cluster}/{salt}{i}" for i in range(entries))
    account = {
        "metadata": {
            "name": "bot",
            "namespace": "team-x",
            "labels": {api.EXPORTED_LABEL: api.EXPORTED_LABEL_VALUE},
            "annotations": {api.EXPORT_TO_ANNOTATION: value},
        }
    }
    started = time.process_time()
    verdict = export_verdict(
        account,
        exists=True,
        source="cluster2",
        namespace="team-x",
        name="bot",
        consumer=cluster,
        import_namespace=f"{salt}{entries - 1}",
    )
    return (time.process_time() - started) * 1000, verdict.allowed, verdict.message[:100]


def lockout(connections: int) -> float:
    from webhook.lookups import StaticCache
    from webhook.server import WebhookServer

    ca_cert, ca_key = tls.make_ca("bench-limits")
    cert, key = tls.make_serving_cert(ca_cert, ca_key, ["localhost"], ["127.0.0.1"])
    directory = Path(tempfile.mkdtemp())
    (directory / "tls.crt").write_bytes(cert)
    (directory / "tls.key").write_bytes(key)
    context = ssl.create_default_context(cadata=ca_cert.decode())
    done = threading.Event()
    release: list[asyncio.Event] = []

    async def hold(host: str, port: int) -> None:
        release.append(asyncio.Event())
        gate = asyncio.Semaphore(32)
        writers = []

        async def one() -> None:
            async with gate:
                try:
                    reader, writer = await asyncio.open_connection(host, port, ssl=context, local_addr=("127.0.0.2", 0))
                    writers.append(writer)
                    writer.write(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                    await asyncio.wait_for(reader.readuntil(b"ok"), 30)
                except (OSError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError):
                    pass

        await asyncio.gather(*(one() for _ in range(connections)))
        done.set()
        await release[0].wait()
        for writer in writers:
            writer.close()

    cache = StaticCache()
    with WebhookServer(None, directory / "tls.crt", directory / "tls.key", cache=cache) as server:
        host, port = server.url.removeprefix("https://").rsplit(":", 1)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_until_complete, args=(hold(host, int(port)),), daemon=True)
        thread.start()
        done.wait(300)
        started = time.perf_counter()
        deadline = started + 60
        while time.perf_counter() < deadline:
            try:
                with httpx.Client(verify=context, timeout=5) as client:
                    if client.get(server.url + "/healthz").status_code == 200:
                        break
            except httpx.HTTPError:
                continue
        served_in = time.perf_counter() - started
        loop.call_soon_threadsafe(release[0].set)
        thread.join(30)
    return served_in


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=2048)
    args = parser.parse_args()
    # A short cluster name puts 5,000 entries under the length cap: the entry cap refuses those.
    for entries, cluster in ((MAX_EXPORT_TO_ENTRIES, "cluster1"), (5_000, "c"), (10_000, "cluster1"), (100_000, "c")):
        ms, allowed, message = export_to_cpu_ms(entries, cluster)
        print(f"export-to of {entries:>7,} entries: {ms:8.2f} ms of CPU, allowed={allowed}  ({message}...)")
    served_in = lockout(args.connections)
    held = f"{args.connections} kept-alive connections from 127.0.0.2"
    print(f"{held}: a new one from 127.0.0.1 served in {served_in:.3f} s")


if __name__ == "__main__":
    main()
