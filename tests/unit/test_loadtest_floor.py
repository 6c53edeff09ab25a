"""loadtest/floor.py, the framework's floor the benchmark measures the gateway against: it
answers the benchmark's own bodies, its tick modes are the gateway's own Coalescer, which
merges the rows of one loop iteration (a recording stand-in for Triton; the Triton modes run
against a real Triton only in the benchmark)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import numpy as np
import pytest

from gateway.batching import Coalescer
from gateway.clock import monotonic
from gateway.tensors import Tensor
from gateway.types import Deadline, InferRequest, InferResponse
from loadtest.bench import http_bodies
from loadtest.floor import TICK, RawProtocol, build, layer


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


async def _raw_server(answer: Any) -> tuple[Any, int, list[RawProtocol]]:
    """The raw server on a free port, and the connections it has made."""
    made: list[RawProtocol] = []

    def connection() -> RawProtocol:
        made.append(RawProtocol(answer))
        return made[-1]

    server = await asyncio.get_running_loop().create_server(connection, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], made


@pytest.mark.parametrize("target", ["gateway-v2", "gateway-v1"])
async def test_raw_server_answers_the_benchmark_bodies_like_aiohttps(target: str) -> None:
    server, port, made = await _raw_server(None)
    path = "/v2/models/risk/versions/2/infer" if target.endswith("v2") else "/v1/predict"
    body = http_bodies(target, np.ones((1, 30), dtype=np.float32))[0]
    async with server, aiohttp.ClientSession() as session:
        for _ in range(3):  # one kept-alive connection, several requests
            async with session.post(f"http://127.0.0.1:{port}{path}", data=body) as resp:
                assert resp.status == 200
                assert json.loads(await resp.read())["outputs"][0]["name"] == "score"
        async with session.post(f"http://127.0.0.1:{port}/nope", data=body) as resp:
            assert resp.status == 404
        assert len(made) == 1  # every request on one kept-alive connection
        async with session.post(f"http://127.0.0.1:{port}{path}", data=b"{nope") as resp:
            assert resp.status == 400


async def test_raw_server_writes_pipelined_answers_in_request_order() -> None:
    """The second request's answer is ready first; it still goes out second."""
    release, second_ready = asyncio.Event(), asyncio.Event()

    async def answer(model: str, version: str, body: dict) -> bytes:
        if version == "1":
            await release.wait()
        else:
            second_ready.set()
        return json.dumps({"outputs": [{"name": "score", "data": [int(version)]}]}).encode()

    server, port, _ = await _raw_server(answer)
    body = http_bodies("gateway-v2", np.ones((1, 30), dtype=np.float32))[0]
    requests = b"".join(
        b"POST /v2/models/risk/versions/%d/infer HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (v, len(body), body)
        for v in (1, 2)
    )
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(requests)
        await asyncio.wait_for(second_ready.wait(), 5)  # answered while the first still waits
        release.set()
        data = b""
        while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"]}]}"):
            data += await asyncio.wait_for(reader.read(65536), 5)
        assert data.index(b'"data": [1]') < data.index(b'"data": [2]')
        writer.close()
        await writer.wait_closed()


async def test_raw_server_closes_the_connection_its_error_answer_says_it_closes() -> None:
    server, port, _ = await _raw_server(None)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"NOT HTTP\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)  # to EOF: the server closed
        assert answer.startswith(b"HTTP/1.1 400") and b"Connection: close" in answer
        writer.close()
