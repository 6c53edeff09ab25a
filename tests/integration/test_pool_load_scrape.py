"""The load signals the pool routes on are the ones a real tritonserver exports: its pending
gauge, queue and compute counters parse, and give a mean service time after real calls."""

from __future__ import annotations

import urllib.request

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from gateway.backends.pool import BackendPool, PoolMember
from gateway.backends.triton import TritonBackend
from gateway.triton_metrics import _LOAD_WANTED
from gateway.tritonserver import TritonServer
from gateway.types import Deadline, InferRequest, Tensor


async def test_a_real_triton_gives_the_pool_its_load(triton: TritonServer) -> None:
    with urllib.request.urlopen(triton.metrics_url, timeout=5) as r:  # noqa: ASYNC210
        text = r.read().decode()
    names = {s.name.removesuffix("_total") for f in text_string_to_metric_families(text)
             for s in f.samples}  # fmt: skip
    assert set(_LOAD_WANTED) - names == set()
    pool = BackendPool(
        [PoolMember("t", TritonBackend(triton.grpc_url, name="t"), metrics_url=triton.metrics_url)]
    )
    rows = np.zeros((1, 30), np.float32)
    try:
        async with aiohttp.ClientSession() as session:
            await pool.scrape_load(session, timeout_s=2.0)
            for _ in range(20):
                req = InferRequest("risk", "", (Tensor("features", "FP32", rows),))
                await pool.infer(req, Deadline.after(10.0))
            await pool.scrape_load(session, timeout_s=2.0)
    finally:
        await pool.close()
    load = pool.members[0].load
    assert not load.failing
    assert load.mean_service_s is not None and 0 < load.mean_service_s < 5.0
