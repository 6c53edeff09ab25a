"""Access lines: every error and slow request, fast successes up to a per-second budget."""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from gateway.access_log import AccessLogPolicy, AccessSampler
from gateway.app import build_app
from gateway.clock import FakeClock
from gateway.request_ids import RequestIds
from tests.unit.fakes import toy_backend, write_repo


class Count:
    def __init__(self) -> None:
        self.n = 0.0

    def inc(self, amount: float = 1) -> None:
        self.n += amount


def test_no_budget_keeps_every_line() -> None:
    sampler = AccessSampler(AccessLogPolicy(), FakeClock())
    assert all(sampler.keep(200, 1.0) for _ in range(1000))


def test_fast_successes_over_the_budget_are_counted_not_kept() -> None:
    clock, skipped = FakeClock(), Count()
    sampler = AccessSampler(AccessLogPolicy(max_lines_per_s=2, slow_ms=100), clock, skipped)
    assert [sampler.keep(200, 1.0) for _ in range(5)] == [True, True, False, False, False]
    assert skipped.n == 3
    clock.advance(0.99)  # the same window
    assert not sampler.keep(200, 1.0)
    clock.advance(0.01)  # a new one
    assert [sampler.keep(200, 1.0) for _ in range(3)] == [True, True, False]
    assert skipped.n == 5


def test_errors_and_slow_requests_are_always_kept_and_use_no_budget() -> None:
    clock, skipped = FakeClock(), Count()
    sampler = AccessSampler(AccessLogPolicy(max_lines_per_s=1, slow_ms=100), clock, skipped)
    assert sampler.keep(200, 1.0)
    assert not sampler.keep(200, 99.9)
    for status in (400, 404, 429, 500, 503, 504):
        assert sampler.keep(status, 0.1)
    assert sampler.keep(200, 100.0) and sampler.keep(200, 5000.0)
    assert skipped.n == 1


async def _client(tmp_path: Path, aiohttp_client, policy: AccessLogPolicy) -> TestClient:
    settings = write_repo(tmp_path)
    settings = dataclasses.replace(settings, log=dataclasses.replace(settings.log, access=policy))
    # A clock that never moves: all requests fall in one budget window.
    return await aiohttp_client(build_app(settings, backend=toy_backend(), clock=FakeClock()))


async def _predict(client: TestClient, features: object) -> int:
    body = json.dumps({"model_name": "toy", "features": features}).encode()
    return (await client.post("/v1/predict", data=io.BytesIO(body))).status


async def test_the_app_logs_errors_always_and_fast_successes_within_the_budget(
    tmp_path: Path, aiohttp_client
) -> None:
    client = await _client(tmp_path, aiohttp_client, AccessLogPolicy(max_lines_per_s=1))
    with capture_logs() as logs:
        statuses = [await _predict(client, [1, 2, 3]) for _ in range(3)]
        statuses.append(await _predict(client, [1, 2]))  # wrong length: 422
    assert statuses == [200, 200, 200, 422]
    access = [e for e in logs if e["event"] == "request"]
    assert [e["status"] for e in access] == [200, 422]
    assert access[1]["error"] and access[0]["model"] == "toy"
    text = await (await client.get("/metrics")).text()
    assert "access_log_skipped_total 2.0" in text


async def test_the_app_logs_slow_requests_over_the_budget(tmp_path: Path, aiohttp_client) -> None:
    # slow_ms=0: every request counts as slow, so none is skipped.
    client = await _client(tmp_path, aiohttp_client, AccessLogPolicy(1, slow_ms=0.0))
    with capture_logs() as logs:
        for _ in range(3):
            assert await _predict(client, [1, 2, 3]) == 200
    assert [e["status"] for e in logs if e["event"] == "request"] == [200, 200, 200]


def test_request_ids_are_distinct_hex_across_draws() -> None:
    draws = []

    def urandom(n: int) -> bytes:
        draws.append(n)
        return os.urandom(n)

    ids = RequestIds(urandom, per_draw=4)
    got = [ids() for _ in range(10)]
    assert len(set(got)) == 10
    assert all(len(i) == 32 and int(i, 16) >= 0 and i == i.lower() for i in got)
    assert draws == [64, 64, 64]  # 4 ids per draw: 3 draws for 10


def test_a_forked_child_never_hands_out_the_parents_ids() -> None:
    ids = RequestIds()
    ids()  # the parent holds unused ids now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first id, then exit without running pytest's teardown
        os.write(write, ids().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 32 and child != ids()
