"""API keys on the REST API of a real running app (aiohttp test server, FakeBackend): scopes,
the 401/403/429 contract, live revocation and rotation, and keys never reaching a log."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import time
from pathlib import Path

import pytest
import structlog
from aiohttp.test_utils import TestClient

from gateway.app import build_app
from gateway.config import AuthSettings, ConfigError, Settings
from gateway.security.keys import KeyFile, KeyRecord, hash_key, new_key, write_key_file
from tests.unit.fakes import toy_backend, write_repo

PREDICT = {"model_name": "toy", "features": [0.1, 0.2, 0.3]}


def with_auth(settings: Settings, keys_file: Path, **auth: object) -> Settings:
    a = AuthSettings(enabled=True, keys_file=keys_file, reload_interval_s=0.05, **auth)  # type: ignore[arg-type]
    return dataclasses.replace(settings, auth=a)


def add_key(path: Path, key_id: str, scopes: str, **extra: object) -> str:
    from gateway.security.keys import load_key_file

    key = new_key()
    current = load_key_file(path)
    rec = KeyRecord(key_id, hash_key(key), frozenset(scopes.split(",")), **extra)  # type: ignore[arg-type]
    write_key_file(path, KeyFile((*current.keys, rec), current.tenants))
    return key


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    return tmp_path / "auth" / "keys.yaml"


async def start(tmp_path: Path, keys_file: Path, aiohttp_client, **auth: object) -> TestClient:
    settings = with_auth(write_repo(tmp_path), keys_file, **auth)
    return await aiohttp_client(build_app(settings, backend=toy_backend()))


async def call(
    client: TestClient, path: str, key: str | None = None, body: object = PREDICT, **headers: str
) -> tuple[int, dict, dict]:
    if key is not None:
        headers.setdefault("Authorization", f"Bearer {key}")
    if body is None:
        resp = await client.get(path, headers=headers)
    else:
        resp = await client.post(path, data=io.BytesIO(json.dumps(body).encode()), headers=headers)
    text = await resp.text()
    return resp.status, (json.loads(text) if text.startswith("{") else {}), dict(resp.headers)


async def test_auth_off_by_default_keeps_every_endpoint_open(
    tmp_path: Path, aiohttp_client
) -> None:
    client = await aiohttp_client(build_app(write_repo(tmp_path), backend=toy_backend()))
    status, body, _ = await call(client, "/v1/predict")
    assert status == 200, body
    status, _, _ = await call(client, "/admin/routes", body=None)
    assert status == 200


async def test_scopes_401_403_and_health_stays_open(
    tmp_path: Path, keys_file: Path, aiohttp_client
) -> None:
    predict = add_key(keys_file, "p", "predict")
    feedback = add_key(keys_file, "f", "feedback")
    admin = add_key(keys_file, "a", "admin")
    client = await start(tmp_path, keys_file, aiohttp_client)

    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics"):
        status, _, _ = await call(client, path, body=None)
        assert status == 200, path

    status, body, headers = await call(client, "/v1/predict")
    assert status == 401 and body["error"]["code"] == "unauthenticated"
    assert headers["WWW-Authenticate"].startswith("Bearer")
    status, body, headers = await call(client, "/v1/predict", key=predict[:-1])
    assert status == 401 and "WWW-Authenticate" in headers
    status, body, _ = await call(client, "/v1/predict", key=feedback)
    assert status == 403 and body["error"]["code"] == "forbidden"
    status, body, _ = await call(client, "/v1/predict", key=predict)
    assert status == 200, body
    status, body, _ = await call(client, "/v1/predict", **{"X-API-Key": predict})
    assert status == 200, body

    status, body, _ = await call(client, "/v2/models/toy/infer", body={"inputs": []})
    assert status == 401 and body["code"] == "unauthenticated"  # OIP error shape
    status, _, _ = await call(client, "/v2/models/toy", body=None)
    assert status == 200  # metadata open unless auth.protect_metadata

    status, _, _ = await call(client, "/admin/routes", key=predict, body=None)
    assert status == 403
    status, _, _ = await call(client, "/admin/routes", key=admin, body=None)
    assert status == 200


async def test_protected_metrics_and_metadata(
    tmp_path: Path, keys_file: Path, aiohttp_client
) -> None:
    read, admin = add_key(keys_file, "r", "read"), add_key(keys_file, "a", "admin")
    client = await start(
        tmp_path, keys_file, aiohttp_client, protect_metrics=True, protect_metadata=True
    )
    assert (await call(client, "/metrics", body=None))[0] == 401
    assert (await call(client, "/metrics", key=read, body=None))[0] == 403
    assert (await call(client, "/metrics", key=admin, body=None))[0] == 200
    assert (await call(client, "/v2/models/toy", body=None))[0] == 401
    assert (await call(client, "/v2/models/toy", key=read, body=None))[0] == 200
    assert (await call(client, "/healthz", body=None))[0] == 200


async def poll_status(client: TestClient, key: str, want: int, within_s: float) -> float:
    """Seconds until the predict call answers ``want``; fails past ``within_s``."""
    started = time.monotonic()
    while True:
        status, _, _ = await call(client, "/v1/predict", key=key)
        elapsed = time.monotonic() - started
        if status == want:
            return elapsed
        assert elapsed < within_s, f"still {status} after {elapsed:.2f}s"
        await asyncio.sleep(0.01)


async def test_rotation_and_revocation_take_effect_without_restart(
    tmp_path: Path, keys_file: Path, aiohttp_client
) -> None:
    """Default reload interval (0.5 s): revocation must be live within one second."""
    old = add_key(keys_file, "old", "predict")
    settings = write_repo(tmp_path)
    settings = dataclasses.replace(settings, auth=AuthSettings(enabled=True, keys_file=keys_file))
    client = await aiohttp_client(build_app(settings, backend=toy_backend()))
    assert (await call(client, "/v1/predict", key=old))[0] == 200

    new = add_key(keys_file, "new", "predict")  # rotation: both live during the overlap
    await poll_status(client, new, 200, within_s=1.0)
    assert (await call(client, "/v1/predict", key=old))[0] == 200

    from gateway.cli import main

    assert main(["keys", "revoke", "old", "--keys-file", str(keys_file)]) == 0
    await poll_status(client, old, 401, within_s=1.0)
    assert (await call(client, "/v1/predict", key=new))[0] == 200


async def test_a_key_never_reaches_the_logs(
    tmp_path: Path,
    keys_file: Path,
    aiohttp_client,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = add_key(keys_file, "ci", "predict")
    client = await start(tmp_path, keys_file, aiohttp_client)
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as logs:
        for presented in (key, key + "x", key[:-3]):
            await call(client, "/v1/predict", key=presented)
            await call(client, "/admin/routes", key=presented, body=None)
            await call(client, "/v1/predict", **{"X-API-Key": presented})
    captured = capsys.readouterr()
    text = json.dumps(logs, default=str) + captured.out + captured.err + caplog.text
    assert any(e.get("key_id") == "ci" for e in logs)  # who called is logged...
    secret = key[len("sk_") :]
    for i in range(len(secret) - 7):  # ...and no 8 characters of what they presented
        assert secret[i : i + 8] not in text, "part of an API key was logged"


def test_a_bad_key_file_refuses_to_start(tmp_path: Path, keys_file: Path) -> None:
    keys_file.parent.mkdir(parents=True)
    keys_file.write_text("keys: [{id: a, sha256: 123, scopes: [predict]}]")
    with pytest.raises(ConfigError, match="sha256"):
        build_app(with_auth(write_repo(tmp_path), keys_file), backend=toy_backend())


async def test_over_the_rate_429_with_headers_per_key(
    tmp_path: Path, keys_file: Path, aiohttp_client
) -> None:
    """No Redis configured: the per-process limiter; burst 3 at 0.5/s: 3 pass, then 429."""
    slow = add_key(keys_file, "slow", "predict", rate=0.5, burst=3)
    other = add_key(keys_file, "other", "predict", rate=0.5, burst=3)
    client = await start(tmp_path, keys_file, aiohttp_client)
    remaining = []
    for _ in range(3):
        status, body, headers = await call(client, "/v1/predict", key=slow)
        assert status == 200, body
        remaining.append(int(headers["X-RateLimit-Remaining"]))
        assert headers["X-RateLimit-Limit"] == "3"
    assert remaining == [2, 1, 0]
    status, body, headers = await call(client, "/v1/predict", key=slow)
    assert status == 429 and body["error"]["code"] == "rate_limited"
    assert 1 <= int(headers["Retry-After"]) <= 2  # one request's worth at 0.5/s
    assert headers["X-RateLimit-Remaining"] == "0" and int(headers["X-RateLimit-Reset"]) >= 1
    status, _, _ = await call(client, "/v1/predict", key=other)
    assert status == 200  # another key has its own share
    status, _, _ = await call(client, "/healthz", body=None)
    assert status == 200  # health is never limited


V2_INFER = {
    "inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 3], "data": [0, 0, 0]}]
}


@pytest.mark.parametrize(
    ("path", "header"),
    [
        ("/v1/predict", b"Authorization: Bearer sk_\xff"),  # not UTF-8: a lone surrogate
        ("/v1/predict", b"X-API-Key: sk_\xe9"),
        ("/v1/predict", "Authorization: Bearer sk_\u00e9t\u00e9".encode()),  # UTF-8, not ASCII
        ("/v2/models/toy/infer", b"Authorization: Bearer \xc3"),
        ("/admin/routes", b"X-API-Key: \x80\x81"),
    ],
)
async def test_a_key_that_is_not_ascii_is_an_unknown_key(
    tmp_path: Path, keys_file: Path, aiohttp_server, path: str, header: bytes
) -> None:
    add_key(keys_file, "p", "predict,admin")
    settings = with_auth(write_repo(tmp_path), keys_file)
    server = await aiohttp_server(build_app(settings, backend=toy_backend()))
    body = json.dumps(V2_INFER if path.startswith("/v2") else PREDICT).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    with structlog.testing.capture_logs() as logs:
        try:
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
                + b"Content-Length: %d\r\n%s\r\n\r\n%s" % (len(body), header, body)
            )
            async with asyncio.timeout(5):
                answer = await reader.read()
        finally:
            writer.close()
    head, _, raw = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), answer[:300]
    assert b'WWW-Authenticate: Bearer realm="switchyard"' in head
    reply = json.loads(raw)
    code = reply["code"] if path.startswith("/v2") else reply["error"]["code"]
    assert code == "unauthenticated"
    assert not [e for e in logs if e["log_level"] in ("error", "critical")], logs


@pytest.mark.parametrize("presented", ["sk_\udcff", "sk_\u00e9", "sk_a\x00", "sk_a\x7f", "sk_a\n"])
def test_the_key_file_does_not_know_a_key_outside_printable_ascii(presented: str) -> None:
    keys = KeyFile((KeyRecord("p", hash_key("sk_a"), frozenset({"predict"})),))
    assert keys.lookup("sk_a") is not None
    assert keys.lookup(presented) is None
