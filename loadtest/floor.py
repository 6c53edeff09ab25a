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

``--server raw`` serves the same modes without aiohttp: an ``asyncio.Protocol`` over
httptools' parser (llhttp, as in uvicorn), one task per request only where a mode awaits
Triton, keep-alive, and responses written in request order. It is what a front end outside
aiohttp could cost at best, to weigh that step against aiohttp's own share (issue 15).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, cast

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


async def _score(path: InferLayer, model: str, version: str, body: dict) -> bytes:
    rows = (Tensor("features", "FP32", _rows(body)),)
    call = InferRequest(model, version, rows, ("score",), batchable=True)
    resp = await path.infer(call, Deadline.after(5.0, monotonic))
    return _answer(model, version, float(resp.outputs["score"].data.ravel()[0]))


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
        answer = await _score(path, model, version, body)
        return web.Response(body=answer, content_type="application/json")

    app.router.add_post("/v2/models/{model}/versions/{version}/infer", infer)
    app.router.add_post("/v1/predict", infer)
    return app


def _target(url: bytes) -> tuple[str, str] | None:
    """(model, version) of the two routes the floor answers, else None."""
    parts = url.split(b"?", 1)[0].split(b"/")
    if len(parts) == 7 and parts[1:3] == [b"v2", b"models"] and parts[3] and parts[4] == (
        b"versions"
    ) and parts[6] == b"infer":  # fmt: skip
        return parts[3].decode(), parts[5].decode()
    if parts == [b"", b"v1", b"predict"]:
        return "risk", "2"
    return None


def _http(status: bytes, body: bytes, keep_alive: bool) -> bytes:
    connection = b"keep-alive" if keep_alive else b"close"
    return b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" \
        b"Connection: %s\r\n\r\n%s" % (status, len(body), connection, body)  # fmt: skip


_BAD_REQUEST = _http(b"400 Bad Request", b'{"error":"bad request"}', False)
_INTERNAL_ERROR = _http(b"500 Internal Server Error", b'{"error":"internal"}', False)


async def _framed(answer: Awaitable[bytes], keep: bool) -> bytes:
    return _http(b"200 OK", await answer, keep)


class RawProtocol(asyncio.Protocol):
    """One connection of ``--server raw``: httptools parses, the mode answers, responses go out
    in request order (a pipelined request waits for the one before it)."""

    def __init__(
        self, answer: Callable[[str, str, dict], Coroutine[Any, Any, bytes]] | None
    ) -> None:
        import httptools  # the raw server only; aiohttp's floor does not need it

        self.answer = answer  # None: bare mode, the canned answer at once
        self.parser = httptools.HttpRequestParser(self)
        self.parse_error = httptools.HttpParserError  # not imported per read
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.last: asyncio.Future[Any] | None = None  # the previous response, written or not

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except self.parse_error:
            self._write(_BAD_REQUEST, keep=False)

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        url, body, keep = self.url, b"".join(self.body), self.parser.should_keep_alive()
        self.url, self.body = b"", []
        target = _target(url)
        if target is None:
            self._after(_http(b"404 Not Found", b'{"error":"not found"}', keep), keep)
            return
        parsed = orjson.loads(body)
        if self.answer is None:
            self._after(_http(b"200 OK", _CANNED, keep), keep)
            return
        task: asyncio.Task[bytes] = asyncio.get_running_loop().create_task(
            _framed(self.answer(*target, parsed), keep)
        )
        self._after(task, keep)

    def _after(self, response: bytes | asyncio.Task[bytes], keep: bool) -> None:
        if self.last is None:  # nothing pending before it: no task of our own
            if isinstance(response, bytes):
                self._write(response, keep)
            else:
                response.add_done_callback(lambda task: self._done(task, keep))
                self.last = response
            return
        self.last = asyncio.ensure_future(self._in_order(self.last, response, keep))

    def _done(self, task: asyncio.Task[bytes], keep: bool) -> None:
        if self.last is task:
            self.last = None
        if task.cancelled() or task.exception() is not None:
            self._write(_INTERNAL_ERROR, keep=False)
        else:
            self._write(task.result(), keep)

    async def _in_order(
        self, before: asyncio.Future[Any], response: bytes | Awaitable[bytes], keep: bool
    ) -> None:
        await asyncio.wait([before])  # written by its own callback, or by its own _in_order
        try:
            self._write(response if isinstance(response, bytes) else await response, keep)
        except Exception:
            self._write(_INTERNAL_ERROR, keep=False)
        if self.last is asyncio.current_task():
            self.last = None

    def _write(self, response: bytes, keep: bool) -> None:
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.write(response)
            if not keep:
                self.transport.close()


async def serve_raw(mode: str, port: int, triton_grpc: str, triton_http: str) -> None:
    loop = asyncio.get_running_loop()
    path, backend = (None, None) if mode == "bare" else layer(mode, triton_grpc, triton_http)

    async def answer(model: str, version: str, body: dict) -> bytes:
        assert path is not None
        return await _score(path, model, version, body)

    server = await loop.create_server(
        lambda: RawProtocol(None if path is None else answer), "127.0.0.1", port
    )
    try:
        async with server:
            await server.serve_forever()
    finally:
        if backend is not None:
            await backend.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.floor", description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=18990)
    modes = ("bare", "grpc", "tick", "http", "http-tick")
    p.add_argument("--mode", choices=modes, default="bare")
    p.add_argument("--triton-grpc", default="127.0.0.1:8001", help="host:port (grpc, tick)")
    p.add_argument("--triton-http", default="http://127.0.0.1:8000", help="URL (http modes)")
    p.add_argument("--server", choices=("aiohttp", "raw"), default="aiohttp")
    args = p.parse_args(argv)
    if args.server == "raw":
        uvloop.run(serve_raw(args.mode, args.port, args.triton_grpc, args.triton_http))
        return 0
    app = build(args.mode, args.triton_grpc, args.triton_http)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None,
                loop=uvloop.new_event_loop())  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
