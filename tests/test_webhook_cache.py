"""The webhook's cache bounds what a review costs the API server (issue 17): a namespace that does not exist is
remembered (for ABSENT_SECONDS, in a bounded map), and namespaces the synced watch does not know are looked up at a
bounded rate, counted on the in-memory API server's request log, as the webhook's own RBAC-bound identity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubemcsa.client import kube
from kubemcsa.contract import api
from kubemcsa_testing import crd_manifest
from kubemcsa_testing.wait import wait_for
from webhook.cache import NAMESPACE_LOOKUP_BURST, WatchCache
from webhook.cli import SERVICE_NAME
from webhook.lookups import Recent
from webhook.mutation import LookupFailed

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests" / "webhook"
USER = f"system:serviceaccount:{api.SYSTEM_NAMESPACE}:{SERVICE_NAME}"


def webhook_client(cluster: Any) -> Any:
    admin = cluster.admin_client()
    kube.Resource(admin, kube.CRDS).create(crd_manifest())
    for namespace in (api.SYSTEM_NAMESPACE, api.CERT_NAMESPACE):  # the webhook's RBAC spans both
        kube.Resource(admin, kube.NAMESPACES).create({"metadata": {"name": namespace}})
    for name in ("serviceaccount.yaml", "rbac.yaml"):
        for doc in yaml.safe_load_all((MANIFESTS / name).read_text()):
            if doc:
                kube.Resource(admin, kube.resource_type_of(doc)).create(doc)
    return cluster.client_for_token(cluster.issue_token(api.SYSTEM_NAMESPACE, SERVICE_NAME))


def namespace_gets(cluster: Any) -> list[str]:
    return [r.path for r in cluster.requests if r.user == USER and r.verb == "get" and r.resource == "namespaces"]


def test_unknown_namespaces_cost_a_bounded_number_of_gets(cluster1: Any) -> None:
    now = [1_000.0]
    cache = WatchCache(webhook_client(cluster1), clock=lambda: now[0]).start()
    try:
        assert cache.wait_for_sync(20)
        cluster1.reset_requests()
        # The same namespace that does not exist, review after review, each later than an answer used to stand
        # (2 s): once, the webhook asked the API server every time.
        for _ in range(5):
            assert cache.namespace_labels("does-not-exist") is None
            assert cache.cached().namespace_labels("does-not-exist") is None  # the event loop's view, no call
            now[0] += 5
        assert len(namespace_gets(cluster1)) == 1
        # A new unknown namespace in every review: the API server sees a burst of GETs at most, the rest are
        # refused with a reason until the budget refills.
        refused = []
        for i in range(100):
            try:
                assert cache.namespace_labels(f"probe-{i}") is None
            except LookupFailed as exc:
                refused.append(str(exc))
        assert len(namespace_gets(cluster1)) == 1 + NAMESPACE_LOOKUP_BURST
        assert len(refused) == 100 - NAMESPACE_LOOKUP_BURST
        assert "too many namespaces it does not know" in refused[0] and "retry" in refused[0]
        now[0] += 20  # the budget refills with time
        assert cache.namespace_labels("probe-99") is None
        assert len(namespace_gets(cluster1)) == 2 + NAMESPACE_LOOKUP_BURST
        # A namespace created meanwhile comes through the watch, whatever was remembered of its absence.
        labels = {api.NAMESPACE_LABEL: api.NAMESPACE_LABEL_VALUE}
        kube.Resource(cluster1.admin_client(), kube.NAMESPACES).create(
            {"metadata": {"name": "does-not-exist", "labels": labels}}
        )
        wait_for(
            lambda: (
                cache._namespaces.get("does-not-exist") == {**labels, "kubernetes.io/metadata.name": "does-not-exist"}
            ),
            what="the namespace in the watch",
        )
        assert cache.cached().namespace_labels("does-not-exist") == cache.namespace_labels("does-not-exist")
    finally:
        cache.stop()


def test_remembered_answers_are_bounded_in_number() -> None:
    now = [0.0]
    recent = Recent(10.0, max_entries=3, clock=lambda: now[0])
    for i in range(10):
        recent.put(f"k{i}", i)
    assert len(recent) == 3 and [recent.get(f"k{i}") for i in (6, 7, 8, 9)] == [None, 7, 8, 9]
    recent.put("short", "x", ttl=1.0)
    now[0] = 2.0
    assert recent.get("short") is None and recent.get("k9") == 9


@pytest.mark.parametrize("ttl", [None, 0.5])
def test_an_answer_stands_for_its_time_only(ttl: float | None) -> None:
    now = [0.0]
    recent = Recent(1.0, clock=lambda: now[0])
    recent.put("k", "v", ttl)
    now[0] = 0.4
    assert recent.get("k") == "v"
    now[0] = 1.01
    assert recent.get("k") is None
