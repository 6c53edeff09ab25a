"""loadtest/floor.py, the framework's floor the benchmark measures the gateway against: it
answers the benchmark's own bodies, its tick modes are the gateway's own Coalescer, which
merges the rows of one loop iteration (a recording stand-in for Triton; the Triton modes run
against a real Triton only in the benchmark)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from gateway.batching import Coalescer
from gateway.clock import monotonic
from gateway.tensors import Tensor
from gateway.types import Deadline, InferRequest, InferResponse
from loadtest.bench import http_bodies
from loadtest.floor import TICK, build, layer


class Recorder:
    """Stands in for Triton under the floor's Coalescer: a score per row (the row's sum)."""

    def __init__(self) -> None:
        self.calls: list[np.ndarray] = []

    async def infer(self, request: InferRequest, deadline: Deadline) -> InferResponse:
        rows = request.inputs[0].data
        self.calls.append(rows)
        await asyncio.sleep(0)
        score = Tensor("score", "FP32", rows.sum(axis=1, keepdims=True))
        return InferResponse(request.model, request.version, {"score": score})


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


async def test_tick_mode_is_the_gateways_coalescer_merging_one_iteration() -> None:
    path, backend = layer("tick", "127.0.0.1:1", "")
    assert isinstance(path, Coalescer) and path.policy.tick_window and backend.http is None
    await backend.close()
    triton = Recorder()
    merger = Coalescer(TICK, triton)
    rows = [np.full((1, 3), i, dtype=np.float32) for i in range(4)]
    answers = await asyncio.gather(*(
        merger.infer(InferRequest("risk", "2", (Tensor("features", "FP32", r),), ("score",),
                                  batchable=True), Deadline.after(5.0, monotonic))
        for r in rows))  # fmt: skip
    assert [len(c) for c in triton.calls] == [4]
    assert [float(a.outputs["score"].data[0, 0]) for a in answers] == [0.0, 3.0, 6.0, 9.0]


async def test_http_modes_use_the_gateways_http_transport() -> None:
    path, backend = layer("http-tick", "127.0.0.1:1", "http://127.0.0.1:2")
    assert isinstance(path, Coalescer) and path.inner is backend
    assert backend.http is not None and (backend.http.host, backend.http.port) == ("127.0.0.1", 2)
    await backend.close()
