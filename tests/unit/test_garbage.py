"""The request path frees what a request allocated by reference counting alone.

Objects caught in a reference cycle wait for the cyclic collector, whose pauses stop the event
loop for every request in flight: at 1,550 requests/s, with a cycle per request in the
coalescer, gen0 collections came every ~540 requests and took 4-7 ms each (docs/benchmarks.md,
round 3). This guards every layer, /v1 and /v2, against a new cycle per request."""

from __future__ import annotations

import asyncio
import collections
import gc
import io
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from gateway.app import build_app
from tests.unit.fakes import toy_backend, write_repo

V2 = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
V1 = {"model_name": "toy", "features": [1.0, 2.0, 3.0]}


@pytest.mark.parametrize(
    ("path", "body"), [("/v2/models/toy/versions/2/infer", V2), ("/v1/predict", V1)]
)
async def test_requests_leave_no_cyclic_garbage(
    path: str, body: dict, tmp_path: Path, aiohttp_client: Callable[..., Awaitable]
) -> None:
    client = await aiohttp_client(build_app(write_repo(tmp_path), backend=toy_backend()))
    raw = json.dumps(body).encode()

    async def one() -> None:
        resp = await client.post(path, data=io.BytesIO(raw))
        assert resp.status == 200, await resp.text()
        await resp.read()

    for _ in range(16):  # warm: first-use caches, connections, metric children
        await one()
    n = 64
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(n // 8):
            await asyncio.gather(*(one() for _ in range(8)))  # merged calls, and lone ones
        gc.collect()
        found = collections.Counter(type(o).__name__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    # Before the coalescer's cycle was cut: ~12 objects per request (768 here).
    assert sum(found.values()) < 8, found.most_common(10)
