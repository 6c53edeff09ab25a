"""Hostile request heads over raw sockets: what aiohttp's parser refuses (a stray CR, a
header past the size limits, a TLS hello on the plaintext port) and header bytes that are
not UTF-8 (aiohttp decodes them with surrogateescape). Each gets a JSON 4xx with a code,
never repeats what the client sent, and never puts it in a log."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web

from gateway.app import build_app
from gateway.config import AuthSettings, Settings
from gateway.security.keys import KeyFile, KeyRecord, hash_key, new_key, write_key_file
from gateway.serving import app_runner
from tests.unit.fakes import served, toy_backend, write_repo

PREDICT = json.dumps({"model_name": "toy", "features": [0.1, 0.2, 0.3]}).encode()


def with_server(settings: Settings, **server: Any) -> Settings:
    return dataclasses.replace(settings, server=dataclasses.replace(settings.server, **server))


async def exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, read to EOF: the server answers a request it cannot parse, then closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()


def parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def assert_json_error(answer: bytes, status: int, code: str) -> dict[str, Any]:
    got, headers, body = parse(answer)
    assert got == status, answer[:300]
    assert headers["content-type"].startswith("application/json"), headers
    error = json.loads(body)["error"]
    assert error["code"] == code, error
    return error


async def test_a_key_with_a_stray_cr_is_a_json_400_and_reaches_no_log(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A key read from a CRLF file: curl -H "Authorization: Bearer $(cat key.txt)".
    keys_file = tmp_path / "auth" / "keys.yaml"
    key = new_key()
    write_key_file(keys_file, KeyFile((KeyRecord("ci", hash_key(key), frozenset({"predict"})),)))
    settings = dataclasses.replace(
        write_repo(tmp_path), auth=AuthSettings(enabled=True, keys_file=keys_file)
    )
    caplog.set_level(logging.DEBUG)
    async with served(settings) as port:
        with structlog.testing.capture_logs() as logs:
            answer = await exchange(
                port,
                b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % len(PREDICT)
                + f"Authorization: Bearer {key}\r\r\n\r\n".encode()
                + PREDICT,
            )
    error = assert_json_error(answer, 400, "bad_request")
    assert error == {"code": "bad_request", "message": "malformed HTTP request", "request_id": None}
    captured = capsys.readouterr()
    text = answer.decode("latin-1") + json.dumps(logs, default=str)
    text += captured.out + captured.err + caplog.text
    secret = key[len("sk_") :]
    for i in range(len(secret) - 7):  # not 8 characters of the key, anywhere
        assert secret[i : i + 8] not in text, "part of an API key was written out"
    # One structured warning, without the exception (its text quotes the header line).
    assert [e for e in logs if e["log_level"] != "debug"] == [
        {"event": "bad_http_request", "log_level": "warning", "status": 400,
         "code": "bad_request", "error": "BadHttpMessage", "peer": "127.0.0.1"}
    ]  # fmt: skip
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


FILLER = "q" * 2000  # a run no answer or log line may repeat


def refused(name: str, head: str, status: int, code: str) -> Any:
    return pytest.param(head, status, code, id=name)


@pytest.mark.parametrize(
    ("request_head", "status", "code"),
    [
        refused("header value too long",
                f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: {FILLER}\r\n\r\n",
                431, "header_too_large"),
        refused("header name too long",
                f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-{FILLER}: 1\r\n\r\n",
                431, "header_too_large"),
        refused("request line too long",
                f"GET /healthz?{FILLER} HTTP/1.1\r\nHost: x\r\n\r\n", 431, "header_too_large"),
        refused("too many headers",
                "GET /healthz HTTP/1.1\r\nHost: x\r\n"
                + "".join(f"X-{FILLER[:40]}-{i}: 1\r\n" for i in range(20)) + "\r\n",
                431, "header_too_large"),
        refused("header without a colon",
                f"GET /healthz HTTP/1.1\r\nHost: x\r\n{FILLER[:40]}\r\n\r\n",
                400, "bad_request"),
        refused("control character in a header value",
                f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: {FILLER[:40]}\x01\r\n\r\n",
                400, "bad_request"),
        refused("bad Content-Length",
                f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1{FILLER[:40]}\r\n\r\n",
                400, "bad_request"),
    ],
)  # fmt: skip
async def test_what_the_parser_refuses_is_json_with_a_code_and_no_echo(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, request_head: str, status: int, code: str
) -> None:
    settings = with_server(
        write_repo(tmp_path), max_line_bytes=1024, max_header_bytes=1024, max_headers=16
    )
    caplog.set_level(logging.DEBUG)
    async with served(settings) as port:
        with structlog.testing.capture_logs() as logs:
            answer = await exchange(port, request_head.encode())
            # The connection closed (exchange read to EOF); the next one is served.
            assert (await exchange(port, b"GET /healthz HTTP/1.0\r\n\r\n")).startswith(
                b"HTTP/1.0 200"
            )
    error = assert_json_error(answer, status, code)
    assert error["request_id"] is None
    assert FILLER[:40] not in answer.decode("latin-1")
    assert FILLER[:40] not in json.dumps(logs) + caplog.text
    assert [(e["event"], e["code"]) for e in logs if e["log_level"] == "warning"] == [
        ("bad_http_request", code)
    ]


async def test_a_tls_hello_on_the_plaintext_port_is_a_400_logged_at_debug(
    tmp_path: Path,
) -> None:
    # A TLS client, a scanner: the first bytes are not a method. Expected on a public port,
    # so not worth a warning each (aiohttp's own reasoning; it logs them at debug too).
    hello = bytes.fromhex("16030100a5010000a10303") + b"\x00" * 40
    async with served(write_repo(tmp_path)) as port:
        with structlog.testing.capture_logs() as logs:
            answer = await exchange(port, hello)
    assert_json_error(answer, 400, "bad_request")
    assert [(e["event"], e["log_level"]) for e in logs] == [("bad_http_request", "debug")]


HEX32 = re.compile(r"[0-9a-f]{32}")


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (b"client-id-1", True),
        (b"!" * 128, True),
        (b"r\xe9q", False),  # Latin-1, not UTF-8: a lone surrogate once decoded
        ("r\u00e9q".encode(), False),  # UTF-8, but not ASCII
        (b"a" * 129, False),
        (b"two words", False),
        (b"tab\there", False),
    ],
)
@pytest.mark.parametrize("path", ["/v1/predict", "/v2/models/toy/infer", "/nowhere"])
async def test_a_request_id_that_is_not_visible_ascii_is_replaced(
    tmp_path: Path, aiohttp_server, path: str, sent: bytes, kept: bool
) -> None:
    server = await aiohttp_server(build_app(write_repo(tmp_path), backend=toy_backend()))
    body = (
        json.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 3],
                                "data": [0.1, 0.2, 0.3]}]}).encode()
        if path.startswith("/v2") else PREDICT
    )  # fmt: skip
    with structlog.testing.capture_logs() as logs:
        answer = await exchange(
            server.port,
            f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
            + b"Content-Length: %d\r\nX-Request-ID: %s\r\n\r\n" % (len(body), sent)
            + body,
        )
    status, headers, raw = parse(answer)
    assert status == (404 if path == "/nowhere" else 200), answer[:300]
    assert headers["content-type"].startswith("application/json")
    rid = headers["x-request-id"]
    if kept:
        assert rid == sent.decode()
    else:
        assert HEX32.fullmatch(rid), rid  # a fresh id, as for a request without one
    reply = json.loads(raw)
    if path == "/v1/predict":
        assert reply["request_id"] == rid
    elif path == "/nowhere":
        assert reply["error"]["code"] == "not_found" and reply["error"]["request_id"] == rid
    assert not [e for e in logs if e["log_level"] in ("error", "critical")], logs
    access = [e for e in logs if e["event"] == "request"]
    assert [e["request_id_replaced"] for e in access if "request_id_replaced" in e] == (
        [] if kept else [True]
    )


@pytest.mark.parametrize(
    ("raised", "status", "code"),
    [(RuntimeError("a bug"), 500, "internal_error"), (TimeoutError(), 504, "deadline_exceeded")],
)
async def test_a_failure_past_every_middleware_is_json_too(
    tmp_path: Path, raised: Exception, status: int, code: str
) -> None:
    settings = write_repo(tmp_path)
    app = build_app(settings, backend=toy_backend())

    @web.middleware
    async def broken(request: web.Request, handler: Any) -> web.StreamResponse:
        raise raised  # outside request_context: what aiohttp itself would answer

    app.middlewares.insert(0, broken)
    runner = app_runner(app, settings.server)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        with structlog.testing.capture_logs() as logs:
            answer = await exchange(runner.addresses[0][1], b"GET /healthz HTTP/1.0\r\n\r\n")
    finally:
        await runner.cleanup()
    assert assert_json_error(answer, status, code)["request_id"] is None
    assert [(e["event"], e["log_level"]) for e in logs] == [("unhandled_error", "error")]
