"""Two gateway replicas (`python -m gateway serve` on separate ports) over the session Triton,
one Redis and one spool directory (a shared volume): the same entity gets the same version and
the same input the same answer on both; with one SIGKILLed mid-load, its orphaned segments are
claimed and replayed by the live sibling while Redis stays healthy, and after its restart every
accepted request_id (a 200) is in the stream exactly once."""

from __future__ import annotations

import collections
import itertools
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gateway.tritonserver import TritonServer
from tests.integration.conftest import (
    GatewayProcess,
    RedisServer,
    start_gateway,
    stop_gateway,
    wait_http_ok,
)
from tests.integration.test_predlog import gateway_env, poll, predict, stream_entries

pytestmark = pytest.mark.integration


def replica(
    repo_root: Path, workdir: Path, triton: TritonServer, env: dict[str, str]
) -> GatewayProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    gw = start_gateway(repo_root, workdir, triton.grpc_url, env)
    wait_http_ok(f"{gw.url}/readyz", 60, gw.process, gw.log_file)
    return gw


def features(i: int) -> list[float]:
    return [0.05 * ((i + k) % 11) for k in range(30)]


def test_two_replicas_agree_and_a_killed_one_loses_and_duplicates_nothing(
    triton: TritonServer, repo_root: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    spool = tmp_path / "shared-spool"
    env = gateway_env(
        redis_server.url,
        SWITCHYARD__PREDLOG__SPOOL_DIR=str(spool),
        SWITCHYARD__PREDLOG__SEGMENT_MAX_AGE_S="0.2",
        SWITCHYARD__PREDLOG__ORPHAN_SCAN_INTERVAL_S="0.2",
    )
    a = replica(repo_root, tmp_path / "a", triton, env)
    b = replica(repo_root, tmp_path / "b", triton, env)
    try:
        # Determinism: the same entity and input, the same version and answer on each replica.
        for i in range(12):
            entity = f"user-{i}"
            ra, rb = (predict(gw, f"same-{n}-{i}", entity, features=features(i))
                      for n, gw in (("a", a), ("b", b)))  # fmt: skip
            assert ra["fallback_used"] is None and rb["fallback_used"] is None
            assert (ra["model_version"], ra["policy_version"], ra["decision"]) == (
                rb["model_version"], rb["policy_version"], rb["decision"])  # fmt: skip
            assert ra["score"] == pytest.approx(rb["score"], abs=1e-6)

        # Load on both; SIGKILL replica a in the middle of it.
        accepted: list[str] = []
        sent = [f"load-{i}" for i in range(400)]
        targets = itertools.cycle([a, b])
        jobs = [(rid, next(targets)) for rid in sent]

        def call(job: tuple[str, GatewayProcess]) -> str | None:
            rid, gw = job
            if rid == "load-200":
                a.process.kill()  # mid-load, no graceful flush
            try:
                predict(gw, rid, f"user-{rid}")
            except (urllib.error.URLError, ConnectionError, OSError):
                return None  # refused or cut: not accepted
            return rid

        with ThreadPoolExecutor(8) as pool:
            accepted = [r for r in pool.map(call, jobs) if r is not None]
        a.process.wait(10)
        assert 200 <= len(accepted) < len(sent)  # a's later share was refused
        # a's orphaned segments: claimed and replayed by b within seconds, Redis healthy.
        logged_by_now = lambda: {e["request_id"] for e in stream_entries(redis_server.url)}  # noqa: E731
        poll(lambda: set(accepted) <= logged_by_now(), 15, "b did not replay a's segments")
        dead = f"predictions-*-{a.process.pid}-*.jsonl"
        poll(lambda: not list(spool.glob(dead)), 15, "a's segments were not claimed by b")

        a = replica(repo_root, tmp_path / "a2", triton, env)  # the restarted replica
        for i in range(20):
            accepted.append(predict(a, f"after-{i}", f"user-{i}")["request_id"])
        poll(lambda: set(accepted) <= logged_by_now() and not list(spool.glob("*.jsonl")),
             15, "not drained")  # fmt: skip
    finally:
        for gw in (a, b):
            if gw.process.poll() is None:
                stop_gateway(gw)
    logged = [e["request_id"] for e in stream_entries(redis_server.url)]
    counts = collections.Counter(logged)
    assert set(accepted) <= set(counts)  # every 200 is logged...
    assert max(counts.values()) == 1  # ...exactly once
    assert set(counts) <= set(sent) | set(accepted) | {
        f"same-{n}-{i}" for n in "ab" for i in range(12)
    }
