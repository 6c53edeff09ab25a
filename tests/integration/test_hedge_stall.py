"""Hedging against a stalled replica: two real tritonservers, one SIGSTOPped mid-run.

The same load (4 callers, 0.5 s deadline) goes through a pool without hedging and through
one with the route's ``hedge: {after: p95}``, in the same run against the same stopped
server. Without hedging, every call that lands on the stopped server waits out its
deadline until the breaker opens; with it, such a call is duplicated on the other server
once the rolling p95 passes, so the tail stays near p95 plus one call.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.backends.pool import BackendPool, PoolMember
from gateway.backends.triton import TritonBackend
from gateway.errors import SwitchyardError
from gateway.metrics import Metrics
from gateway.types import CallPolicy, Deadline, HedgeSpec, InferRequest, Tensor

pytestmark = pytest.mark.slow

DEADLINE_S = 0.5
CALLERS = 4
CALLS = 80


def _request(i: int, hedge: HedgeSpec | None) -> InferRequest:
    rows = np.full((1, 30), float(i % 7), dtype=np.float32)
    policy = CallPolicy(route="risk", policy_version="test", hedge=hedge)
    return InferRequest("risk", "", (Tensor("features", "FP32", rows),), policy=policy)


def _pool(a: Any, b: Any, metrics: Metrics) -> BackendPool:
    # No load scraping: what rescues the stalled calls here is hedging alone.
    return BackendPool(
        [
            PoolMember("a", TritonBackend(a.grpc_url, name="a")),
            PoolMember("b", TritonBackend(b.grpc_url, name="b")),
        ],
        metrics=metrics,
    )


async def _run(pool: BackendPool, hedge: HedgeSpec | None, calls: int) -> list[float]:
    """Per call, seconds to its answer or its failure (a failure counts at its time)."""
    latencies: list[float] = []
    queue = list(range(calls))

    async def caller() -> None:
        while queue:
            i = queue.pop()
            started = time.monotonic()
            with contextlib.suppress(SwitchyardError):  # a failure counts at its time
                await pool.infer(_request(i, hedge), Deadline.after(DEADLINE_S))
            latencies.append(time.monotonic() - started)

    await asyncio.gather(*(caller() for _ in range(CALLERS)))
    return latencies


def p99(xs: list[float]) -> float:
    return float(np.percentile(xs, 99))


async def test_hedged_p99_stays_far_below_a_stalled_replica(
    triton_factory: Any, repo_root: Path
) -> None:
    repo = repo_root / "model_repository"
    a = triton_factory(repo, model_control_mode="explicit", load_models=("risk",))
    b = triton_factory(repo, model_control_mode="explicit", load_models=("risk",))
    spec = HedgeSpec(quantile=0.95, max_ratio=1.0)
    metrics = Metrics()
    plain, hedged = _pool(a, b, metrics), _pool(a, b, metrics)
    try:
        for pool, h in ((plain, None), (hedged, spec)):  # warm: connections, p95 window
            warm = await _run(pool, h, 60)
            assert max(warm) < DEADLINE_S
        os.killpg(a.pid, signal.SIGSTOP)  # a stalls: accepts connections, answers nothing
        try:
            without = await _run(plain, None, CALLS)
            with_hedge = await _run(hedged, spec, CALLS)
        finally:
            os.killpg(a.pid, signal.SIGCONT)
    finally:
        await plain.close()
        await hedged.close()
    won = metrics.registry.get_sample_value("hedges_total", {"outcome": "won"}) or 0.0
    print(  # the figures docs/benchmarks.md quotes
        f"stalled replica: p99 without hedging {p99(without) * 1e3:.0f} ms, "
        f"with {p99(with_hedge) * 1e3:.0f} ms; hedges won {won:.0f}"
    )
    assert p99(without) >= 0.9 * DEADLINE_S  # calls on the stopped server wait it out
    assert p99(with_hedge) < DEADLINE_S / 4, sorted(with_hedge)[-5:]
    assert won >= 1
