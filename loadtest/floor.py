"""The framework's floor: what aiohttp, uvloop and grpc.aio cost per request on this machine
with none of the gateway's own work, measured with the same client as the gateway.

    python -m gateway triton --http-port 18000 --grpc-port 18001 &     # for --mode grpc|tick
    python -m loadtest.floor --port 18990 --mode bare &
    python -m loadtest.bench --gateway http://127.0.0.1:18990 --gateway-pid $! \\
        --triton-http http://127.0.0.1:18000 --targets triton-http,gateway-v2 --closed-only

Modes (each answers ``POST /v2/models/{model}/versions/{version}/infer`` with the OIP JSON
body the benchmark sends, and ``POST /v1/predict`` the same way):

- ``bare``: parse the JSON body with orjson and return a fixed answer: aiohttp + uvloop alone;
- ``grpc``: parse it, build a ``ModelInferRequest`` and make one ``grpc.aio`` call to Triton
  per request, answer its first output: the transport's floor without merging;
- ``tick``: the same, but rows that arrive in one event-loop iteration go out as one call;
- ``http``, ``http-tick``: the same two over the gateway's HTTP transport to Triton
  (gateway/backends/triton_http.py) instead of grpc.aio.

No route, no validation of the schema beyond what numpy does, no log, no metrics: a floor
to measure the gateway against (docs/benchmarks.md), not something to serve with.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc
import numpy as np
import orjson
import uvloop
from aiohttp import web
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.backends.triton_http import HttpInfer
from gateway.tensors import Tensor
from gateway.types import InferRequest

_CANNED = orjson.dumps({"model_name": "risk", "model_version": "2", "outputs": [
    {"name": "score", "datatype": "FP32", "shape": [1, 1], "data": [0.5]}]})  # fmt: skip


def _rows(body: dict) -> np.ndarray:
    if "inputs" in body:
        return np.asarray(body["inputs"][0]["data"], dtype=np.float32).reshape(1, -1)
    return np.asarray(body["features"], dtype=np.float32).reshape(1, -1)


def _answer(model: str, version: str, score: float) -> bytes:
    return orjson.dumps({"model_name": model, "model_version": version, "outputs": [
        {"name": "score", "datatype": "FP32", "shape": [1, 1], "data": [score]}]})  # fmt: skip


class Triton:
    """One grpc.aio channel; ``call`` sends a (n, width) float32 block of rows."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    async def call(self, model: str, version: str, rows: np.ndarray) -> np.ndarray:
        msg = service_pb2.ModelInferRequest(model_name=model, model_version=version)
        spec = msg.inputs.add()
        spec.name, spec.datatype = "features", "FP32"
        spec.shape.extend(rows.shape)
        msg.raw_input_contents.append(rows.tobytes())
        msg.outputs.add().name = "score"
        reply = await self.stub.ModelInfer(msg, timeout=5.0)
        return np.frombuffer(reply.raw_output_contents[0], dtype=np.float32)


class TritonHttp:
    """The gateway's own HTTP transport (gateway/backends/triton_http.py), with nothing of
    the gateway around it."""

    def __init__(self, url: str) -> None:
        self.http = HttpInfer(url, "floor")

    async def call(self, model: str, version: str, rows: np.ndarray) -> np.ndarray:
        request = InferRequest(model, version, (Tensor("features", "FP32", rows),), ("score",))
        resp = await self.http.infer(request, 5.0)
        return resp.outputs["score"].data.ravel()


class TickMerger:
    """Rows for one (model, version) that arrive within one loop iteration share a call."""

    def __init__(self, triton: Triton | TritonHttp) -> None:
        self.triton = triton
        self.waiting: dict[tuple[str, str], list[tuple[np.ndarray, asyncio.Future]]] = {}

    async def call(self, model: str, version: str, rows: np.ndarray) -> np.ndarray:
        key = (model, version)
        fut = asyncio.get_running_loop().create_future()
        lane = self.waiting.get(key)
        if lane is None:
            lane = self.waiting[key] = []
            asyncio.get_running_loop().call_soon(self._flush, key)
        lane.append((rows, fut))
        return await fut

    def _flush(self, key: tuple[str, str]) -> None:
        asyncio.get_running_loop().create_task(self._send(key, self.waiting.pop(key)))

    async def _send(self, key: tuple[str, str], lane: list) -> None:
        try:
            scores = await self.triton.call(*key, np.concatenate([r for r, _ in lane]))
        except Exception as exc:
            for _, f in lane:
                f.set_exception(exc)
            return
        for i, (_, f) in enumerate(lane):
            f.set_result(scores[i : i + 1])


def build(
    mode: str, triton_grpc: str, triton_http: str = "http://127.0.0.1:8000"
) -> web.Application:
    app = web.Application()
    backend: Triton | TritonHttp | TickMerger | None = None

    async def channel(app: web.Application) -> AsyncIterator[None]:
        nonlocal backend  # grpc.aio binds its channel to the loop it is built on
        if mode.startswith("http"):
            http = TritonHttp(triton_http)
            backend = TickMerger(http) if mode == "http-tick" else http
            yield
            await http.http.close()
            return
        triton = Triton(triton_grpc)
        backend = TickMerger(triton) if mode == "tick" else triton
        yield
        await triton.channel.close()

    if mode != "bare":
        app.cleanup_ctx.append(channel)

    async def infer(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        if backend is None:
            return web.Response(body=_CANNED, content_type="application/json")
        model = request.match_info.get("model", "risk")
        version = request.match_info.get("version", "2")
        scores = await backend.call(model, version, _rows(body))
        return web.Response(body=_answer(model, version, float(scores[0])),
                            content_type="application/json")  # fmt: skip

    app.router.add_post("/v2/models/{model}/versions/{version}/infer", infer)
    app.router.add_post("/v1/predict", infer)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.floor", description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=18990)
    modes = ("bare", "grpc", "tick", "http", "http-tick")
    p.add_argument("--mode", choices=modes, default="bare")
    p.add_argument("--triton-grpc", default="127.0.0.1:8001", help="host:port (grpc, tick)")
    p.add_argument("--triton-http", default="http://127.0.0.1:8000", help="URL (http modes)")
    args = p.parse_args(argv)
    app = build(args.mode, args.triton_grpc, args.triton_http)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None,
                loop=uvloop.new_event_loop())  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
