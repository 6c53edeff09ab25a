"""The locust run's pass/fail judgement and load stages (loadtest/thresholds.py), and the
benchmark's open loop: it sends on schedule, never waiting for earlier answers."""

from __future__ import annotations

import asyncio

import pytest

from loadtest.bench import _open_loop
from loadtest.thresholds import Stage, Thresholds, parse_stages, stage_at


def test_thresholds_pass_within_limits() -> None:
    assert Thresholds(100, 0.01).check(requests=1000, failures=10, p99_ms=100) == []


def test_thresholds_name_every_breach() -> None:
    reasons = Thresholds(100, 0.001).check(requests=1000, failures=2, p99_ms=250)
    assert len(reasons) == 2
    assert "error rate" in reasons[0] and "p99 250 ms > 100 ms" in reasons[1]


def test_a_run_without_requests_fails_and_none_disables_a_limit() -> None:
    assert Thresholds(100, 0.001).check(0, 0, 0.0) == ["only 0 requests (need at least 1)"]
    assert Thresholds(None, None).check(10, 10, 1e9) == []


def test_stages_parse_and_select_by_run_time() -> None:
    stages = parse_stages("30:20:20, 60:200:200,120:20:200")
    assert stages[1] == Stage(60.0, 200, 200.0)
    assert stage_at(stages, 0) == stages[0]
    assert stage_at(stages, 30) == stages[1]
    assert stage_at(stages, 119.9) == stages[2]
    assert stage_at(stages, 120) is None
    assert parse_stages("") == []


@pytest.mark.parametrize("bad", ["30:10", "a:1:1", "30:10:1,20:5:1", "30:-1:1"])
def test_bad_stages_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_stages(bad)


async def test_open_loop_sends_on_schedule_without_waiting_for_answers() -> None:
    started: list[int] = []
    release = asyncio.Event()

    async def send(i: int) -> None:
        started.append(i)
        if len(started) == 3:
            release.set()  # every request went out while none had been answered
        await release.wait()
        if i == 1:
            raise RuntimeError("boom")

    result = await _open_loop(send, [0.0, 0.001, 0.002], max_in_flight=10)
    assert started == [0, 1, 2]
    assert result.errors == 1 and result.first_error == "RuntimeError('boom')"
    assert len(result.latencies_ms) == 2


async def test_open_loop_counts_requests_beyond_max_in_flight_as_errors() -> None:
    release = asyncio.Event()

    async def send(i: int) -> None:
        await release.wait()

    task = asyncio.ensure_future(_open_loop(send, [0.0, 0.0, 0.0], max_in_flight=2))
    while not task.done():
        await asyncio.sleep(0)
        release.set()
    result = task.result()
    assert result.errors == 1 and "in flight" in result.first_error
    assert len(result.latencies_ms) == 2
