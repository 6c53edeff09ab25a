"""(4) Redis down: the cache rung is skipped, nothing fails. A real redis-server, killed."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis

from gateway.api.keys import SERVICE
from gateway.app import build_app
from gateway.backends.pool import BackendPool, PoolMember
from gateway.errors import BackendUnavailable
from gateway.tritonserver import free_port
from tests.conftest import unavailable
from tests.unit.fakes import toy_backend, write_repo

ROUTE = "fallback: {cache_ttl_s: 60, default: {score: 0.5, decision: review}}\n"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    client.close()
    yield url, proc
    proc.kill()
    proc.wait(5)


async def predict(client: Any, features: list[float]) -> tuple[int, dict[str, Any]]:
    body = {"model_name": "toy", "features": features}
    resp = await client.post("/v1/predict", data=io.BytesIO(json.dumps(body).encode()))
    return resp.status, await resp.json()


async def gateway_client(tmp_path: Path, aiohttp_client: Any, url: str, name: str):
    settings = write_repo(tmp_path / name, ROUTE)
    settings = replace(settings, redis=replace(settings.redis, url=url))
    backend = toy_backend()
    app = build_app(settings, backend=BackendPool([PoolMember("primary", backend)]))
    return await aiohttp_client(app), backend


async def test_cache_rung_uses_redis_and_is_skipped_when_redis_dies(
    tmp_path: Path, aiohttp_client: Any, redis_server: tuple[str, subprocess.Popen[bytes]]
) -> None:
    url, proc = redis_server
    # 1. A primary answer is written through to Redis.
    first, _ = await gateway_client(tmp_path, aiohttp_client, url, "a")
    status, ok = await predict(first, [1, 2, 3])
    assert status == 200 and ok["fallback_used"] is None
    await first.app[SERVICE].stack.cache.flush()
    check = redis.Redis.from_url(url)
    assert len(check.keys("switchyard:pred:*")) == 1
    check.close()

    # 2. A fresh gateway (empty LRU) with a failing primary answers from Redis.
    second, backend = await gateway_client(tmp_path, aiohttp_client, url, "b")
    backend.fail_with = BackendUnavailable("connection refused")
    status, body = await predict(second, [1, 2, 3])
    assert status == 200, body
    assert body["fallback_used"] == "cache" and body["score"] == pytest.approx(ok["score"])

    # 3. Redis dies: the cache rung is skipped (default answers), nothing fails.
    proc.kill()
    proc.wait(5)
    third, backend = await gateway_client(tmp_path, aiohttp_client, url, "c")
    backend.fail_with = BackendUnavailable("connection refused")
    for features in ([1, 2, 3], [4, 5, 6]):
        status, body = await predict(third, features)
        assert status == 200, body
        assert body["fallback_used"] == "default" and body["decision"] == "review"
    # The primary path with Redis down (a fresh gateway: the failures above, retried,
    # opened the third one's breaker).
    fourth, _ = await gateway_client(tmp_path, aiohttp_client, url, "d")
    status, body = await predict(fourth, [7, 8, 9])
    assert status == 200 and body["fallback_used"] is None
    await fourth.app[SERVICE].stack.cache.flush()  # swallowed, logged once
