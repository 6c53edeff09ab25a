"""Chaos with real processes: a primary tritonserver killed or hung under load, overload.

One module-wide stack: a primary Triton serving ``risk``, a second Triton serving the
fallback ``risk_distilled``, and a gateway process pooling both. The session's shared
``triton`` is never touched. Tests run in file order: hang, overload, then kill + restart.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from gateway.tritonserver import TritonInstallation, TritonOptions, TritonPorts, TritonServer
from tests.integration.conftest import GatewayProcess, start_gateway, stop_gateway, wait_http_ok

pytestmark = pytest.mark.slow

#: /readyz needs every route's champion: digits rides along on the primary.
PRIMARY_MODELS = ("risk", "digits")
ROWS = load_breast_cancer().data[:200].astype(np.float32).tolist()


@dataclass
class Stack:
    repo: Path
    primary: TritonServer
    fallback: TritonServer
    gateway: GatewayProcess
    env: dict[str, str]
    workdir: Path
    log_dir: Path
    extra: list[TritonServer] = field(default_factory=list)


def _triton(repo: Path, models: tuple[str, ...], installation: TritonInstallation, log: Path,
            ports: TritonPorts | None = None) -> TritonServer:  # fmt: skip
    return TritonServer(
        TritonOptions(
            model_repository=repo,
            ports=ports or TritonPorts.free(),
            model_control_mode="explicit",
            load_models=models,
        ),
        installation=installation,
        log_file=log,
        ready_timeout_s=120,
    )


@pytest.fixture(scope="module")
def stack(
    triton_installation: TritonInstallation,
    repo_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("chaos-logs")
    repo = repo_root / "model_repository"
    primary = _triton(repo, PRIMARY_MODELS, triton_installation, logs / "primary.log")
    fallback = _triton(repo, ("risk_distilled",), triton_installation, logs / "fallback.log")
    primary.start()
    fallback.start()  # both load at once
    s = None
    try:
        primary.wait_ready()
        fallback.wait_ready()
        env = {
            "SWITCHYARD__TRITON__SERVERS": (
                f"[{{name: primary, grpc_url: '{primary.grpc_url}', models: [risk, digits]}},"
                f" {{name: fallback, grpc_url: '{fallback.grpc_url}', models: [risk_distilled]}}]"
            ),
            "SWITCHYARD__REDIS__URL": "''",  # YAML for "": no Redis, the log spools to disk
            "SWITCHYARD__LOG__LEVEL": "warning",
        }
        workdir = tmp_path_factory.mktemp("chaos-gw")
        gw = start_gateway(repo_root, workdir, primary.grpc_url, extra_env=env)
        s = Stack(repo, primary, fallback, gw, env, workdir, logs)
        wait_http_ok(f"{gw.url}/readyz", 60, gw.process, gw.log_file)
        yield s
    finally:
        if s is not None:
            stop_gateway(s.gateway)
            for extra in s.extra:
                extra.stop()
        primary.stop()
        fallback.stop()


@dataclass(frozen=True)
class Result:
    sent_at: float
    done_at: float
    status: int
    body: dict[str, Any]
    retry_after: str | None


async def run_load(
    url: str,
    total: int,
    concurrency: int,
    deadline_ms: int | None = None,
    on_progress: Any = None,
    shed_pause_s: float = 0.0,
    v2_share: int = 0,
) -> list[Result]:
    """``total`` /v1/predict calls, ``concurrency`` at a time; ``on_progress(n_done)``.
    A shed client waits ``shed_pause_s`` before its next call (a client honouring
    Retry-After, scaled down), so on 2 cores the test's own spinning does not starve the
    gateway it measures. With ``v2_share`` N, every Nth call is an OIP /v2 infer of the same
    row and entity (its answer read into the /v1 shape: fallback_used, model_version)."""
    results: list[Result] = []
    counter = iter(range(total))
    ctx = {"deadline_ms": deadline_ms} if deadline_ms else {}
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def worker() -> None:
            for i in counter:
                sent = time.monotonic()
                if v2_share and i % v2_share == 0:
                    async with session.post(
                        f"{url}/v2/models/risk/infer", json=v2_body(i), headers=v2_headers(ctx)
                    ) as r:
                        payload = v1_shape(await r.json(), r.status, sent)
                else:
                    body = {"model_name": "risk", "entity_id": f"e{i}", "features": ROWS[i % 200],
                            "context": ctx}  # fmt: skip
                    async with session.post(f"{url}/v1/predict", json=body) as r:
                        payload = await r.json()
                results.append(
                    Result(sent, time.monotonic(), r.status, payload,
                           r.headers.get("Retry-After"))
                )  # fmt: skip
                if on_progress is not None:
                    await on_progress(len(results))
                if shed_pause_s and results[-1].status == 503:
                    await asyncio.sleep(shed_pause_s)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def v2_body(i: int) -> dict[str, Any]:
    row = ROWS[i % 200]
    return {
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 30], "data": row}],
        "parameters": {"entity_id": f"e{i}"},
    }


def v2_headers(ctx: dict[str, Any]) -> dict[str, str]:
    return {"X-Deadline-Ms": str(ctx["deadline_ms"])} if ctx else {}


def v1_shape(body: dict[str, Any], status: int, sent: float) -> dict[str, Any]:
    """A /v2 answer in the fields these tests read of a /v1 one."""
    if status != 200:
        return {"error": {"code": body.get("code")}}
    params = body.get("parameters") or {}
    return {
        "fallback_used": params.get("fallback_used"),
        "model_version": body["model_version"],
        "latency_ms": (time.monotonic() - sent) * 1000.0,
        "protocol": "v2",
    }


def breaker_state(metrics_text: str, server: str, model: str) -> float | None:
    for line in metrics_text.splitlines():
        if (
            line.startswith("breaker_state{")
            and f'server="{server}"' in line
            and f'model="{model}"' in line
        ):
            return float(line.split()[-1])
    return None


async def fetch_metrics(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(f"{url}/metrics") as r:
        return await r.text()


async def wait_primary_back(url: str, timeout_s: float) -> float:
    """Seconds until a request is answered by the primary again (fallback_used null)."""
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - started < timeout_s:
            body = {"model_name": "risk", "features": ROWS[0]}
            async with session.post(f"{url}/v1/predict", json=body) as r:
                payload = await r.json()
            if r.status == 200 and payload["fallback_used"] is None:
                return time.monotonic() - started
            await asyncio.sleep(0.1)
    raise AssertionError(f"traffic did not return to the primary within {timeout_s} s")


def p99(values: list[float]) -> float:
    return float(np.percentile(np.array(values), 99))


async def test_hung_primary_requests_meet_their_deadline_via_fallback(stack: Stack) -> None:
    """(2) SIGSTOP: the server holds its connections but never answers."""
    url = stack.gateway.url
    pgid = stack.primary.pid
    assert pgid is not None
    deadline_ms = 500
    os.killpg(pgid, signal.SIGSTOP)
    try:
        results = await run_load(url, total=300, concurrency=16, deadline_ms=deadline_ms)
    finally:
        os.killpg(pgid, signal.SIGCONT)
    assert [r.status for r in results if r.status != 200] == []
    rungs = Counter(r.body["fallback_used"] for r in results)
    assert set(rungs) == {"fallback_model"}, rungs
    assert {r.body["model_version"] for r in results} == {"1"}  # risk_distilled's version
    # the gateway's own measure stays inside the deadline; the client's adds its own queueing
    assert max(r.body["latency_ms"] for r in results) <= deadline_ms
    assert p99([r.done_at - r.sent_at for r in results]) <= deadline_ms / 1000 + 0.25
    await wait_primary_back(url, 30)


async def test_overload_is_shed_with_retry_after_and_admitted_latency_stays_flat(
    stack: Stack, repo_root: Path
) -> None:
    """(3) Past the admission limit: 503 + Retry-After at once, admitted p99 within SLO."""
    env = {
        **stack.env,
        "SWITCHYARD__RESILIENCE__ADMISSION": (
            "{max_in_flight_per_backend: 4, max_queue: 4, max_queue_wait_s: 0.02, retry_after_s: 1}"
        ),
        # Admission alone is under test: queueing at 3x capacity pushes the primary's p99
        # over risk's 100 ms SLO, and the latency trigger would divert to the ladder instead.
        "SWITCHYARD__RESILIENCE__FALLBACK": "{latency: {min_samples: 1000000000}}",
    }
    workdir = stack.workdir / "overload"
    workdir.mkdir()
    gw = start_gateway(repo_root, workdir, stack.primary.grpc_url, env)
    try:
        wait_http_ok(f"{gw.url}/readyz", 60, gw.process, gw.log_file)
        await run_load(gw.url, total=50, concurrency=2)  # warm: connections, first calls
        results = await run_load(gw.url, total=1000, concurrency=24, shed_pause_s=0.02)
        async with aiohttp.ClientSession() as session:
            text = await fetch_metrics(session, gw.url)
    finally:
        stop_gateway(gw)
    shed = [r for r in results if r.status == 503]
    ok = [r for r in results if r.status == 200]
    assert len(shed) + len(ok) == len(results)
    assert len(shed) >= 50, f"only {len(shed)} shed at 3x the admission limit"
    assert all(r.retry_after == "1" and r.body["error"]["code"] == "overloaded" for r in shed)
    assert len(ok) >= 40, f"only {len(ok)} admitted"  # closed loop: shed clients come back fast
    rungs = Counter(r.body["fallback_used"] for r in ok)
    assert set(rungs) == {None}, rungs  # shedding is not a fallback
    admitted_p99_ms = p99([r.body["latency_ms"] for r in ok])
    print(f"overload: {len(ok)} admitted (p99 {admitted_p99_ms:.1f} ms), {len(shed)} shed")
    assert admitted_p99_ms <= 100, f"admitted p99 {admitted_p99_ms:.1f} ms over the 100 ms SLO"
    assert 'shed_total{backend="primary"}' in text


async def test_killed_primary_keeps_answering_and_traffic_returns(stack: Stack) -> None:
    """(1) SIGKILL under load: every request answered, >= 99.9 % 200, breaker open < 1 s;
    restart it and traffic returns to the primary within 30 s. A third of the calls are OIP
    /v2 infers, which the distilled model answers just the same."""
    url = stack.gateway.url
    total, kill_at = 3000, 600
    killed_at: list[float] = []
    opened_at: list[float] = []

    async def watch_breaker() -> None:
        async with aiohttp.ClientSession() as session:
            while not killed_at:  # noqa: ASYNC110 - set by the load's progress callback
                await asyncio.sleep(0.01)
            while time.monotonic() - killed_at[0] < 5:
                text = await fetch_metrics(session, url)
                if breaker_state(text, "primary", "risk") == 2:
                    opened_at.append(time.monotonic())
                    return
                await asyncio.sleep(0.02)

    async def progress(done: int) -> None:
        if done >= kill_at and not killed_at:
            pgid = stack.primary.pid
            assert pgid is not None
            os.killpg(pgid, signal.SIGKILL)
            killed_at.append(time.monotonic())

    watcher = asyncio.create_task(watch_breaker())
    results = await run_load(url, total=total, concurrency=32, on_progress=progress, v2_share=3)
    await watcher
    assert len(results) == total
    ok = sum(r.status == 200 for r in results)
    assert ok / total >= 0.999, f"{total - ok} of {total} failed"
    after = [r for r in results if r.sent_at > killed_at[0] + 0.5]
    assert after and all(r.body.get("fallback_used") == "fallback_model" for r in after)
    v2_after = [r for r in after if r.body.get("protocol") == "v2"]
    assert len(v2_after) >= len(after) // 4  # /v2 went through the ladder too
    assert {r.body["model_version"] for r in after} == {"1"}  # risk_distilled's version
    assert opened_at, "breaker for (primary, risk) never reported open"
    assert opened_at[0] - killed_at[0] <= 1.0

    # Restart on the same ports: the pool's health check and half-open probes bring it back.
    stack.primary.stop()
    log = stack.log_dir / "primary-restarted.log"
    installation = TritonInstallation.locate()
    restarted = _triton(stack.repo, PRIMARY_MODELS, installation, log, ports=stack.primary.ports)
    stack.extra.append(restarted)
    restarted.start()
    restarted.wait_ready()
    back_after_s = await wait_primary_back(url, 30)
    assert back_after_s <= 30
