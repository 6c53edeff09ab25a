"""Request limits on a running app over raw sockets: JSON nesting depth, a body trickled
slower than server.body_read_timeout_s (slowloris), the connection cap, and connections that
idle or never finish their request head (closed after the keep-alive timeout)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from gateway.api.limits import check_depth, json_depth_exceeds
from gateway.app import build_app
from gateway.config import ServerSettings, Settings
from gateway.errors import ClientError
from gateway.serving import app_runner
from tests.unit.fakes import served, toy_backend, write_repo

PREDICT = {"model_name": "toy", "features": [0.1, 0.2, 0.3]}


def limited(tmp_path: Path, **server: Any) -> Settings:
    s = write_repo(tmp_path)
    return dataclasses.replace(s, server=dataclasses.replace(s.server, **server))


def nested(lists: int) -> Any:
    value: Any = 1
    for _ in range(lists):
        value = [value]
    return value


def depth_of(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    return 0


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)  # orjson: 64-bit integers only
    | st.text(alphabet='[]{}"\\aé', max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=4)
    ),
    max_leaves=40,
)


@given(json_values, st.integers(min_value=0, max_value=8), st.booleans())
def test_the_depth_check_agrees_with_a_recursive_count(
    value: Any, limit: int, ascii_: bool
) -> None:
    # Both escapings: json's \uXXXX for non-ASCII, orjson's raw UTF-8.
    raw = json.dumps(value).encode() if ascii_ else orjson.dumps(value)
    assert json_depth_exceeds(raw, limit) == (depth_of(value) > limit)
    if depth_of(value) > max(limit, 0) and limit > 0:
        with pytest.raises(ClientError) as info:
            check_depth(raw, limit)
        assert info.value.code == "json_too_deep"
    else:
        check_depth(raw, limit)


async def raw_request(port: int, request: bytes, timeout_s: float = 5) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(timeout_s):
            return await reader.read(65536)
    finally:
        writer.close()


def http(method: str, path: str, body: bytes = b"", extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


async def test_deep_json_is_400_and_brackets_in_strings_are_not_depth(
    tmp_path: Path, aiohttp_client
) -> None:
    client = await aiohttp_client(
        build_app(limited(tmp_path, max_json_depth=8), backend=toy_backend())
    )
    deep = {**PREDICT, "context": {"segment": nested(7)}}  # 1 (body) + 1 (context) + 7 = 9
    resp = await client.post("/v1/predict", data=json.dumps(deep).encode())
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "json_too_deep"
    ok = {**PREDICT, "entity_id": "[{" * 60, "context": {"segment": nested(5)}}
    resp = await client.post("/v1/predict", data=json.dumps(ok).encode())
    assert resp.status == 200, await resp.text()
    batch = [{**PREDICT, "context": {"segment": nested(6)}}] * 3  # list + body + ctx + 6 = 9
    resp = await client.post("/v1/predict:batch", data=json.dumps(batch).encode())
    assert (await resp.json())["error"]["code"] == "json_too_deep"


async def test_a_trickled_body_gets_408_and_the_connection_closes(
    tmp_path: Path, aiohttp_server
) -> None:
    timeout_s = 0.5
    server = await aiohttp_server(
        build_app(limited(tmp_path, body_read_timeout_s=timeout_s), backend=toy_backend())
    )
    body = json.dumps(PREDICT).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    head = f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    writer.write(head.encode())
    started = time.monotonic()

    async def trickle() -> None:  # the client's behaviour: one byte every 50 ms
        for i in range(len(body)):
            writer.write(body[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0.05)

    sender = asyncio.create_task(trickle())
    try:
        async with asyncio.timeout(timeout_s + 3):
            answer = await reader.read(65536)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b'"request_timeout"' in answer
            elapsed = time.monotonic() - started
            rest = await reader.read()  # EOF: the server closed the connection
        assert rest == b""
        assert timeout_s <= elapsed < timeout_s + 2
        assert not sender.done()  # closed while the client still had body to send
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sender
        writer.close()


async def test_connections_past_the_cap_get_503_and_the_first_ones_keep_working(
    tmp_path: Path, aiohttp_server
) -> None:
    server = await aiohttp_server(
        build_app(limited(tmp_path, max_connections=2), backend=toy_backend())
    )
    first = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(http("GET", "/admin/routes"))
        async with asyncio.timeout(5):
            extra = await reader.read()  # to EOF: answered, then closed
        writer.close()
        assert extra.startswith(b"HTTP/1.1 503"), extra[:200]
        assert b'"overloaded"' in extra and b"Retry-After: 1" in extra
        # Probes still answer on a connection past the cap.
        assert (await raw_request(server.port, http("GET", "/healthz"))).startswith(b"HTTP/1.1 200")
        reader, writer = first[0]
        writer.write(http("POST", "/v1/predict", json.dumps(PREDICT).encode()))
        async with asyncio.timeout(5):
            assert (await reader.read(65536)).startswith(b"HTTP/1.1 200")
    finally:
        for _, w in first:
            w.close()
    # Once the first connections close, a new one is served again (the server sees the
    # close asynchronously: poll).
    deadline = time.monotonic() + 5
    while True:
        answer = await raw_request(server.port, http("GET", "/admin/routes"))
        if answer.startswith(b"HTTP/1.1 200") or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


async def closed_within(reader: asyncio.StreamReader, within_s: float) -> bytes:
    """What the server sent before it closed the connection, waiting ``within_s`` at most."""
    async with asyncio.timeout(within_s):
        return await reader.read()


HALF_A_HEAD = b"GET /admin/routes HTTP/1.1\r\nHost: x\r\n"


async def test_a_connection_that_sends_no_complete_head_in_time_is_closed(
    tmp_path: Path,
) -> None:
    timeout_s = 0.4
    async with served(limited(tmp_path), keepalive_timeout_s=timeout_s) as port:
        silent = await asyncio.open_connection("127.0.0.1", port)
        half = await asyncio.open_connection("127.0.0.1", port)
        half[1].write(HALF_A_HEAD)
        trickler = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()

        async def trickle() -> None:  # slowloris: one header byte every 50 ms, never done
            trickler[1].write(HALF_A_HEAD)
            while True:
                trickler[1].write(b"X")
                await trickler[1].drain()
                await asyncio.sleep(0.05)

        sender = asyncio.create_task(trickle())
        try:
            for reader, _ in (silent, half, trickler):
                assert await closed_within(reader, timeout_s + 3) == b""  # EOF, no answer
            assert timeout_s <= time.monotonic() - started < timeout_s + 3
            assert not sender.done()  # closed while the client was still sending
            # A request that arrives in time is answered on a fresh connection.
            answer = await raw_request(port, http("GET", "/admin/routes"))
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await sender
            for _, w in (silent, half, trickler):
                w.close()


async def test_an_idle_kept_alive_connection_is_closed_and_a_busy_one_is_not(
    tmp_path: Path,
) -> None:
    timeout_s = 0.4
    async with served(limited(tmp_path), keepalive_timeout_s=timeout_s) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            # Requests closer together than the timeout keep the connection, for longer
            # than the timeout in all.
            started = time.monotonic()
            while True:
                writer.write(http("GET", "/healthz"))
                async with asyncio.timeout(5):
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = re.search(rb"Content-Length: (\d+)", head)
                    assert length is not None
                    await reader.readexactly(int(length[1]))
                assert head.startswith(b"HTTP/1.1 200")
                idle_from = time.monotonic()
                if idle_from - started > 2 * timeout_s:
                    break
                await asyncio.sleep(timeout_s / 4)  # the client's pace, not a synchronisation
            assert await closed_within(reader, timeout_s + 3) == b""
            assert time.monotonic() - idle_from >= timeout_s * 0.9
        finally:
            writer.close()


async def test_idle_connections_no_longer_lock_out_the_others_past_the_cap(
    tmp_path: Path,
) -> None:
    """The lockout: a client holds max_connections idle sockets; once they time out, others
    are served again instead of getting 503 overloaded until they go (3630 s in aiohttp)."""
    timeout_s = 0.4
    settings = limited(tmp_path, max_connections=2)
    async with served(settings, keepalive_timeout_s=timeout_s) as port:
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        idle[1][1].write(HALF_A_HEAD)
        try:
            answer = await raw_request(port, http("GET", "/admin/routes"))
            assert answer.startswith(b"HTTP/1.1 503"), answer[:200]  # the cap holds...
            deadline = time.monotonic() + timeout_s + 3
            while True:  # ...until the idle ones are closed (the server sees it async: poll)
                answer = await raw_request(port, http("GET", "/admin/routes"))
                if answer.startswith(b"HTTP/1.1 200") or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.02)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            for reader, _ in idle:
                assert await closed_within(reader, 1) == b""
        finally:
            for _, w in idle:
                w.close()


async def test_serve_one_closes_idle_connections_long_before_aiohttp_would(
    tmp_path: Path,
) -> None:
    runner = app_runner(build_app(limited(tmp_path), backend=toy_backend()), ServerSettings())
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
        try:
            writer.write(http("GET", "/healthz"))  # answered: the server holds the connection
            async with asyncio.timeout(5):
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            assert runner.server is not None
            (connection,) = runner.server.connections
            assert connection.keepalive_timeout == ServerSettings().keepalive_timeout_s < 120
        finally:
            writer.close()
    finally:
        await runner.cleanup()
