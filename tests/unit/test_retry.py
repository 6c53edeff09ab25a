"""Retries: which errors, how many, the global budget, the deadline, another server."""

from __future__ import annotations

import random

import numpy as np
import pytest

from gateway.backends.base import InferRequest
from gateway.backends.pool import BackendPool, NoReadyServer, PoolMember
from gateway.clock import FakeClock
from gateway.errors import BackendUnavailable, ClientError, DeadlineExceeded
from gateway.resilience.breaker import BreakerPolicy, BreakerState, CircuitOpen
from gateway.resilience.retry import Retrier, RetryBudget, RetryPolicy
from gateway.tensors import Tensor
from gateway.types import Deadline
from tests.unit.fake_backend import FakeBackend
from tests.unit.fakes import toy_backend

NO_WAIT = RetryPolicy(max_attempts=3, backoff_base_s=0.0, backoff_max_s=0.0)


def generous_budget(clock: FakeClock) -> RetryBudget:
    budget = RetryBudget(ratio=0.1, window_s=10, clock=clock)
    for _ in range(1000):
        budget.record_request()
    return budget


def failing(exc: Exception, calls: list[int], succeed_on: int | None = None):
    async def attempt(n: int) -> str:
        calls.append(n)
        if succeed_on is not None and n >= succeed_on:
            return "ok"
        raise exc

    return attempt


async def test_unavailable_is_retried_up_to_max_attempts() -> None:
    clock = FakeClock()
    retrier = Retrier(NO_WAIT, generous_budget(clock))
    calls: list[int] = []
    with pytest.raises(BackendUnavailable):
        await retrier.call(failing(BackendUnavailable("down"), calls), Deadline.after(1, clock))
    assert calls == [1, 2, 3]


async def test_success_on_a_later_attempt_is_returned() -> None:
    clock = FakeClock()
    calls: list[int] = []
    retrier = Retrier(NO_WAIT, generous_budget(clock))
    result = await retrier.call(
        failing(BackendUnavailable("down"), calls, succeed_on=2), Deadline.after(1, clock)
    )
    assert result == "ok" and calls == [1, 2]


@pytest.mark.parametrize(
    "exc",
    [CircuitOpen("open"), NoReadyServer("none"), ClientError("bad"), DeadlineExceeded("late")],
)
async def test_other_errors_are_not_retried(exc: Exception) -> None:
    clock = FakeClock()
    calls: list[int] = []
    with pytest.raises(type(exc)):
        await Retrier(NO_WAIT, generous_budget(clock)).call(
            failing(exc, calls), Deadline.after(1, clock)
        )
    assert calls == [1]


async def test_budget_caps_retries_at_ten_percent_of_requests() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.1, window_s=10, clock=clock)
    retrier = Retrier(NO_WAIT, budget)
    calls: list[int] = []
    for _ in range(200):
        with pytest.raises(BackendUnavailable):
            await retrier.call(failing(BackendUnavailable("down"), calls), Deadline.after(1, clock))
    requests, retries = budget.counts()
    assert requests == 200
    assert retries <= 20 and retries >= 18  # the budget, not max_attempts, is the bound
    assert len(calls) == 200 + retries


async def test_budget_window_slides() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.1, window_s=10, clock=clock)
    for _ in range(10):
        budget.record_request()
    assert budget.try_spend()
    assert not budget.try_spend()
    clock.advance(11)  # everything aged out: no requests, so no retries allowed
    assert budget.counts() == (0, 0)
    assert not budget.try_spend()


async def test_budget_floor_lets_a_quiet_service_retry() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.1, window_s=10, clock=clock, min_per_s=0.5)  # 5 per window
    retrier = Retrier(NO_WAIT, budget)
    calls: list[int] = []
    result = await retrier.call(
        failing(BackendUnavailable("reset"), calls, succeed_on=2), Deadline.after(1, clock)
    )
    assert result == "ok" and calls == [1, 2]  # one request in the window, still retried
    assert [budget.try_spend() for _ in range(5)] == [True] * 4 + [False]  # floor: 5 in all
    for _ in range(20):
        budget.record_request()
    assert budget.try_spend() and budget.try_spend()  # + 10 % of 21 requests
    assert not budget.try_spend()
    clock.advance(11)
    assert budget.counts() == (0, 0)
    assert budget.try_spend()  # a new window, a new floor


def test_pool_budget_takes_the_policy_floor() -> None:
    from gateway.backends.pool import BackendPool, PoolMember
    from tests.unit.fake_backend import FakeBackend

    policy = RetryPolicy(budget_window_s=10, budget_min_retries_per_s=2)
    pool = BackendPool([PoolMember("a", FakeBackend([]))], retry_policy=policy)
    assert pool.retrier.budget.floor == 20


async def test_no_retry_when_the_deadline_is_nearly_spent() -> None:
    clock = FakeClock()
    calls: list[int] = []
    deadline = Deadline.after(0.004, clock)  # below min_attempt_s
    with pytest.raises(BackendUnavailable):
        await Retrier(NO_WAIT, generous_budget(clock)).call(
            failing(BackendUnavailable("down"), calls), deadline
        )
    assert calls == [1]


def test_backoff_is_jittered_exponential_and_capped() -> None:
    policy = RetryPolicy(backoff_base_s=0.01, backoff_max_s=0.03)
    rng = random.Random(7)
    for attempt, cap in ((1, 0.01), (2, 0.02), (3, 0.03), (6, 0.03)):
        waits = [policy.backoff(attempt, rng) for _ in range(200)]
        assert all(0 <= w <= cap for w in waits)
        assert max(waits) > cap * 0.8 and min(waits) < cap * 0.2  # full jitter


def _request() -> InferRequest:
    x = np.zeros((1, 3), dtype=np.float32)
    return InferRequest("toy", "2", (Tensor("features", "FP32", x),))


async def test_pool_retries_on_another_ready_server() -> None:
    clock = FakeClock()
    bad, good = toy_backend(), toy_backend()
    bad.fail_with = BackendUnavailable("connection refused")
    pool = BackendPool(
        [PoolMember("a", bad), PoolMember("b", good)],
        retrier=Retrier(NO_WAIT, generous_budget(clock)),
        clock=clock,
    )
    # both idle: "a" (listed first) is tried first, the retry goes to "b"
    resp = await pool.infer(_request(), Deadline.after(1.0))
    assert resp.model == "toy"
    assert (len(bad.calls), len(good.calls)) == (1, 1)


async def test_pool_picks_least_in_flight_and_skips_unready_and_open() -> None:
    clock = FakeClock()
    a, b = toy_backend(), toy_backend()
    pool = BackendPool(
        [PoolMember("a", a), PoolMember("b", b)],
        breaker_policy=BreakerPolicy(consecutive_failures=1),
        retrier=Retrier(NO_WAIT, generous_budget(clock)),
        clock=clock,
    )
    pool.members[0].in_flight = 5  # "a" is busy
    await pool.infer(_request(), Deadline.after(1.0))
    assert (len(a.calls), len(b.calls)) == (0, 1)
    pool.members[0].in_flight = 0
    pool.members[1].ready = False
    await pool.infer(_request(), Deadline.after(1.0))
    assert (len(a.calls), len(b.calls)) == (1, 1)
    a.fail_with = BackendUnavailable("down")
    with pytest.raises(BackendUnavailable):
        await pool.infer(_request(), Deadline.after(1.0))  # opens a's breaker (b is unready)
    with pytest.raises(CircuitOpen):
        await pool.infer(_request(), Deadline.after(1.0))
    pool.members[0].ready = False
    with pytest.raises(NoReadyServer):
        await pool.infer(_request(), Deadline.after(1.0))


async def test_pool_health_check_drops_and_restores_a_server() -> None:
    a, b = toy_backend(), FakeBackend([], name="b")
    pool = BackendPool([PoolMember("a", a), PoolMember("b", b)])
    await pool.infer(
        _request(), Deadline.after(1.0)
    )  # "b" is unready, so only its breaker for toy exists
    breaker_b = pool.breaker(pool.members[1], "toy")
    b.fail_with = BackendUnavailable("gone")
    assert await pool.check_health(0.1) == {"a": True, "b": False}
    assert breaker_b.state is BreakerState.OPEN  # the breaker agrees with the health check
    b.fail_with = None
    assert await pool.check_health(0.1) == {"a": True, "b": True}
