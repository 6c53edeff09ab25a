"""/v2 single-row infer requests for one target share backend calls (the coalescer), and
each caller gets its own row back: the same merging /v1/predict gets (issue 15, lever 2)."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest

from gateway.app import build_app
from gateway.batching import BatchingPolicy
from tests.unit.fakes import toy_backend, write_repo


async def test_concurrent_single_row_v2_calls_are_merged_and_split_back(
    tmp_path: Path, aiohttp_client
) -> None:
    settings = write_repo(tmp_path)
    settings = dataclasses.replace(settings, batching=BatchingPolicy(max_in_flight_per_target=1))
    backend = toy_backend()
    backend.latency_s = 0.05  # the first call is in flight while the others arrive
    client = await aiohttp_client(build_app(settings, backend=backend))
    rows = [[float(i), 0.5, -1.0] for i in range(8)]

    async def one(row: list[float]) -> dict:
        body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 3],
                            "data": row}]}  # fmt: skip
        resp = await client.post(
            "/v2/models/toy/versions/2/infer",
            data=io.BytesIO(json.dumps(body).encode()),
            headers={"X-Deadline-Ms": "10000"},
        )
        assert resp.status == 200
        return await resp.json()

    answers = await asyncio.gather(*(one(r) for r in rows))
    for row, answer in zip(rows, answers, strict=True):
        score = next(o for o in answer["outputs"] if o["name"] == "score")
        assert score["shape"] == [1, 1]
        assert score["data"][0] == pytest.approx(1 / (1 + np.exp(-sum(row))), rel=1e-6)
    calls = [c for c in backend.calls if c.request_id != "warm-probe"]
    assert len(calls) < len(rows)  # merged: fewer backend calls than requests
    assert max(len(c.inputs[0].data) for c in calls) > 1
    assert sum(len(c.inputs[0].data) for c in calls) == len(rows)
