"""Circuit breakers per (server, model): fail fast instead of queueing on a sick backend.

Recording outcomes (`record_success`, `record_failure`) is kept apart from deciding: the
breaker keeps a rolling window of outcomes and asks its `BreakerPolicy` whether that window
trips it. States: CLOSED (calls flow) -> OPEN (fail fast) after `open_s` -> HALF_OPEN (a few
probe calls) -> CLOSED when the probes succeed, or OPEN again on a probe failure.

Every call holds a `Permit` from `acquire` and hands it back with its outcome. The permit
says whether the call is a probe of the current half-open period: a slow call admitted
before the breaker opened that finishes during half-open counts in the window, but neither
frees a probe slot, nor closes the breaker, nor re-opens it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from gateway.clock import Clock, monotonic
from gateway.errors import CircuitOpen

__all__ = ["BreakerPolicy", "BreakerState", "CircuitBreaker", "CircuitOpen", "Permit"]


class BreakerState(IntEnum):
    """Values are what the `breaker_state` gauge exports."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(frozen=True, slots=True)
class WindowStats:
    calls: int
    failures: int
    consecutive_failures: int

    @property
    def failure_rate(self) -> float:
        return self.failures / self.calls if self.calls else 0.0


@dataclass(frozen=True, slots=True)
class Permit:
    """One call's permission: a half-open probe of state period `epoch`, or not a probe."""

    epoch: int
    probe: bool


_NOT_A_PROBE = Permit(-1, probe=False)  # every call admitted while CLOSED: nothing to match


@dataclass(frozen=True)
class BreakerPolicy:
    """When a breaker opens and how it recovers. Slow calls count as failures."""

    window_s: float = 10.0  # rolling, time-based window of outcomes
    min_calls: int = 20  # no failure-rate decision below this volume
    failure_rate: float = 0.5  # open at this share of failures in the window...
    consecutive_failures: int = 5  # ...or after this many failures in a row
    open_s: float = 2.0  # fail fast this long before probing
    half_open_probes: int = 3  # probes in flight at once; this many successes close it
    slow_call_s: float = 1.0  # a success slower than this is recorded as a failure
    #: A timeout counts as a failure only if the attempt had at least this long (or the
    #: route's SLO p99, when larger): a client's own short deadline must not open a breaker
    #: that every client shares.
    min_timeout_floor_s: float = 0.05

    def trips(self, stats: WindowStats) -> bool:
        if stats.consecutive_failures >= self.consecutive_failures:
            return True
        return stats.calls >= self.min_calls and stats.failure_rate >= self.failure_rate


class CircuitBreaker:
    def __init__(
        self,
        policy: BreakerPolicy,
        clock: Clock = monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.on_change = on_change
        self._state = BreakerState.CLOSED
        self._outcomes: deque[tuple[float, bool]] = deque()  # (time, failed)
        self._failures = 0
        self._consecutive = 0
        self._opened_at = 0.0
        self._probes_in_flight = 0
        self._probe_successes = 0
        self._epoch = 0  # bumped on every state change; probes from older epochs are stale

    @property
    def state(self) -> BreakerState:
        """The current state; an OPEN breaker whose cool-down is over reads HALF_OPEN."""
        if (
            self._state is BreakerState.OPEN
            and self.clock() - self._opened_at >= self.policy.open_s
        ):
            self._set(BreakerState.HALF_OPEN)
        return self._state

    def available(self) -> bool:
        """Whether `acquire` would let a call through now (takes nothing)."""
        state = self.state
        if state is BreakerState.HALF_OPEN:
            return self._probes_in_flight < self.policy.half_open_probes
        return state is BreakerState.CLOSED

    def acquire(self) -> Permit | None:
        """Permission for one call, or None; in HALF_OPEN this takes one of the probe slots.

        Every permit must come back in exactly one record_success/record_failure/abandon.
        """
        if not self.available():
            return None
        if self._state is BreakerState.HALF_OPEN:
            self._probes_in_flight += 1
            return Permit(self._epoch, probe=True)
        return _NOT_A_PROBE

    def record_success(self, permit: Permit, elapsed_s: float = 0.0) -> None:
        if elapsed_s > self.policy.slow_call_s:
            self.record_failure(permit)
            return
        self._consecutive = 0
        self._push(failed=False)
        if self._end_probe(permit):
            self._probe_successes += 1
            if self._probe_successes >= self.policy.half_open_probes:
                self._close()

    def record_failure(self, permit: Permit) -> None:
        self._consecutive += 1
        self._push(failed=True)
        if self._end_probe(permit):
            self._open()  # one failed probe re-opens a half-open breaker
        elif self._state is BreakerState.CLOSED and self.policy.trips(self.stats()):
            self._open()

    def abandon(self, permit: Permit) -> None:
        """The call was cancelled before an outcome: give back its probe slot, record nothing."""
        self._end_probe(permit)

    def force_open(self) -> None:
        """Open now, whatever the window says: the server failed its health check."""
        if self._state is not BreakerState.OPEN:
            self._open()

    def stats(self) -> WindowStats:
        self._prune()
        return WindowStats(len(self._outcomes), self._failures, self._consecutive)

    # -- internals -------------------------------------------------------------------------
    def _push(self, failed: bool) -> None:
        self._outcomes.append((self.clock(), failed))
        self._failures += failed
        self._prune()

    def _prune(self) -> None:
        horizon = self.clock() - self.policy.window_s
        while self._outcomes and self._outcomes[0][0] < horizon:
            _, failed = self._outcomes.popleft()
            self._failures -= failed

    def _end_probe(self, permit: Permit) -> bool:
        """Free the permit's probe slot; True when it was a probe of the current period."""
        if permit.probe and permit.epoch == self._epoch and self._probes_in_flight:
            self._probes_in_flight -= 1
            return True
        return False

    def _open(self) -> None:
        self._opened_at = self.clock()
        self._probe_successes = 0
        self._set(BreakerState.OPEN)

    def _close(self) -> None:
        # A fresh window: the failures that opened the breaker must not re-open it at once.
        self._outcomes.clear()
        self._failures = 0
        self._consecutive = 0
        self._probe_successes = 0
        self._set(BreakerState.CLOSED)

    def _set(self, state: BreakerState) -> None:
        if state is not self._state:
            self._state = state
            self._epoch += 1
            self._probes_in_flight = 0
            if self.on_change is not None:
                self.on_change(state)
