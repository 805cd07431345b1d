"""The per-source gate (rate limit and circuit) and the naming of connection failures: plain numbers, no API."""

from __future__ import annotations

import socket
import ssl

import pytest
import urllib3

from controller.gates import (
    FIRST,
    REFRESH,
    FairQueue,
    Go,
    SourceGate,
    SourceGates,
    TokenBucket,
    Wait,
    capacity,
    reachability_changes,
    refresh_rate,
)
from controller.model import Remote
from controller.remote import classify_remote_error, connection_problem, unreachable
from controller.source_clusters import ORIGIN_KUBECONFIG, ORIGIN_SECRET, token_expiry
from kubemcsa.contract import api
from kubemcsa.contract.spec import parse_spec

SPEC = parse_spec({"spec": {"clusterName": "c2", "namespace": "default", "name": "sa"}})


def test_token_bucket_allows_the_burst_then_spaces_calls_at_qps() -> None:
    bucket = TokenBucket(qps=5, burst=10, now=0)
    slots = [bucket.reserve(0) for _ in range(20)]
    assert slots[:10] == [0] * 10
    assert slots[10:] == pytest.approx([0.2 * i for i in range(1, 11)])
    # In any window of T seconds: at most burst + qps * T calls.
    assert sum(1 for s in slots if s <= 1.0) <= 10 + 5 * 1.0


def test_a_throttled_import_waits_in_line_and_goes_when_dispatched_without_asking_the_bucket_again() -> None:
    gate = SourceGate(qps=1, burst=1, now=0)
    assert gate.admit("a", 0) == Go()
    assert gate.admit("b", 0) == Wait(None)  # in line: woken by the dispatcher
    assert gate.dispatch(0.5) == ([], pytest.approx(1.0))  # no token yet; the next comes at 1 s
    assert gate.dispatch(1.0) == (["b"], None)
    assert gate.admit("b", 1.0) == Go()  # its token, handed out by dispatch
    assert gate.admit("c", 1.0) == Wait(None)


def test_fair_queue_serves_a_namespace_that_joins_a_flood_within_one_turn() -> None:
    queue = FairQueue()
    for i in range(10_000):
        queue.push(f"flood/{i}", "flood")
    queue.push("quiet/first", "quiet")
    assert [queue.pop() for _ in range(2)] == ["flood/0", "quiet/first"]
    assert queue.pop() == "flood/1" and len(queue) == 9_998


def test_fair_queue_takes_turns_between_namespaces_and_keeps_order_within_one() -> None:
    queue = FairQueue()
    for key, flow in [("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("c1", "c"), ("b2", "b")]:
        queue.push(key, flow)
    queue.push("a1", "a")  # already in line: keeps its place
    assert [queue.pop() for _ in range(7)] == ["a1", "b1", "c1", "a2", "b2", "a3", None]


def test_fair_queue_serves_refreshes_before_first_tokens() -> None:
    queue = FairQueue()
    for i in range(5):
        queue.push(f"new/{i}", "flood", FIRST)
    queue.push("ready/1", "team", REFRESH)
    queue.push("new/0", "flood", REFRESH)  # it now holds a valid token: moves up to the refresh lane
    queue.push("ready/2", "team", REFRESH)
    assert [queue.pop() for _ in range(4)] == ["ready/1", "new/0", "ready/2", "new/1"]
    queue.remove("new/3")
    assert [queue.pop() for _ in range(3)] == ["new/2", "new/4", None]


def test_a_gate_dispatches_fairly_and_refreshes_first() -> None:
    gate = SourceGate(qps=1, burst=1, now=0)
    assert gate.admit("flood/0", 0, "flood") == Go()
    for i in range(1, 100):
        gate.admit(f"flood/{i}", 0, "flood")
    gate.admit("quiet/0", 0, "quiet")
    gate.admit("team/ready", 0, "team", REFRESH)
    order = [gate.dispatch(float(t))[0] for t in range(1, 4)]
    assert order == [["team/ready"], ["flood/1"], ["quiet/0"]]


def test_demand_near_capacity_is_said_once_per_crossing() -> None:
    gate = SourceGate(qps=1, burst=1, now=0)
    rate = refresh_rate(0, 100)  # one request every 80 s
    crossings = [gate.record_demand(f"k{i}", rate) for i in range(70)]
    assert crossings.count(True) == 1 and crossings.index(True) in (63, 64)  # 64 / 80 = 0.8 of 1 QPS
    assert gate.demand() == (pytest.approx(70 / 80), 70)
    for i in range(20):
        gate.forget(f"k{i}")
    assert gate.record_demand("k69", rate) is False  # below 0.72 now: the next crossing will say so again
    assert [gate.record_demand(f"n{i}", rate) for i in range(15)].count(True) == 1
    assert capacity(5, 600) == 2400 and capacity(5, 86400) == 345_600


def test_a_source_that_flaps_wakes_its_imports_at_most_once_per_hold() -> None:
    told_at: dict[str, float] = {}
    assert reachability_changes({"c2"}, set(), told_at, now=100.0, hold=10.0) == {"c2"}  # first change: at once
    told_at["c2"] = 100.0
    assert reachability_changes(set(), {"c2"}, told_at, now=100.5, hold=10.0) == set()  # back up: held
    assert reachability_changes({"c2"}, {"c2"}, told_at, now=105.0, hold=10.0) == set()  # down again: nothing new
    assert reachability_changes(set(), {"c2"}, told_at, now=110.0, hold=10.0) == {"c2"}  # hold over: its state now
    assert reachability_changes({"c3"}, {"c2"}, told_at, now=101.0, hold=10.0) == {"c3"}  # each source on its own


def test_an_open_circuit_lets_one_probe_through_and_wakes_the_others_on_recovery() -> None:
    gate = SourceGate(qps=100, burst=100, probe_base=1, probe_max=8, now=0, jitter=lambda: 1.0)
    assert gate.admit("a", 0) == Go()
    gate.failed("a", 0, api.REASON_REMOTE_UNREACHABLE, "down")
    waits = [gate.admit(key, 0.1) for key in ("b", "c", "d")]
    assert all(isinstance(w, Wait) and w.until is None and w.message == "down" for w in waits)
    assert gate.due_probe(0.5) is None  # not before the backoff
    prober = gate.due_probe(1.0)
    assert prober in {"a", "b", "c", "d"}
    assert gate.due_probe(1.1) is None  # one probe at a time
    assert gate.admit(prober, 1.1) == Go()
    others = {"a", "b", "c", "d"} - {prober}
    assert all(isinstance(gate.admit(k, 1.1), Wait) for k in others)
    gate.failed(prober, 1.2, api.REASON_REMOTE_UNREACHABLE, "down")
    assert gate.due_probe(2.5) is None  # the backoff doubled: 2 s
    second = gate.due_probe(3.2)
    assert second is not None
    assert gate.answered(second) | {second} == {"a", "b", "c", "d"}  # every waiting import is woken
    assert not gate.is_open and gate.admit("e", 3.3) == Go()


def most_in_a_window(times: list[float], window: float) -> int:
    """The most calls in any closed window of `window` seconds (a token bucket allows burst + qps * window)."""
    return max((sum(1 for t in times if start <= t <= start + window) for start in times), default=0)


def test_a_recovery_spends_no_more_than_the_rate_limit_probe_included() -> None:
    """A source down, then back: the probe is a call too, so it spends a token of the bucket; with it free, the
    probe plus the woken burst plus the refill went one over burst + qps * T."""
    qps, burst = 4, 2
    gate = SourceGate(qps=qps, burst=burst, probe_base=1, probe_max=1, now=0, jitter=lambda: 1.0)
    calls = []
    for key in ("a", "b"):
        assert gate.admit(key, 0) == Go()
        calls.append(0.0)
    gate.failed("a", 0, "R", "down")
    gate.failed("b", 0, "R", "down")
    keys = [f"k{i}" for i in range(10)]
    assert all(isinstance(gate.admit(key, 0), Wait) for key in keys)  # the circuit is open: they wait
    prober = gate.due_probe(1.0)
    assert prober is not None and gate.admit(prober, 1.0) == Go()
    calls.append(1.0)
    woken = gate.answered(prober)
    calls += [1.0 for key in sorted(woken) if gate.admit(key, 1.0) == Go()]
    for step in range(1, 20):  # the dispatcher, every 0.25 s: each key it hands a token calls at once
        now = 1.0 + step / qps
        calls += [now for key in gate.dispatch(now)[0] if gate.admit(key, now) == Go()]
    assert len(calls) == 2 + 1 + len(woken) and gate.queued() == 0  # every import called, once
    assert most_in_a_window(calls, 1.0) <= burst + qps * 1.0


def test_a_token_handed_out_before_the_circuit_opened_buys_no_call_after_it_closed() -> None:
    qps, burst = 1, 1
    gate = SourceGate(qps=qps, burst=burst, probe_base=0.5, probe_max=0.5, now=0, jitter=lambda: 1.0)
    assert gate.admit("a", 0) == Go()
    assert gate.admit("b", 0) == Wait(None)
    assert gate.dispatch(1.0) == (["b"], None)  # b's token; its worker is busy, it has not called yet
    gate.failed("a", 1.0, "R", "down")  # a's call failed meanwhile: open
    assert gate.due_probe(1.5) == "a" and gate.admit("a", 1.5) == Go()
    assert gate.answered("a") == set()
    calls = [0.0, 1.5]
    # b's worker gets to it now: its token went back when the circuit opened, and the probe spent one since.
    assert gate.admit("b", 1.5) == Wait(None)
    assert gate.dispatch(2.0) == ([], 2.5)
    assert gate.dispatch(2.5) == (["b"], None) and gate.admit("b", 2.5) == Go()
    calls.append(2.5)
    assert most_in_a_window(calls, 1.0) <= burst + qps * 1.0
    assert most_in_a_window(calls, 2.0) <= burst + qps * 2.0


def test_the_gate_says_how_late_imports_spend_the_tokens_handed_to_them() -> None:
    gate = SourceGate(qps=1, burst=1, now=0)
    gate.admit("a", 0)
    gate.admit("b", 0)
    gate.dispatch(1.0)
    assert gate.grant_lag() == 0.0
    assert gate.admit("b", 1.75) == Go()  # woken at 1.0, its worker got to it 0.75 s later
    assert gate.grant_lag() == 0.75


def test_a_key_queued_as_the_dispatchers_wait_ends_still_wakes_it() -> None:
    """The wake-up is consumed by dispatch (which looks), not by the wait: a key queued while the wait times out
    is dispatched at once instead of after the next full wait."""
    gates = SourceGates(qps=1, burst=1, clock=lambda: 0.0)
    gate = gates.gate("c2")
    assert gate.admit("a", 0) == Go()
    assert gates.dispatch() == ([], None) and not gates.wait_for_work(0)
    assert gate.admit("b", 0) == Wait(None)  # queued: the dispatcher should look
    assert gates.wait_for_work(0)  # say this wait was already timing out as b was queued
    assert gates.wait_for_work(0)  # the wake-up stays until the dispatcher looks
    gates.dispatch()
    assert not gates.wait_for_work(0)


def test_probe_backoff_has_jitter_and_a_cap() -> None:
    for jitter, expected in ((0.0, 0.5), (1.0, 1.0)):
        gate = SourceGate(probe_base=1, probe_max=1, now=0, jitter=lambda j=jitter: j)
        gate.failed("a", 0, "R", "m")
        for _ in range(10):
            gate.failed("a", 0, "R", "m")
        assert gate.due_probe(expected - 0.01) is None and gate.due_probe(expected) == "a"


def test_a_deleted_prober_does_not_stop_the_probing() -> None:
    gate = SourceGate(probe_base=1, probe_timeout=5, now=0, jitter=lambda: 1.0)
    gate.failed("a", 0, "R", "m")
    gate.admit("b", 0)
    first = gate.due_probe(1)
    gate.forget(first)
    assert gate.due_probe(1.1) is not None


def test_connection_failures_are_named_by_cause() -> None:
    def wrapped(cause: BaseException) -> BaseException:
        try:
            try:
                raise cause
            except BaseException as inner:
                raise urllib3.exceptions.NewConnectionError(None, "x") from inner
        except BaseException as outer:
            return outer

    assert connection_problem(wrapped(ConnectionRefusedError()))[1] == "connection refused"
    assert "DNS" in connection_problem(wrapped(socket.gaierror(-2, "Name or service not known")))[1]
    assert connection_problem(urllib3.exceptions.ConnectTimeoutError())[1] == "timed out"
    assert connection_problem(ConnectionResetError())[1] == "the connection was closed before an answer"
    assert connection_problem(wrapped(ConnectionResetError()))[1] == "the connection was closed before an answer"
    assert connection_problem(urllib3.exceptions.ReadTimeoutError(None, "/", "read timed out"))[1] == "timed out"
    tls = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    reason, what = connection_problem(urllib3.exceptions.SSLError(tls))
    assert reason == api.REASON_REMOTE_CERTIFICATE_UNTRUSTED and "not signed by the CA" in what
    source = Remote("c2", "https://c2:6443", b"", origin=ORIGIN_SECRET)
    failure = unreachable(source, urllib3.exceptions.SSLError(tls))
    assert failure.source_down and "kubemcsa bootstrap" in failure.message


def test_a_rejected_source_credential_says_expired_or_unauthorized_and_how_to_renew_it() -> None:
    expired = Remote("c2", "https://c2:6443", b"", origin=ORIGIN_SECRET, credential_expires_at=100.0)
    failure = classify_remote_error(401, "Unauthorized", "c2", SPEC, expired, now=200.0)
    assert failure.reason == api.REASON_SOURCE_CREDENTIAL_EXPIRED and failure.source_down
    assert "kubemcsa bootstrap --target-context <this cluster> --source-context <cluster c2> --source-name c2" in (
        failure.message
    )
    valid = Remote("c2", "https://c2:6443", b"", origin=ORIGIN_KUBECONFIG, credential_expires_at=300.0)
    failure = classify_remote_error(401, "Unauthorized", "c2", SPEC, valid, now=200.0)
    assert failure.reason == api.REASON_UNAUTHORIZED and "--source-kubeconfig" in failure.message
    assert not classify_remote_error(404, "x", "c2", SPEC).source_down


def test_token_expiry_reads_a_jwt_and_tolerates_anything_else() -> None:
    import base64
    import json

    payload = base64.urlsafe_b64encode(json.dumps({"exp": 1234}).encode()).decode().rstrip("=")
    assert token_expiry(f"e30.{payload}.sig") == 1234
    for junk in ("", "a.b", "a.!!!.c", "a.e30.c", f"a.{base64.urlsafe_b64encode(b'[1]').decode()}.c"):
        assert token_expiry(junk) is None
