"""The framework's floor: what aiohttp, uvloop and grpc.aio cost per request on this machine
with none of the gateway's own work, measured with the same client as the gateway.

    python -m gateway triton --http-port 18000 --grpc-port 18001 &     # for --mode grpc|tick
    python -m loadtest.floor --port 18990 --mode bare &
    python -m loadtest.bench --gateway http://127.0.0.1:18990 --gateway-pid $! \\
        --triton-http http://127.0.0.1:18000 --targets triton-http,gateway-v2 --closed-only

Modes (each answers ``POST /v2/models/{model}/versions/{version}/infer`` with the OIP JSON
body the benchmark sends, and ``POST /v1/predict`` the same way):

- ``bare``: parse the JSON body with orjson and return a fixed answer: aiohttp + uvloop alone;
- ``grpc``: parse it and make one call to Triton per request over the gateway's own gRPC
  transport (``TritonBackend``), answer its first output: the transport's floor unmerged;
- ``tick``: the same under the gateway's ``Coalescer`` with the tick window alone: rows that
  arrive in one event-loop iteration go out as one call;
- ``http``, ``http-tick``: the same two over the gateway's HTTP transport to Triton
  (``TritonBackend`` given ``http_url``: gateway/backends/triton_http.py).

No route, no validation of the schema beyond what numpy does, no log, no metrics: a floor
to measure the gateway against (docs/benchmarks.md), not something to serve with.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Sequence

import numpy as np
import orjson
import uvloop
from aiohttp import web

from gateway.backends.triton import TritonBackend
from gateway.batching import BatchingPolicy, Coalescer, InferLayer
from gateway.clock import monotonic
from gateway.tensors import Tensor
from gateway.types import Deadline, InferRequest

_CANNED = orjson.dumps({"model_name": "risk", "model_version": "2", "outputs": [
    {"name": "score", "datatype": "FP32", "shape": [1, 1], "data": [0.5]}]})  # fmt: skip


def _rows(body: dict) -> np.ndarray:
    if "inputs" in body:
        return np.asarray(body["inputs"][0]["data"], dtype=np.float32).reshape(1, -1)
    return np.asarray(body["features"], dtype=np.float32).reshape(1, -1)


def _answer(model: str, version: str, score: float) -> bytes:
    return orjson.dumps({"model_name": model, "model_version": version, "outputs": [
        {"name": "score", "datatype": "FP32", "shape": [1, 1], "data": [score]}]})  # fmt: skip


#: The tick window alone: the in-flight cap out of reach, so only the loop pass merges.
TICK = BatchingPolicy(max_in_flight_per_target=1 << 30, max_batch=256, tick_window=True)


def layer(mode: str, triton_grpc: str, triton_http: str) -> tuple[InferLayer, TritonBackend]:
    """The gateway's own transport to Triton (gRPC, or HTTP with binary tensors for the http
    modes), under the gateway's own Coalescer for the tick modes; nothing else of it."""
    backend = TritonBackend(
        triton_grpc, "floor", http_url=triton_http if mode.startswith("http") else ""
    )
    return (Coalescer(TICK, backend) if mode.endswith("tick") else backend), backend


def build(
    mode: str, triton_grpc: str, triton_http: str = "http://127.0.0.1:8000"
) -> web.Application:
    app = web.Application()
    path: InferLayer | None = None

    async def channel(app: web.Application) -> AsyncIterator[None]:
        nonlocal path  # grpc.aio binds its channel to the loop it is built on
        path, backend = layer(mode, triton_grpc, triton_http)
        yield
        await backend.close()

    if mode != "bare":
        app.cleanup_ctx.append(channel)

    async def infer(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        if path is None:
            return web.Response(body=_CANNED, content_type="application/json")
        model = request.match_info.get("model", "risk")
        version = request.match_info.get("version", "2")
        rows = (Tensor("features", "FP32", _rows(body)),)
        call = InferRequest(model, version, rows, ("score",), batchable=True)
        resp = await path.infer(call, Deadline.after(5.0, monotonic))
        score = float(resp.outputs["score"].data.ravel()[0])
        return web.Response(body=_answer(model, version, score), content_type="application/json")

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
