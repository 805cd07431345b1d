"""Per source cluster: a client-side rate limit and a circuit breaker, so no failure turns into a storm.

- The rate limit is a token bucket (QPS and burst, as client-go's), shared across namespaces the way API Priority
  and Fairness shares a server: an import that may not call yet waits in a FairQueue (refreshes of tokens still
  valid first, then first tokens; within each, one namespace after the other, FIFO within a namespace), and a
  dispatcher hands each new token of the bucket to the next in line and wakes it. A namespace with 10,000 pending
  imports so delays another's first token by one slot, and a flood never lets a Ready import's token expire
  while the source has the capacity for its refreshes (see `capacity`). Waiting costs neither a thread nor a
  retry.
- The circuit opens when the source does not answer (or rejects the controller's own credential). While it is
  open, the source's imports wait without calls, and one probe at a time tests the source, after an
  exponential backoff with jitter. The first answer closes it and wakes the waiting imports, which then go
  through the rate limit: recovery is bounded too.

Time is passed in, so every rule here is tested with plain numbers.
"""

from __future__ import annotations

import random
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

from kubemcsa.contract import api

# client-go's defaults for a client (rest.Config QPS 5, Burst 10).
DEFAULT_QPS = 5.0
DEFAULT_BURST = 10
# The priority lanes of a source's queue: a refresh of a token that is still valid goes before any first token.
REFRESH = 0
FIRST = 1
# Above this share of its QPS spent on steady-state refreshes, a source is near its capacity (Event and metric).
NEAR_CAPACITY = 0.8
REASON_SOURCE_NEAR_CAPACITY = "SourceNearCapacity"


@dataclass(frozen=True)
class Go:
    """Make the call now."""


@dataclass(frozen=True)
class Wait:
    """Do not call. `until`: look again then (a probe); None: wait to be woken (by the dispatcher, for a token
    of the rate limit, or by the source's recovery)."""

    until: float | None
    reason: str | None = None  # the open circuit's condition reason and message; None for a rate-limit wait
    message: str | None = None


Admission = Go | Wait


class TokenBucket:
    """At most `burst` at once, refilled at `qps` per second; `reserve` hands out future slots in order."""

    def __init__(self, qps: float, burst: int, now: float) -> None:
        self.qps = max(qps, 1e-9)
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._last = now

    def _refill(self, now: float) -> None:
        if now > self._last:
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.qps)
            self._last = now

    def take(self, now: float) -> bool:
        """Take one token if there is one now."""
        self._refill(now)
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def next_token_at(self, now: float) -> float:
        """When `take` will next succeed (now if it would now)."""
        self._refill(now)
        return now if self._tokens >= 1 else self._last + (1 - self._tokens) / self.qps

    def give_back(self, n: int, now: float) -> None:
        """Tokens taken but never spent on a call return (the bucket never holds more than `burst`)."""
        self._refill(now)
        self._tokens = min(float(self.burst), self._tokens + n)

    def reserve(self, now: float) -> float:
        """Take one token; return when its call may go (now, or later if the bucket is empty)."""
        if now > self._last:
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.qps)
            self._last = now
        self._tokens -= 1
        return now if self._tokens >= 0 else self._last + (-self._tokens) / self.qps


class FairQueue:
    """Keys waiting for a token of one source, handed out in priority lanes (REFRESH before FIRST) and, within a
    lane, one flow (namespace) after the other, FIFO within a flow: fair queuing, as API Priority and Fairness
    queues requests by flow. A flow that joins goes after the flows already waiting have had one turn each.
    Pure: no time, no threads (the gate locks around it)."""

    def __init__(self) -> None:
        self._lanes: tuple[OrderedDict[str, deque[str]], ...] = (OrderedDict(), OrderedDict())
        self._where: dict[str, tuple[int, str]] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def push(self, key: str, flow: str, lane: int = FIRST) -> None:
        """Queue `key` (a key already queued keeps its place, unless it now needs a higher lane)."""
        where = self._where.get(key)
        if where is not None:
            if where[0] <= lane:
                return
            self.remove(key)
        self._lanes[lane].setdefault(flow, deque()).append(key)
        self._where[key] = (lane, flow)

    def pop(self) -> str | None:
        """The next key in line, or None."""
        for lane in self._lanes:
            if lane:
                flow, keys = next(iter(lane.items()))
                key = keys.popleft()
                if keys:
                    lane.move_to_end(flow)  # its next key waits for every other flow's turn
                else:
                    del lane[flow]
                del self._where[key]
                return key
        return None

    def remove(self, key: str) -> None:
        where = self._where.pop(key, None)
        if where is None:
            return
        lane, flow = where
        keys = self._lanes[lane][flow]
        keys.remove(key)
        if not keys:
            del self._lanes[lane][flow]


def refresh_rate(issued_at: float, expires_at: float | None) -> float:
    """Token requests per second one import needs in the steady state: one per refresh interval."""
    if expires_at is None or expires_at <= issued_at:
        return 0.0
    return 1.0 / (api.REFRESH_FRACTION * (expires_at - issued_at))


def capacity(qps: float, token_seconds: float) -> int:
    """How many imports one source can keep refreshed: each needs a token every REFRESH_FRACTION of its lifetime,
    and the source's rate limit gives `qps` tokens a second (e.g. 5 QPS and 600 s tokens: 2,400 imports)."""
    return int(qps * api.REFRESH_FRACTION * token_seconds)


SourceKey = TypeVar("SourceKey", bound=Hashable)


def reachability_changes(
    unreachable: set[SourceKey], told: set[SourceKey], told_at: dict[SourceKey, float], now: float, hold: float
) -> set[SourceKey]:
    """The sources whose reachability to tell their imports now: those found `unreachable` (or not) unlike what
    they were last `told`, unless they were told less than `hold` seconds ago (`told_at`): a source that flaps
    wakes its imports at most once per `hold`, and is told its latest state once the hold is over."""
    return {name for name in unreachable ^ told if now - told_at.get(name, float("-inf")) >= hold}


class SourceGate:
    def __init__(
        self,
        *,
        qps: float = DEFAULT_QPS,
        burst: int = DEFAULT_BURST,
        probe_base: float = 0.5,
        probe_max: float = 300.0,
        probe_timeout: float = 30.0,
        now: float = 0.0,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._bucket = TokenBucket(qps, burst, now)
        self._probe_base = probe_base
        self._probe_max = probe_max
        self._probe_timeout = probe_timeout
        self._jitter = jitter
        self._lock = threading.Lock()
        self._open = False
        self._reason: str | None = None
        self._message: str | None = None
        self._failures = 0
        self._next_probe_at = 0.0
        self._prober: str | None = None
        self._probe_deadline = 0.0
        self._waiting: set[str] = set()
        self._queue = FairQueue()
        self._granted: dict[str, float] = {}  # handed a token by dispatch, not spent yet: when it was handed
        self._grant_lag = 0.0  # the longest an import took to spend a token handed to it
        self._rates: dict[str, float] = {}  # steady-state token requests per second, per import holding a token
        self._demand = 0.0
        self._near_capacity = False
        self.on_queued: Callable[[], None] = lambda: None  # a key waits: the dispatcher should look

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def qps(self) -> float:
        return self._bucket.qps

    def admit(self, key: str, now: float, flow: str = "", lane: int = FIRST) -> Admission:
        """May `key` call the source now? Every call to the source asks first.

        `flow`: the import's namespace (the unit of fairness); `lane`: REFRESH if it holds a token still valid.
        """
        with self._lock:
            if self._open and key != self._prober:
                self._waiting.add(key)
                return Wait(None, self._reason, self._message)
            granted_at = self._granted.pop(key, None)
            if granted_at is not None:
                self._grant_lag = max(self._grant_lag, now - granted_at)
                return Go()
            if key == self._prober or (not self._queue and self._bucket.take(now)):
                return Go()  # the probe's token was taken when it was named (due_probe)
            self._queue.push(key, flow, lane)
        self.on_queued()
        return Wait(None)

    def dispatch(self, now: float) -> tuple[list[str], float | None]:
        """Hand the tokens the bucket has now to the next keys in line; return them (to wake: each then calls
        without asking the bucket again) and when the next token comes for those still waiting (None: nobody)."""
        with self._lock:
            granted: list[str] = []
            if self._open:
                return granted, None  # the probe decides; the queue waits for the source to answer again
            while self._queue and self._bucket.take(now):
                key = self._queue.pop()
                if key is not None:
                    self._granted[key] = now
                    granted.append(key)
            return granted, (self._bucket.next_token_at(now) if self._queue else None)

    def grant_lag(self) -> float:
        """The longest an import took to spend a token handed to it (its wake-up waited for a busy worker): calls
        reach the source up to this late, so in any T seconds it sees at most burst + qps * (T + lag) of them."""
        with self._lock:
            return self._grant_lag

    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    def record_demand(self, key: str, rate: float) -> bool:
        """`key` now holds a token needing `rate` requests a second; True if that took the source above
        NEAR_CAPACITY of its QPS (once per crossing: it must fall below 0.9 of that before it says so again)."""
        with self._lock:
            self._demand += rate - self._rates.get(key, 0.0)
            if rate > 0:
                self._rates[key] = rate
            else:
                self._rates.pop(key, None)
            ratio = self._demand / self._bucket.qps
            if self._near_capacity and ratio < 0.9 * NEAR_CAPACITY:
                self._near_capacity = False
            crossed = not self._near_capacity and ratio >= NEAR_CAPACITY
            self._near_capacity = self._near_capacity or crossed
            return crossed

    def demand(self) -> tuple[float, int]:
        """(Steady-state token requests per second of the imports holding tokens, how many hold one)."""
        with self._lock:
            return max(0.0, self._demand), len(self._rates)

    def answered(self, key: str) -> set[str]:
        """The source answered (whatever the answer): close the circuit; return the imports to wake."""
        with self._lock:
            woken, self._waiting = self._waiting, set()
            woken.discard(key)
            self._open = False
            self._reason = self._message = self._prober = None
            self._failures = 0
            return woken

    def failed(self, key: str, now: float, reason: str, message: str) -> set[str]:
        """The source did not answer, or rejected the controller's own credential: open the circuit.

        Returns the waiting imports to wake when the cause changed (say, from unreachable to a rejected
        credential), so that each says the new cause; they make no call, the circuit is still open.
        """
        with self._lock:
            changed = self._open and (reason, message) != (self._reason, self._message)
            self._open = True
            self._reason, self._message = reason, message
            self._failures += 1
            backoff = min(self._probe_max, self._probe_base * 2 ** min(self._failures - 1, 30))
            # Jitter: controllers (and sources) failing together do not all probe at the same instant.
            self._next_probe_at = now + backoff * (0.5 + 0.5 * self._jitter())
            if self._prober == key:
                self._prober = None
            # Tokens handed out and not spent go back: their imports now meet the open circuit and wait for the
            # probe, and a token kept would buy a call outside the rate limit once it closes.
            self._bucket.give_back(len(self._granted), now)
            self._granted.clear()
            self._waiting.add(key)
            return self._waiting - {key} if changed else set()

    def due_probe(self, now: float) -> str | None:
        """If a probe is due, the import whose next token request is the probe (the caller re-queues it)."""
        with self._lock:
            if not self._open or now < self._next_probe_at or not self._waiting:
                return None
            if self._prober is not None and now < self._probe_deadline:
                return None  # one probe at a time
            if not self._bucket.take(now):
                return None  # a probe is a call too: it spends a token, or the recovery's burst would exceed it
            self._prober = self._waiting.pop()
            self._granted[self._prober] = now
            self._probe_deadline = now + self._probe_timeout
            return self._prober

    def drain(self) -> set[str]:
        """Empty the queue (the gate is replaced): the keys that waited in it or were handed a token."""
        with self._lock:
            keys = set(self._granted)
            while (key := self._queue.pop()) is not None:
                keys.add(key)
            self._granted.clear()
            return keys

    def forget(self, key: str) -> None:
        """The import is gone, or no longer asks this source."""
        with self._lock:
            self._waiting.discard(key)
            self._queue.remove(key)
            self._granted.pop(key, None)
            self._demand -= self._rates.pop(key, 0.0)
            if self._prober == key:
                self._prober = None


class SourceGates:
    """One SourceGate per source cluster, made on first use; thread-safe."""

    def __init__(
        self,
        *,
        qps: float = DEFAULT_QPS,
        burst: int = DEFAULT_BURST,
        probe_base: float = 0.5,
        probe_max: float = 300.0,
        probe_timeout: float = 30.0,
        clock: Callable[[], float],
    ) -> None:
        self._settings = {
            "qps": qps,
            "burst": burst,
            "probe_base": probe_base,
            "probe_max": probe_max,
            "probe_timeout": probe_timeout,
        }
        self._clock = clock
        self._lock = threading.Lock()
        self._gates: dict[str, SourceGate] = {}
        self._work = threading.Event()  # a key was queued: the dispatcher looks before its next token is due

    def gate(self, cluster: str) -> SourceGate:
        with self._lock:
            gate = self._gates.get(cluster)
            if gate is None:
                gate = self._gates[cluster] = SourceGate(now=self._clock(), **self._settings)
                gate.on_queued = self._work.set
            return gate

    def reset(self, cluster: str) -> set[str]:
        """The controller's credentials for `cluster` changed: a closed circuit; return the imports to wake."""
        with self._lock:
            gate = self._gates.pop(cluster, None)
        return gate.answered("") | gate.drain() if gate is not None else set()

    def dispatch(self) -> tuple[list[str], float | None]:
        """Every source's tokens of the moment to the next keys in line; (keys to wake, when to look again)."""
        # Cleared before looking, not after the wait: a key queued while this looks, or while the dispatcher's
        # wait times out, still wakes the next wait.
        self._work.clear()
        now = self._clock()
        with self._lock:
            gates = list(self._gates.values())
        woken: list[str] = []
        next_at: float | None = None
        for gate in gates:
            keys, at = gate.dispatch(now)
            woken += keys
            if at is not None:
                next_at = at if next_at is None else min(next_at, at)
        return woken, next_at

    def wait_for_work(self, timeout: float) -> bool:
        """Sleep up to `timeout` seconds, less if a key was queued since `dispatch` last looked (then True)."""
        return self._work.wait(timeout)

    def demands(self) -> dict[str, tuple[float, float, int]]:
        """Per source: (steady-state token requests per second needed, its QPS, imports holding a token)."""
        with self._lock:
            gates = dict(self._gates)
        return {name: (rate, gate.qps, holding) for name, gate in gates.items() for rate, holding in [gate.demand()]}

    def due_probes(self) -> list[str]:
        now = self._clock()
        with self._lock:
            gates = list(self._gates.values())
        return [key for gate in gates if (key := gate.due_probe(now)) is not None]

    def forget(self, key: str) -> None:
        with self._lock:
            gates = list(self._gates.values())
        for gate in gates:
            gate.forget(key)
