"""`kubemcsa demo`, run in-process: the whole Getting Started flow, printed step by step, then everything stopped."""

from __future__ import annotations

import threading
import time

from kubemcsa_testing import demo


def test_the_demo_plays_the_whole_flow_and_stops_everything() -> None:
    out: list[str] = []
    err: list[str] = []
    threads_before = {t.ident for t in threading.enumerate()}
    assert demo.main(out=out.append, err=err.append) == 0, err
    text = "\n".join(out)
    for expected in (
        "Starting two in-memory Kubernetes API servers",
        "target cluster 'cluster1': ServiceAccountImport multicluster-service-account/cluster2 created",
        "created ServiceAccount default/pod-lister",
        "ServiceAccount default/pod-lister updated (export-to: cluster1/default)",
        "is exported to cluster1/default (RBAC lets cluster1 request its tokens).",
        "import Ready=False reason=",
        "no token for it in cluster1",
        "namespace/default labeled",
        "with keys:",
        "token      <redacted>",
        "import Ready=True",
        f"volume {demo.api.volume_name_for_import(demo.IMPORT_NAME)}: secret",
        f"at {demo.api.mount_path_for_import(demo.IMPORT_NAME)}",
        "listed as pod-lister:",
        "  nginx",
        "listing secrets is refused, as it should be: 403",
        "everything started by the demo is stopped",
    ):
        assert expected in text, f"{expected!r} missing from the demo's output:\n{text}"
    assert err == []
    deadline = time.monotonic() + 10  # a stopped thread may take a moment to finish returning

    def leftover() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.ident not in threads_before and not t.daemon]

    while leftover() and time.monotonic() < deadline:
        leftover()[0].join(0.1)
    assert leftover() == []


def test_the_demo_keeps_running_until_asked_to_stop() -> None:
    out: list[str] = []
    stop = threading.Event()
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(demo.main(keep_running=True, out=out.append, stop=stop)))
    runner.start()
    try:
        deadline = 60.0
        waited = threading.Event()
        while not any("Still running" in line for line in out) and runner.is_alive() and deadline > 0:
            waited.wait(0.05)
            deadline -= 0.05
        assert any("kubemcsa status -A --kubeconfig" in line for line in out), "\n".join(out)
    finally:
        stop.set()
        runner.join(60)
    assert result == [0]


def test_the_federated_demo_plays_the_whole_flow_without_copying_a_token() -> None:
    out: list[str] = []
    err: list[str] = []
    assert demo.main(out=out.append, err=err.append, federated=True) == 0, err
    text = "\n".join(out)
    for expected in (
        "kubemcsa federate --target-context cluster1 --source-context cluster2",
        "ConfigMap multicluster-service-account/federated-cluster2 created",
        "kind: AuthenticationConfiguration",
        "import Ready=False reason=FederationNotTrusted",
        "is user 'cluster1:system:serviceaccount:multicluster-service-account:multicluster-service-account-trust-check",
        "import Ready=True reason=Federated",
        "status.remoteUser: cluster1:system:serviceaccount:default:<service-account>",
        "holds ca.crt, config, namespace, server: no token",
        "serviceAccountToken {'path': 'token', 'audience': 'cluster2', 'expirationSeconds': 3600}",
        "files: ca.crt, config, namespace, server, token",
        "cluster2 sees the client as 'cluster1:system:serviceaccount:default:app'",
        "pods in cluster2's default namespace: nginx",
        "listing secrets is refused, as it should be: 403",
        "after rotation, still listed: nginx",
        "Secrets with a token key in cluster1: none",
        "everything started by the demo is stopped",
    ):
        assert expected in text, f"{expected!r} missing from the demo's output:\n{text}"
    assert err == []
