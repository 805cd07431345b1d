"""Per source cluster: a client-side rate limit and a circuit breaker, so no failure turns into a storm.

- The rate limit is a token bucket (QPS and burst, as client-go's). A request that may not go yet gets a
  reservation: its import is re-queued for that moment, so waiting costs neither a thread nor a retry.
- The circuit opens when the source does not answer (or rejects the controller's own credential). While it is
  open, the source's imports wait without calls, and one probe at a time tests the source, after an
  exponential backoff with jitter. The first answer closes it and wakes the waiting imports, which then go
  through the rate limit: recovery is bounded too.

Time is passed in, so every rule here is tested with plain numbers.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass

# client-go's defaults for a client (rest.Config QPS 5, Burst 10).
DEFAULT_QPS = 5.0
DEFAULT_BURST = 10


@dataclass(frozen=True)
class Go:
    """Make the call now."""


@dataclass(frozen=True)
class Wait:
    """Do not call. `until`: look again then (a rate-limit slot, or a probe); None: wait to be woken."""

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

    def reserve(self, now: float) -> float:
        """Take one token; return when its call may go (now, or later if the bucket is empty)."""
        if now > self._last:
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.qps)
            self._last = now
        self._tokens -= 1
        return now if self._tokens >= 0 else self._last + (-self._tokens) / self.qps


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
        self._reservations: dict[str, float] = {}
        self._open = False
        self._reason: str | None = None
        self._message: str | None = None
        self._failures = 0
        self._next_probe_at = 0.0
        self._prober: str | None = None
        self._probe_deadline = 0.0
        self._waiting: set[str] = set()

    @property
    def is_open(self) -> bool:
        return self._open

    def admit(self, key: str, now: float) -> Admission:
        """May `key` call the source now? Every call to the source asks first."""
        with self._lock:
            if self._open and key != self._prober:
                self._waiting.add(key)
                return Wait(None, self._reason, self._message)
            at = self._reservations.pop(key, None)
            if at is None:
                at = self._bucket.reserve(now)
            if at > now:
                self._reservations[key] = at
                return Wait(at)
            return Go()

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
            self._waiting.add(key)
            return self._waiting - {key} if changed else set()

    def due_probe(self, now: float) -> str | None:
        """If a probe is due, the import whose next token request is the probe (the caller re-queues it)."""
        with self._lock:
            if not self._open or now < self._next_probe_at or not self._waiting:
                return None
            if self._prober is not None and now < self._probe_deadline:
                return None  # one probe at a time
            self._prober = self._waiting.pop()
            self._probe_deadline = now + self._probe_timeout
            return self._prober

    def forget(self, key: str) -> None:
        """The import is gone, or no longer asks this source."""
        with self._lock:
            self._reservations.pop(key, None)
            self._waiting.discard(key)
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

    def gate(self, cluster: str) -> SourceGate:
        with self._lock:
            gate = self._gates.get(cluster)
            if gate is None:
                gate = self._gates[cluster] = SourceGate(now=self._clock(), **self._settings)
            return gate

    def reset(self, cluster: str) -> set[str]:
        """The controller's credentials for `cluster` changed: a closed circuit; return the imports to wake."""
        with self._lock:
            gate = self._gates.pop(cluster, None)
        return gate.answered("") if gate is not None else set()

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
