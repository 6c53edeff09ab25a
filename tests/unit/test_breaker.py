"""The breaker state machine, driven by a fake clock (no sleeps)."""

from __future__ import annotations

from gateway.clock import FakeClock
from gateway.resilience.breaker import (
    BreakerPolicy,
    BreakerState,
    CircuitBreaker,
    Permit,
    WindowStats,
)

POLICY = BreakerPolicy(
    window_s=10,
    min_calls=10,
    failure_rate=0.5,
    consecutive_failures=4,
    open_s=2.0,
    half_open_probes=2,
    slow_call_s=0.5,
)


def breaker(clock: FakeClock, changes: list[BreakerState] | None = None) -> CircuitBreaker:
    return CircuitBreaker(POLICY, clock, on_change=changes.append if changes is not None else None)


def call(b: CircuitBreaker) -> Permit:
    """Start one call: the breaker must let it through."""
    permit = b.acquire()
    assert permit is not None
    return permit


def test_opens_after_consecutive_failures_and_fails_fast() -> None:
    clock = FakeClock()
    changes: list[BreakerState] = []
    b = breaker(clock, changes)
    for _ in range(3):
        b.record_failure(call(b))
    assert b.state is BreakerState.CLOSED
    b.record_failure(call(b))
    assert b.state is BreakerState.OPEN
    assert changes == [BreakerState.OPEN]
    assert b.acquire() is None


def test_success_resets_the_consecutive_count() -> None:
    b = breaker(FakeClock())
    for _ in range(3):
        b.record_failure(call(b))
    b.record_success(call(b), 0.01)
    for _ in range(3):
        b.record_failure(call(b))
    assert b.state is BreakerState.CLOSED


def test_failure_rate_needs_minimum_volume() -> None:
    clock = FakeClock()
    b = breaker(clock)
    # alternate: never 4 in a row; 50 % failures, but below min_calls for the first 9
    for i in range(9):
        if i % 2 == 0:
            b.record_failure(call(b))
        else:
            b.record_success(call(b), 0.01)
    assert b.state is BreakerState.CLOSED
    b.record_success(call(b), 0.01)  # 10 calls, 5 failures: rate 0.5 but the last was a success
    assert b.state is BreakerState.CLOSED
    b.record_failure(call(b))  # 11 calls, 6 failures
    assert b.state is BreakerState.OPEN


def test_old_outcomes_leave_the_window() -> None:
    clock = FakeClock()
    b = breaker(clock)
    for _ in range(3):
        b.record_failure(call(b))
        b.record_success(call(b), 0.01)
    clock.advance(11)
    assert b.stats() == WindowStats(calls=0, failures=0, consecutive_failures=0)


def test_slow_success_counts_as_failure() -> None:
    b = breaker(FakeClock())
    for _ in range(4):
        b.record_success(call(b), 0.6)
    assert b.state is BreakerState.OPEN


def open_breaker(clock: FakeClock, changes: list[BreakerState] | None = None) -> CircuitBreaker:
    b = breaker(clock, changes)
    for _ in range(4):
        b.record_failure(call(b))
    assert b.state is BreakerState.OPEN
    return b


def test_half_open_limits_probes_and_closes_on_success() -> None:
    clock = FakeClock()
    changes: list[BreakerState] = []
    b = open_breaker(clock, changes)
    clock.advance(1.9)
    assert b.acquire() is None
    clock.advance(0.2)
    assert b.state is BreakerState.HALF_OPEN
    p1, p2 = call(b), call(b)
    assert p1.probe and p2.probe
    assert b.acquire() is None  # only half_open_probes at once
    b.record_success(p1, 0.01)
    assert b.state is BreakerState.HALF_OPEN
    p3 = call(b)  # a probe slot came back
    b.record_success(p2, 0.01)
    b.record_success(p3, 0.01)
    assert b.state is BreakerState.CLOSED
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]
    # the failures that opened it do not count against the closed breaker
    b.record_failure(call(b))
    assert b.state is BreakerState.CLOSED


def test_failed_probe_reopens_for_a_full_cool_down() -> None:
    clock = FakeClock()
    b = open_breaker(clock)
    clock.advance(2.0)
    b.record_failure(call(b))
    assert b.state is BreakerState.OPEN
    clock.advance(1.0)
    assert b.acquire() is None
    clock.advance(1.0)
    assert b.acquire() is not None


def test_abandoned_probe_gives_its_slot_back() -> None:
    clock = FakeClock()
    b = open_breaker(clock)
    clock.advance(2.0)
    p1, _ = call(b), call(b)
    assert b.acquire() is None
    b.abandon(p1)
    assert b.acquire() is not None
    assert b.state is BreakerState.HALF_OPEN


def test_calls_admitted_before_opening_are_not_probes() -> None:
    """Stragglers from the closed period that finish during half-open count in the window,
    but they neither free probe slots (no extra probes), nor close, nor re-open the breaker."""
    clock = FakeClock()
    b = breaker(clock)
    stragglers = [call(b) for _ in range(6)]  # slow calls in flight while it trips
    for _ in range(4):
        b.record_failure(call(b))
    clock.advance(2.0)
    assert b.state is BreakerState.HALF_OPEN
    probes = [call(b), call(b)]
    assert b.acquire() is None
    for p in stragglers[:3]:
        b.record_success(p, 0.01)
    assert b.state is BreakerState.HALF_OPEN  # three successes, none of them a probe
    assert b.acquire() is None  # and no probe slot freed: still 2 probes at most
    b.record_failure(stragglers[3])
    assert b.state is BreakerState.HALF_OPEN  # an old failure says nothing of the server now
    b.abandon(stragglers[4])
    assert b.acquire() is None
    for p in probes:
        b.record_success(p, 0.01)
    assert b.state is BreakerState.CLOSED
    b.record_success(stragglers[5], 0.01)
    assert b.state is BreakerState.CLOSED


def test_a_late_probe_of_an_earlier_half_open_period_is_stale() -> None:
    clock = FakeClock()
    b = open_breaker(clock)
    clock.advance(2.0)
    first, second = call(b), call(b)
    b.record_failure(first)  # re-opens; `second` is still in flight
    clock.advance(2.0)
    assert b.state is BreakerState.HALF_OPEN
    fresh = call(b)
    b.record_success(second, 0.01)  # from the previous half-open period: not a probe now
    assert b.acquire() is not None  # 2 slots: `fresh` and this one
    assert b.acquire() is None
    b.record_success(fresh, 0.01)
    assert b.state is BreakerState.HALF_OPEN


def test_policy_decides_from_window_stats_alone() -> None:
    assert POLICY.trips(WindowStats(calls=3, failures=3, consecutive_failures=4))
    assert not POLICY.trips(WindowStats(calls=9, failures=9, consecutive_failures=3))
    assert POLICY.trips(WindowStats(calls=10, failures=5, consecutive_failures=0))
    assert not POLICY.trips(WindowStats(calls=10, failures=4, consecutive_failures=0))
