"""Benchmark of the in-memory API server through the official kubernetes client (prints figures, asserts nothing).

    python bench/bench_apiserver.py [--secrets 1000] [--events 200]

Targets (issue 2): <= 2 ms per create over 1,000 Secrets, <= 100 ms to list them, <= 10 ms from a write to
its watch event.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from kubernetes import client, watch

from kubemcsa_testing import ApiServer


def bench_creates(core: client.CoreV1Api, count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        core.create_namespaced_secret("bench", {"metadata": {"name": f"s-{i}"}, "data": {"k": "dmFsdWU="}})
    return (time.perf_counter() - start) / count


def bench_list(core: client.CoreV1Api, api: client.ApiClient, rounds: int = 5) -> tuple[float, float, int]:
    """(seconds per list through the typed client, seconds per raw list without model decoding, items)."""
    typed, raw, items = [], [], 0
    for _ in range(rounds):
        start = time.perf_counter()
        items = len(core.list_namespaced_secret("bench").items)
        typed.append(time.perf_counter() - start)
        start = time.perf_counter()
        core.list_namespaced_secret("bench", _preload_content=False).read()
        raw.append(time.perf_counter() - start)
    return min(typed), min(raw), items


def bench_watch_latency(core: client.CoreV1Api, events: int) -> list[float]:
    rv = core.list_namespaced_config_map("bench").metadata.resource_version
    sent: dict[str, float] = {}
    delays: list[float] = []
    ready = threading.Event()
    done = threading.Event()

    def run() -> None:
        w = watch.Watch()
        stream = w.stream(
            core.list_namespaced_config_map, "bench", resource_version=rv, timeout_seconds=60, _preload_content=False
        )
        ready.set()
        for event in stream:
            name = event["raw_object"]["metadata"]["name"] if "raw_object" in event else event["object"].metadata.name
            if name in sent:
                delays.append(time.perf_counter() - sent[name])
            if len(delays) >= events:
                w.stop()
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait()
    time.sleep(0.2)  # let the watch request reach the server before the first write
    for i in range(events):
        name = f"w-{i}"
        sent[name] = time.perf_counter()
        core.create_namespaced_config_map("bench", {"metadata": {"name": name}})
        time.sleep(0.005)  # one event at a time: measure latency, not queueing
    done.wait(30)
    return delays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--secrets", type=int, default=1000)
    parser.add_argument("--events", type=int, default=200)
    args = parser.parse_args()
    with ApiServer(name="bench") as server:
        api = server.admin_client()
        core = client.CoreV1Api(api)
        core.create_namespace({"metadata": {"name": "bench"}})
        per_create = bench_creates(core, args.secrets)
        typed, raw, items = bench_list(core, api)
        delays = bench_watch_latency(core, args.events)
    print(f"create: {per_create * 1000:.2f} ms per Secret over {args.secrets} (target <= 2 ms)")
    print(f"list:   {typed * 1000:.1f} ms for {items} Secrets through the typed client, "
          f"{raw * 1000:.1f} ms for the raw response (target <= 100 ms)")  # fmt: skip
    if delays:
        ms = sorted(d * 1000 for d in delays)
        print(
            f"watch:  write-to-event median {statistics.median(ms):.2f} ms, p95 {ms[int(len(ms) * 0.95) - 1]:.2f} ms, "
            f"max {ms[-1]:.2f} ms over {len(ms)} events (target <= 10 ms)"
        )
    else:
        print("watch:  no events received")


if __name__ == "__main__":
    main()
