"""The breaker state machine, driven by a fake clock (no sleeps)."""

from __future__ import annotations

from gateway.clock import FakeClock
from gateway.resilience.breaker import BreakerPolicy, BreakerState, CircuitBreaker, WindowStats

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


def test_opens_after_consecutive_failures_and_fails_fast() -> None:
    clock = FakeClock()
    changes: list[BreakerState] = []
    b = breaker(clock, changes)
    for _ in range(3):
        assert b.acquire()
        b.record_failure()
    assert b.state is BreakerState.CLOSED
    assert b.acquire()
    b.record_failure()
    assert b.state is BreakerState.OPEN
    assert changes == [BreakerState.OPEN]
    assert not b.acquire()


def test_success_resets_the_consecutive_count() -> None:
    b = breaker(FakeClock())
    for _ in range(3):
        b.record_failure()
    b.record_success(0.01)
    for _ in range(3):
        b.record_failure()
    assert b.state is BreakerState.CLOSED


def test_failure_rate_needs_minimum_volume() -> None:
    clock = FakeClock()
    b = breaker(clock)
    # alternate: never 4 in a row; 50 % failures, but below min_calls for the first 9
    for i in range(9):
        if i % 2 == 0:
            b.record_failure()
        else:
            b.record_success(0.01)
    assert b.state is BreakerState.CLOSED
    b.record_success(0.01)  # 10 calls, 5 failures: rate 0.5 but the last was a success
    assert b.state is BreakerState.CLOSED
    b.record_failure()  # 11 calls, 6 failures
    assert b.state is BreakerState.OPEN


def test_old_outcomes_leave_the_window() -> None:
    clock = FakeClock()
    b = breaker(clock)
    for _ in range(3):
        b.record_failure()
        b.record_success(0.01)
    clock.advance(11)
    assert b.stats() == WindowStats(calls=0, failures=0, consecutive_failures=0)


def test_slow_success_counts_as_failure() -> None:
    b = breaker(FakeClock())
    for _ in range(4):
        b.record_success(0.6)
    assert b.state is BreakerState.OPEN


def test_half_open_limits_probes_and_closes_on_success() -> None:
    clock = FakeClock()
    changes: list[BreakerState] = []
    b = breaker(clock, changes)
    for _ in range(4):
        b.record_failure()
    clock.advance(1.9)
    assert not b.acquire()
    clock.advance(0.2)
    assert b.state is BreakerState.HALF_OPEN
    assert b.acquire() and b.acquire()
    assert not b.acquire()  # only half_open_probes at once
    b.record_success(0.01)
    assert b.state is BreakerState.HALF_OPEN
    assert b.acquire()  # a probe slot came back
    b.record_success(0.01)
    assert b.state is BreakerState.CLOSED
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]
    # the failures that opened it do not count against the closed breaker
    b.record_failure()
    assert b.state is BreakerState.CLOSED


def test_failed_probe_reopens_for_a_full_cool_down() -> None:
    clock = FakeClock()
    b = breaker(clock)
    for _ in range(4):
        b.record_failure()
    clock.advance(2.0)
    assert b.acquire()
    b.record_failure()
    assert b.state is BreakerState.OPEN
    clock.advance(1.0)
    assert not b.acquire()
    clock.advance(1.0)
    assert b.acquire()


def test_abandoned_probe_gives_its_slot_back() -> None:
    clock = FakeClock()
    b = breaker(clock)
    for _ in range(4):
        b.record_failure()
    clock.advance(2.0)
    assert b.acquire() and b.acquire() and not b.acquire()
    b.abandon()
    assert b.acquire()
    assert b.state is BreakerState.HALF_OPEN


def test_policy_decides_from_window_stats_alone() -> None:
    assert POLICY.trips(WindowStats(calls=3, failures=3, consecutive_failures=4))
    assert not POLICY.trips(WindowStats(calls=9, failures=9, consecutive_failures=3))
    assert POLICY.trips(WindowStats(calls=10, failures=5, consecutive_failures=0))
    assert not POLICY.trips(WindowStats(calls=10, failures=4, consecutive_failures=0))
