"""The HTTP infer transport's framing and connection handling (gateway/backends/triton_http.py)
against a scripted local server: what a real Triton does is in
tests/integration/test_triton_http_infer.py; this is what it rarely does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import numpy as np
import orjson
import pytest

from gateway import errors
from gateway.backends.triton_http import HttpInfer
from gateway.tensors import Tensor
from gateway.types import InferRequest

ROW = np.arange(3, dtype=np.float32).reshape(1, 3)


def answer(score: float = 0.25, status: int = 200) -> bytes:
    """What Triton sends: a JSON header and the raw output, framed by Content-Length."""
    if status != 200:
        body = orjson.dumps({"error": "unknown model: 'nope'"})
        return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)
    raw = np.array([[score]], dtype=np.float32).tobytes()
    head = orjson.dumps({"model_name": "toy", "model_version": "2", "outputs": [
        {"name": "score", "datatype": "FP32", "shape": [1, 1],
         "parameters": {"binary_data_size": len(raw)}}]})  # fmt: skip
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        b"Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n%s%s"
        % (len(head), len(head) + len(raw), head, raw)
    )


Script = Callable[[int, int], bytes | None]  # (connection no., request no.) -> reply or close


@pytest.fixture
async def server() -> AsyncIterator[Callable[[Script], asyncio.Future[int]]]:
    """``await server(script)`` -> a port; the script decides each reply (None: hang up)."""
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> int:
        conns = 0

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal conns
            conns += 1
            me, n = conns, 0
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length:")[-1].split(b"\r\n")[0])
                    await reader.readexactly(length)
                    n += 1
                    reply = script(me, n)
                    if reply is None:
                        break
                    writer.write(reply)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
                pass  # the client hung up, or the test is over
            writer.close()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(srv)
        return int(srv.sockets[0].getsockname()[1])

    yield start  # type: ignore[misc]
    for srv in servers:
        srv.close()
        await srv.wait_closed()


def request() -> InferRequest:
    return InferRequest("toy", "2", (Tensor("features", "FP32", ROW),), ("score",), "r1")


async def test_a_kept_alive_connection_serves_the_next_call(server) -> None:
    port = await server(lambda conn, n: answer(0.1 * n))
    http = HttpInfer(f"http://127.0.0.1:{port}", "t")
    first = await http.infer(request(), 2.0)
    second = await http.infer(request(), 2.0)
    assert first.outputs["score"].data[0, 0] == pytest.approx(0.1)
    assert second.outputs["score"].data[0, 0] == pytest.approx(0.2)
    assert http.opened == 1
    await http.close()


async def test_a_connection_the_server_dropped_while_idle_is_retried_once_fresh(server) -> None:
    # The server takes the second request on the first connection and hangs up without a
    # byte: the request never got an answer, so a fresh connection carries it.
    port = await server(lambda conn, n: None if (conn, n) == (1, 2) else answer())
    http = HttpInfer(f"http://127.0.0.1:{port}", "t")
    await http.infer(request(), 2.0)
    resp = await http.infer(request(), 2.0)
    assert resp.outputs["score"].data[0, 0] == pytest.approx(0.25)
    assert http.opened == 2
    await http.close()


async def test_a_fresh_connection_that_fails_is_unavailable_not_retried(server) -> None:
    port = await server(lambda conn, n: None)
    http = HttpInfer(f"http://127.0.0.1:{port}", "t")
    with pytest.raises(errors.BackendUnavailable):
        await http.infer(request(), 2.0)
    assert http.opened == 1
    await http.close()


async def test_nobody_listening_is_unavailable() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    http = HttpInfer(f"http://127.0.0.1:{port}", "t")
    with pytest.raises(errors.BackendUnavailable):
        await http.infer(request(), 2.0)


async def test_an_error_status_maps_and_keeps_the_connection(server) -> None:
    port = await server(lambda conn, n: answer(status=400) if n == 1 else answer())
    http = HttpInfer(f"http://127.0.0.1:{port}", "t")
    with pytest.raises(errors.ModelNotFound):
        await http.infer(request(), 2.0)
    await http.infer(request(), 2.0)
    assert http.opened == 1
    await http.close()


@pytest.mark.parametrize(
    "reply",
    [
        answer() + b"extra",  # more than its Content-Length
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnope",  # not Triton's JSON
    ],
)
async def test_an_answer_framed_or_shaped_otherwise_is_a_backend_error(server, reply) -> None:
    port = await server(lambda conn, n: reply)
    http = HttpInfer(f"http://127.0.0.1:{port}", "t")
    with pytest.raises(errors.BackendError):
        await http.infer(request(), 2.0)
    assert not http._idle  # a connection in doubt never goes back to the pool
    await http.close()


async def test_the_request_carries_timeout_priority_id_and_binary_sizes(server) -> None:
    seen: list[bytes] = []

    async def capture(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[-1].split(b"\r\n")[0])
        seen.extend((head, await reader.readexactly(length)))
        writer.write(answer())
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(capture, "127.0.0.1", 0)
    http = HttpInfer(f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}", "t")
    req = InferRequest("toy", "2", (Tensor("features", "FP32", ROW),), ("score",), "r7",
                       priority=2)  # fmt: skip
    await http.infer(req, 0.5, (("traceparent", "00-ab-cd-01"),))
    head, body = seen
    assert head.startswith(b"POST /v2/models/toy/versions/2/infer HTTP/1.1\r\n")
    assert b"traceparent: 00-ab-cd-01\r\n" in head
    n = int(head.lower().split(b"inference-header-content-length:")[1].split(b"\r\n")[0])
    header = orjson.loads(body[:n])
    assert header["id"] == "r7"
    assert header["parameters"]["priority"] == 2
    assert 0 < header["parameters"]["timeout"] <= 500_000
    assert header["inputs"][0]["parameters"]["binary_data_size"] == ROW.nbytes
    assert body[n:] == ROW.tobytes()
    srv.close()
    await srv.wait_closed()
    await http.close()


async def capture_one(reply: bytes) -> tuple[asyncio.Server, HttpInfer, list[bytes]]:
    """A server that records one request (head, body) and answers ``reply``."""
    seen: list[bytes] = []

    async def capture(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[-1].split(b"\r\n")[0])
        seen.extend((head, await reader.readexactly(length)))
        writer.write(reply)
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(capture, "127.0.0.1", 0)
    return srv, HttpInfer(f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}", "t"), seen


async def test_the_clients_parameters_ride_along_with_their_json_types() -> None:
    """Sequence and custom parameters reach Triton; the gateway's own (entity_id, segment,
    binary_data_output) do not, and timeout and priority are the gateway's."""
    srv, http, seen = await capture_one(answer())
    params = {"sequence_id": "s-1", "sequence_start": True, "sequence_end": False,
              "temperature": 0.5, "n": 3, "entity_id": "e", "segment": "eu",
              "binary_data_output": False, "timeout": 10**9, "priority": 9}  # fmt: skip
    req = InferRequest("toy", "2", (Tensor("features", "FP32", ROW),), ("score",), "r8",
                       params, priority=2)  # fmt: skip
    await http.infer(req, 0.5)
    head, body = seen
    n = int(head.lower().split(b"inference-header-content-length:")[1].split(b"\r\n")[0])
    sent = orjson.loads(body[:n])["parameters"]
    assert 0 < sent.pop("timeout") <= 500_000
    assert sent == {"binary_data_output": True, "priority": 2, "sequence_id": "s-1",
                    "sequence_start": True, "sequence_end": False, "temperature": 0.5,
                    "n": 3}  # fmt: skip
    srv.close()
    await srv.wait_closed()
    await http.close()


async def test_a_bf16_output_decodes_to_its_raw_bits() -> None:
    bits = np.array([[0x3FC0, 0xC000]], "<u2")  # 1.5 and -2.0 in bfloat16
    raw = bits.tobytes()
    head = orjson.dumps({"model_name": "toy", "model_version": "2", "outputs": [
        {"name": "y", "datatype": "BF16", "shape": [1, 2],
         "parameters": {"binary_data_size": len(raw)}}]})  # fmt: skip
    reply = (
        b"HTTP/1.1 200 OK\r\nInference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
        b"%s%s" % (len(head), len(head) + len(raw), head, raw)
    )
    srv, http, _ = await capture_one(reply)
    resp = await http.infer(request(), 0.5)
    y = resp.outputs["y"]
    assert (y.datatype, y.shape, y.data.tobytes()) == ("BF16", [1, 2], raw)
    srv.close()
    await srv.wait_closed()
    await http.close()
