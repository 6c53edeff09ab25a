"""loadtest/floor.py, the framework's floor the benchmark measures the gateway against: it
answers the benchmark's own bodies, and its tick mode really merges the rows of one loop
iteration (a recording stand-in for Triton; the grpc modes run against a real Triton only in
the benchmark)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from loadtest.bench import http_bodies
from loadtest.floor import TickMerger, build


class Recorder:
    """Stands in for the Triton client: a score per row (the row's sum), every call's rows."""

    def __init__(self) -> None:
        self.calls: list[np.ndarray] = []

    async def call(self, model: str, version: str, rows: np.ndarray) -> np.ndarray:
        self.calls.append(rows)
        await asyncio.sleep(0)
        return rows.sum(axis=1)


@pytest.mark.parametrize("target", ["gateway-v2", "gateway-v1"])
async def test_bare_mode_answers_the_benchmark_bodies(
    target: str, aiohttp_client: Callable[..., Awaitable[Any]]
) -> None:
    client = await aiohttp_client(build("bare", "unused:0"))
    path = "/v2/models/risk/versions/2/infer" if target.endswith("v2") else "/v1/predict"
    body = http_bodies(target, np.ones((1, 30), dtype=np.float32))[0]
    resp = await client.post(path, data=body)
    assert resp.status == 200
    assert json.loads(await resp.read())["outputs"][0]["name"] == "score"


async def test_tick_mode_merges_the_rows_of_one_iteration_and_maps_them_back() -> None:
    triton = Recorder()
    merger = TickMerger(triton)  # type: ignore[arg-type]
    rows = [np.full((1, 3), i, dtype=np.float32) for i in range(4)]
    scores = await asyncio.gather(*(merger.call("risk", "2", r) for r in rows))
    assert [len(c) for c in triton.calls] == [4]
    assert [float(s[0]) for s in scores] == [0.0, 3.0, 6.0, 9.0]
