"""Hedged requests: the rolling quantile, the budget, the loser's cancellation, no hedge
without another ready replica, and the route file's `hedge` key."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.api.keys import METRICS, SERVICE
from gateway.app import build_app
from gateway.backends.pool import BackendPool, PoolMember
from gateway.metrics import Metrics
from gateway.resilience.hedge import Hedger, LatencyWindow
from gateway.routing.table import RouteError, parse_route
from gateway.types import CallPolicy, Deadline, HedgeSpec, InferRequest, Tensor
from tests.unit.fake_backend import FakeBackend
from tests.unit.fakes import FEATURES, ListSink, toy_backend, write_repo

P95 = HedgeSpec(quantile=0.95, max_ratio=1.0)


def _request(spec: HedgeSpec | None = P95) -> InferRequest:
    x = np.zeros((1, 3), np.float32)
    policy = CallPolicy(route="toy", policy_version="t", hedge=spec)
    return InferRequest("toy", "2", (Tensor("features", "FP32", x),), policy=policy)


async def _poll(check: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def _pool(
    slow: FakeBackend, fast: FakeBackend, metrics: Metrics, p95_s: float = 0.01
) -> BackendPool:
    # least_in_flight with both idle: the first listed ("slow") takes every first call.
    pool = BackendPool(
        [PoolMember("slow", slow), PoolMember("fast", fast)],
        routing="least_in_flight",
        metrics=metrics,
    )
    for _ in range(480):  # the target's rolling latencies: p95 = p95_s, for 20+ more calls
        pool.hedger.record(("toy", "2"), p95_s)
    return pool


def hedges(metrics: Metrics, outcome: str) -> float:
    return metrics.registry.get_sample_value("hedges_total", {"outcome": outcome}) or 0.0


def test_latency_window_needs_samples_and_rolls() -> None:
    w = LatencyWindow(size=100, min_samples=20, every=1)
    for _ in range(19):
        w.record(0.001)
    assert w.quantile(0.95) is None
    for i in range(100):
        w.record(0.001 * (i + 1))  # 1..100 ms; the first 19 samples rolled out
    assert w.quantile(0.95) == pytest.approx(0.096)
    assert w.quantile(0.5) == pytest.approx(0.051)


async def test_a_late_call_is_hedged_and_the_stalled_loser_cancelled() -> None:
    slow, fast, metrics = toy_backend(), toy_backend(), Metrics()
    slow.hang = True
    pool = _pool(slow, fast, metrics)
    started = time.monotonic()
    resp = await pool.infer(_request(), Deadline.after(2.0))
    assert resp.model == "toy"
    assert time.monotonic() - started < 1.0  # not the 2 s the stalled call would take
    assert (len(slow.calls), len(fast.calls)) == (1, 1)
    await _poll(lambda: slow.cancelled == 1)  # the loser was cancelled, not left running
    assert hedges(metrics, "won") == 1
    await _poll(lambda: pool.members[0].in_flight == 0)


async def test_when_the_first_call_wins_the_hedge_is_cancelled() -> None:
    slow, fast, metrics = toy_backend(), toy_backend(), Metrics()
    slow.latency_s, fast.latency_s = 0.05, 1.0  # late, but still first
    pool = _pool(slow, fast, metrics)
    await pool.infer(_request(), Deadline.after(2.0))
    await _poll(lambda: fast.cancelled == 1)
    assert hedges(metrics, "lost") == 1 and hedges(metrics, "won") == 0


async def test_no_hedge_before_the_quantile_nor_without_a_spec() -> None:
    slow, fast, metrics = toy_backend(), toy_backend(), Metrics()
    slow.latency_s = 0.02
    pool = _pool(slow, fast, metrics, p95_s=0.2)
    await pool.infer(_request(), Deadline.after(2.0))  # answered before its p95
    await pool.infer(_request(None), Deadline.after(2.0))
    assert len(fast.calls) == 0


async def test_no_hedge_when_only_one_replica_is_ready() -> None:
    slow, fast, metrics = toy_backend(), toy_backend(), Metrics()
    slow.latency_s = 0.05
    pool = _pool(slow, fast, metrics)
    pool.members[1].ready = False
    assert (await pool.infer(_request(), Deadline.after(2.0))).model == "toy"
    assert len(fast.calls) == 0 and hedges(metrics, "no_replica") == 1


async def test_the_budget_caps_hedges_at_max_ratio_of_the_routes_requests() -> None:
    slow, fast, metrics = toy_backend(), toy_backend(), Metrics()
    slow.latency_s = 0.03  # every call is late
    pool = _pool(slow, fast, metrics, p95_s=0.005)
    spec = HedgeSpec(quantile=0.95, max_ratio=0.25)
    for _ in range(20):
        await pool.infer(_request(spec), Deadline.after(2.0))
    assert hedges(metrics, "won") == len(fast.calls) == 5  # 0.25 x 20
    assert hedges(metrics, "budget") == 15


async def test_hedger_both_failing_raises_the_first_error() -> None:
    hedger = Hedger()

    async def fail(msg: str, after: float) -> str:
        await asyncio.sleep(after)
        raise ValueError(msg)

    spec = HedgeSpec(quantile=None, after_ms=5, max_ratio=1.0)
    with pytest.raises(ValueError, match="first"):
        await hedger.run(
            spec,
            "r",
            "t",
            lambda: fail("first", 0.02),
            lambda: fail("second", 0.0),
            Deadline.after(1.0),
        )


def test_route_file_hedge_key_reaches_the_call_policy() -> None:
    base = "model: risk\nchampion: {target: risk, version: '2'}\n"
    r = parse_route((base + "hedge: {after: p95, max_ratio: 0.05}\n").encode(), "risk.yaml")
    assert r.policy.hedge == HedgeSpec(quantile=0.95, after_ms=None, max_ratio=0.05)
    r = parse_route((base + "hedge: {after: 40}\n").encode(), "risk.yaml")
    assert r.policy.hedge == HedgeSpec(quantile=None, after_ms=40.0, max_ratio=0.05)
    assert parse_route(base.encode(), "risk.yaml").policy.hedge is None
    for bad in ("{after: p100}", "{after: soon}", "{max_ratio: 2}", "{after: p95, x: 1}"):
        with pytest.raises(RouteError):
            parse_route((base + f"hedge: {bad}\n").encode(), "risk.yaml")


async def test_through_the_app_a_hedged_request_is_answered_and_logged_once(
    tmp_path: Path, aiohttp_client: Any
) -> None:
    settings = write_repo(tmp_path, "hedge: {after: 5, max_ratio: 1.0}\n")
    slow, fast = toy_backend(), toy_backend()
    slow.hang = True
    pool = BackendPool(
        [PoolMember("slow", slow), PoolMember("fast", fast)], routing="least_in_flight"
    )
    app = build_app(settings, backend=pool)
    sink = ListSink()
    app[SERVICE].predlog = sink
    client = await aiohttp_client(app)
    body = {"model_name": "toy", "features": [0.0] * len(FEATURES), "request_id": "r-1"}
    resp = await client.post("/v1/predict", data=io.BytesIO(json.dumps(body).encode()))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["fallback_used"] is None
    assert (len(slow.calls), len(fast.calls)) == (1, 1)
    assert [e["request_id"] for e in sink.entries] == ["r-1"]  # one answer, one log entry
    assert hedges(app[METRICS], "won") == 1
    await _poll(lambda: slow.cancelled == 1)
