"""The HTTP infer transport (gateway/backends/triton_http.py) against a real tritonserver:
the same outputs as the gRPC path, errors mapped to the same classes, deadlines, cancellation,
and a restarted Triton reached again."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from gateway import errors
from gateway.backends.triton import TritonBackend
from gateway.clock import monotonic
from gateway.tensors import Tensor
from gateway.tritonserver import TritonServer
from gateway.types import Deadline, InferRequest

ROWS = np.random.default_rng(7).normal(size=(5, 30)).astype(np.float32)


def risk(rows: np.ndarray, version: str = "2", model: str = "risk", **kw: object) -> InferRequest:
    return InferRequest(model, version, (Tensor("features", "FP32", rows),), **kw)  # type: ignore[arg-type]


def deadline(s: float = 5.0) -> Deadline:
    return Deadline.after(s, monotonic)


async def test_http_and_grpc_give_the_same_outputs(triton: TritonServer) -> None:
    grpc_side = TritonBackend(triton.grpc_url, "t")
    http_side = TritonBackend(triton.grpc_url, "t", http_url=triton.http_url)
    try:
        for rows in (ROWS[:1], ROWS):
            for outputs in ((), ("score", "decision")):
                a = await grpc_side.infer(risk(rows, outputs=outputs), deadline())
                b = await http_side.infer(risk(rows, outputs=outputs), deadline())
                assert set(a.outputs) == set(b.outputs) and b.outputs
                for name, t in a.outputs.items():
                    assert b.outputs[name].datatype == t.datatype
                    assert b.outputs[name].data.shape == t.data.shape
                    assert b.outputs[name].data.tolist() == t.data.tolist()  # BYTES too
                assert (b.model, b.version) == ("risk", "2")
        assert http_side.http is not None and http_side.http.opened == 1  # kept alive
    finally:
        await grpc_side.close()
        await http_side.close()


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        (risk(ROWS[:1], model="no_such_model"), errors.ModelNotFound),
        (risk(ROWS[:1], version="99"), errors.NotFound),
        (risk(ROWS[:1, :7]), errors.ClientError),  # wrong width
    ],
)
async def test_errors_map_as_on_grpc(
    triton: TritonServer, request_: InferRequest, error: type[Exception]
) -> None:
    grpc_side = TritonBackend(triton.grpc_url, "t")
    http_side = TritonBackend(triton.grpc_url, "t", http_url=triton.http_url)
    try:
        with pytest.raises(error) as on_grpc:
            await grpc_side.infer(request_, deadline())
        with pytest.raises(error) as on_http:
            await http_side.infer(request_, deadline())
        assert type(on_http.value) is type(on_grpc.value)
        assert on_http.value.status == on_grpc.value.status  # type: ignore[attr-defined]
        ok = await http_side.infer(risk(ROWS[:1]), deadline())  # the connection still serves
        assert ok.outputs["score"].data.shape == (1, 1)
    finally:
        await grpc_side.close()
        await http_side.close()


async def test_out_of_time_and_cancelled_calls_drop_their_connection(
    triton: TritonServer,
) -> None:
    backend = TritonBackend(triton.grpc_url, "t", http_url=triton.http_url)
    http = backend.http
    assert http is not None
    try:
        with pytest.raises(errors.DeadlineExceeded):
            await backend.infer(risk(ROWS), Deadline.after(1e-4, monotonic))
        task = asyncio.create_task(backend.infer(risk(ROWS), deadline()))
        await asyncio.sleep(0)  # it is on the wire (or connecting) when cancelled
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not http._idle  # neither half-read connection went back to the pool
        ok = await backend.infer(risk(ROWS[:1]), deadline())
        assert ok.outputs["score"].data.shape == (1, 1)
    finally:
        await backend.close()


async def test_the_health_probe_asks_the_http_endpoint_too(
    triton: TritonServer, free_port: int
) -> None:
    good = TritonBackend(triton.grpc_url, "t", http_url=triton.http_url)
    wrong = TritonBackend(triton.grpc_url, "t", http_url=f"http://127.0.0.1:{free_port}")
    try:
        assert await good.server_ready(2.0)
        assert not await wrong.server_ready(2.0)  # gRPC is ready; where infer goes is not
    finally:
        await good.close()
        await wrong.close()


async def test_a_restarted_triton_is_reached_again_and_a_stopped_one_is_unavailable(
    triton_factory, repo_root: Path
) -> None:
    server = triton_factory(
        repo_root / "model_repository", model_control_mode="explicit", load_models=("risk",)
    )
    backend = TritonBackend(server.grpc_url, "t", http_url=server.http_url)
    try:
        await backend.infer(risk(ROWS[:1]), deadline())  # a kept-alive connection now idles
        server.stop()
        with pytest.raises(errors.BackendUnavailable):
            await backend.infer(risk(ROWS[:1]), deadline())
        triton_factory(  # the same ports again, as a restarted pod would have
            repo_root / "model_repository",
            model_control_mode="explicit",
            load_models=("risk",),
            ports=server.ports,
        )
        ok = await backend.infer(risk(ROWS[:1]), deadline())
        assert ok.outputs["score"].data.shape == (1, 1)
    finally:
        await backend.close()
