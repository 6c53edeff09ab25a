"""Triton's HTTP/REST infer with the binary tensor extension: a cheaper transport for the hot
path (``triton.infer_protocol: http``). Control-plane calls stay on gRPC.

Why: a gRPC call through ``TritonBackend`` costs its caller ~0.14 ms of CPU, most of it
C-core's poller thread handing the completion to the event loop; at low load, when no rows
merge, that is half of what a whole request costs. The same call over this module, one
HTTP/1.1 request on a kept-alive connection, costs ~0.06 ms (``loadtest/floor.py``;
docs/benchmarks.md, "The framework's floor").

The wire format (Triton's binary tensor data extension): a JSON header, then each tensor's
raw bytes; the header's length rides in ``Inference-Header-Content-Length``, each tensor's in
its ``binary_data_size``. Those raw bytes are the same as gRPC's ``raw_*_contents`` (BYTES as
little-endian 4-byte length prefixes), so ``tensors.to_bytes``/``from_bytes`` serve both.

One request per connection at a time (no pipelining: an answer never waits behind another's),
a pool of idle connections, each renewed after ``max_connection_age_s`` like the gRPC channel
(triton#6177). A call that runs out of time or is cancelled closes its connection, since the
answer that may still come would otherwise be read as the next call's. Errors map onto the
same classes as the gRPC path (gateway/backends/triton_errors.py).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import grpc
import orjson

from gateway import errors
from gateway.backends.triton_errors import HTTP_STATUS_CODES, classify
from gateway.clock import Clock, monotonic
from gateway.tensors import backend_parameters, from_bytes, to_bytes
from gateway.types import InferRequest, InferResponse

#: An answer's head larger than this is not Triton's (a few hundred bytes in practice).
_MAX_HEAD = 64 * 1024
_HEADER_LENGTH = b"\r\ninference-header-content-length:"
_CONTENT_LENGTH = b"\r\ncontent-length:"


class _Answer:
    __slots__ = ("body", "header_length", "status")

    def __init__(self, status: int, header_length: int, body: bytes) -> None:
        self.status, self.header_length, self.body = status, header_length, body


class _Connection(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection: writes a request, frames its answer by
    Content-Length (what Triton sends for infer)."""

    def __init__(self, opened_at: float) -> None:
        self.opened_at = opened_at
        self.transport: asyncio.Transport | None = None
        self.closed = False
        #: Taken from the idle pool (not fresh), and bytes received for the current request.
        self.reused = False
        self.received = 0
        self._buf = bytearray()
        self._need = -1
        self._status = 0
        self._header_length = 0
        self._waiter: asyncio.Future[_Answer] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes) -> asyncio.Future[_Answer]:
        assert self.transport is not None and self._waiter is None
        self._waiter = asyncio.get_running_loop().create_future()
        self.received = 0
        self.transport.write(data)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self._buf += data
        if self._need < 0:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > _MAX_HEAD:
                    self._fail(errors.BackendError("backend answer has no end of headers"))
                return
            try:
                self._head(bytes(self._buf[:end]).lower())
            except (ValueError, IndexError):
                self._fail(errors.BackendError("backend answer is not HTTP/1.1 as expected"))
                return
            del self._buf[: end + 4]
        if len(self._buf) >= self._need:
            body = bytes(self._buf[: self._need])
            if len(self._buf) > self._need:  # bytes nobody asked for: the framing is off
                self._fail(errors.BackendError("backend sent more than its Content-Length"))
                return
            self._buf.clear()
            self._need = -1
            waiter, self._waiter = self._waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_result(_Answer(self._status, self._header_length, body))

    def _head(self, head: bytes) -> None:
        if b"\r\ntransfer-encoding:" in head:
            raise ValueError("chunked")  # Triton frames infer answers by Content-Length
        self._status = int(head[9:12])
        self._need = int(head.split(_CONTENT_LENGTH, 1)[1].split(b"\r\n", 1)[0])
        mark = head.find(_HEADER_LENGTH)
        self._header_length = (
            int(head[mark + len(_HEADER_LENGTH) :].split(b"\r\n", 1)[0])
            if mark >= 0
            else self._need
        )

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(errors.BackendUnavailable("backend closed the connection"))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class HttpInfer:
    """Infer calls to one Triton's HTTP endpoint over a pool of kept-alive connections."""

    def __init__(
        self,
        url: str,
        name: str,
        *,
        max_idle: int = 64,
        max_connection_age_s: float = 0.0,
        clock: Clock = monotonic,
    ) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"triton http url {url!r}: expected http://host:port")
        self.host, self.port = parts.hostname, parts.port or 80
        self.name = name
        self.max_idle = max_idle
        self.max_connection_age_s = max_connection_age_s
        self.clock = clock
        self._idle: deque[_Connection] = deque()
        self.opened = 0  # connections opened, for tests and stats

    async def _acquire(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()  # the most recently used: warm, least likely timed out
            if not conn.closed and not self._aged(conn):
                conn.reused = True
                return conn
            conn.close()
        try:
            _, conn = await asyncio.get_running_loop().create_connection(
                lambda: _Connection(self.clock()), self.host, self.port
            )
        except OSError as exc:
            raise errors.BackendUnavailable(
                f"backend unavailable: {exc}", details={"server": self.name}
            ) from exc
        self.opened += 1
        return conn

    def _aged(self, conn: _Connection) -> bool:
        age = self.max_connection_age_s
        return age > 0 and self.clock() - conn.opened_at >= age

    def _release(self, conn: _Connection) -> None:
        if conn.closed or self._aged(conn) or len(self._idle) >= self.max_idle:
            conn.close()
        else:
            self._idle.append(conn)

    async def infer(
        self,
        request: InferRequest,
        timeout_s: float,
        headers: Sequence[tuple[str, str]] = (),
    ) -> InferResponse:
        data = self._encode(request, timeout_s, headers)
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(timeout_s):
                conn = await self._acquire()
                try:
                    answer = await conn.send(data)
                except errors.BackendUnavailable:
                    if not conn.reused or conn.received:
                        raise
                    # A kept-alive connection the server had closed while it sat idle: the
                    # request never reached Triton, so one fresh connection may carry it.
                    conn = await self._acquire()
                    answer = await conn.send(data)
        except TimeoutError:
            if conn is not None:
                conn.close()  # its answer may still come: never read it as the next one's
            raise errors.DeadlineExceeded(
                "backend call ran out of time", details=self._where(request)
            ) from None
        except BaseException:  # cancelled, or the connection failed: it cannot be reused
            if conn is not None:
                conn.close()
            raise
        if answer.status != 200:  # a whole answer: the connection serves the next call
            self._release(conn)
            raise _error(answer.status, _message(answer.body), self._where(request))
        try:
            resp = _decode(answer, request)
        except (ValueError, KeyError, TypeError, errors.ClientError) as exc:
            conn.close()  # an answer in doubt: so is what comes after it on this connection
            raise errors.BackendError(
                f"backend answer unreadable: {exc}", details=self._where(request)
            ) from exc
        self._release(conn)
        return resp

    def _where(self, request: InferRequest) -> dict[str, str]:
        """An error's details (built only for an error: the hot path needs none)."""
        return {"server": self.name, "model": request.model}

    async def ready(self, timeout_s: float) -> bool:
        """Triton's ``/v2/health/ready`` on this endpoint: the pool's health probe asks it too,
        so a wrong ``http_url`` makes the member unready instead of failing every call."""
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(timeout_s):
                conn = await self._acquire()
                answer = await conn.send(
                    b"GET /v2/health/ready HTTP/1.1\r\nHost: triton\r\nContent-Length: 0\r\n\r\n"
                )
        except (TimeoutError, errors.SwitchyardError):
            if conn is not None:
                conn.close()
            return False
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        self._release(conn)
        return answer.status == 200

    @staticmethod
    def _encode(
        request: InferRequest, timeout_s: float, headers: Sequence[tuple[str, str]]
    ) -> bytes:
        raws = [to_bytes(t) for t in request.inputs]
        # The client's own parameters (sequence_id/_start/_end, custom ones) with their JSON
        # types, then the gateway's, which the client's never replace.
        params: dict[str, Any] = backend_parameters(request.parameters)
        params["binary_data_output"] = True
        params["timeout"] = max(1, int(timeout_s * 1e6))
        if request.priority > 0:
            params["priority"] = request.priority
        head: dict[str, Any] = {
            "id": request.request_id,
            "parameters": params,
            "inputs": [
                {"name": t.name, "shape": list(t.data.shape), "datatype": t.datatype,
                 "parameters": {"binary_data_size": len(raw)}}
                for t, raw in zip(request.inputs, raws, strict=True)
            ],
        }  # fmt: skip
        if request.outputs:
            head["outputs"] = [
                {"name": n, "parameters": {"binary_data": True}} for n in request.outputs
            ]
        header = orjson.dumps(head)
        path = f"/v2/models/{request.model}"
        if request.version:
            path += f"/versions/{request.version}"
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
        start = (
            f"POST {path}/infer HTTP/1.1\r\nHost: triton\r\n"
            f"Content-Type: application/octet-stream\r\n{extra}"
            f"Inference-Header-Content-Length: {len(header)}\r\n"
            f"Content-Length: {len(header) + sum(map(len, raws))}\r\n\r\n"
        )
        return b"".join((start.encode("latin-1"), header, *raws))

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


def _decode(answer: _Answer, request: InferRequest) -> InferResponse:
    """A 200 answer's outputs (raises ValueError, KeyError or TypeError when it is not one)."""
    body = memoryview(answer.body)
    head = orjson.loads(body[: answer.header_length])
    offset = answer.header_length
    outputs = {}
    for o in head.get("outputs", ()):
        size = o.get("parameters", {}).get("binary_data_size")
        if size is None:
            raise ValueError(f"output {o.get('name')!r} came without binary data")
        raw = body[offset : offset + size]
        offset += size
        outputs[o["name"]] = from_bytes(o["name"], o["datatype"], list(o["shape"]), raw)
    return InferResponse(
        head.get("model_name", request.model),
        str(head.get("model_version", request.version)),
        outputs,
        head.get("id", request.request_id),
    )


def _message(body: bytes) -> str:
    try:
        return str(orjson.loads(body).get("error", ""))
    except (orjson.JSONDecodeError, AttributeError):
        return body[:200].decode(errors="replace")


def _error(status: int, detail: str, where: dict[str, str]) -> errors.SwitchyardError:
    """Triton's HTTP status of an error is its gRPC status's twin: classified as on gRPC."""
    code = HTTP_STATUS_CODES.get(status, grpc.StatusCode.UNKNOWN)
    return classify(code, detail, where, label=f"HTTP {status}")
