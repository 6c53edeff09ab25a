"""Load-aware routing against least-in-flight, in one run: two real tritonservers, one slow.

    python -m loadtest.pool_bench --duration 10 --concurrency 16 --stop-ms 60 --period-ms 100

The slow server is made slow with a SIGSTOP/SIGCONT duty cycle on its process group
(``--stop-ms`` stopped out of every ``--period-ms``): it answers, but late and in bursts, like
a replica on a throttled or noisy node. The same closed-loop load goes through a BackendPool
(the gateway's pool layer, in process, no HTTP) under each mode in turn (least-in-flight,
load-aware, load-aware with the route's hedging), for ``--rounds`` alternations; the pool
scrapes both servers' /metrics every 250 ms. Prints p50/p99 per mode and the share of
calls the slow server took.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gateway.backends.pool import BackendPool, PoolMember
from gateway.backends.triton import TritonBackend
from gateway.errors import SwitchyardError
from gateway.tritonserver import TritonInstallation, TritonOptions, TritonPorts, TritonServer
from gateway.types import CallPolicy, Deadline, HedgeSpec, InferRequest, Tensor
from loadtest.stats import summarize

#: Routing alone, then with the route's hedging (p95, at most 5 % extra calls) on top.
MODES = (
    ("least_in_flight", None),
    ("load_aware", None),
    ("load_aware", HedgeSpec(quantile=0.95, max_ratio=0.05)),
)
REPO = Path(__file__).resolve().parents[1] / "model_repository"


class Counting:
    """A backend that counts the calls it is given (which server the pool picked)."""

    def __init__(self, inner: TritonBackend) -> None:
        self.inner, self.calls = inner, 0

    async def infer(self, request: InferRequest, deadline: Deadline) -> Any:
        self.calls += 1
        return await self.inner.infer(request, deadline)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def duty_cycle(pid: int, stop_s: float, period_s: float, done: threading.Event) -> None:
    """Stop the process group ``stop_s`` of every ``period_s`` until ``done``."""
    try:
        while not done.is_set():
            os.killpg(pid, signal.SIGSTOP)
            time.sleep(stop_s)
            os.killpg(pid, signal.SIGCONT)
            done.wait(period_s - stop_s)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGCONT)


async def phase(
    servers: Sequence[TritonServer],
    routing: str,
    duration_s: float,
    concurrency: int,
    hedge: HedgeSpec | None = None,
) -> dict[str, Any]:
    backends = [
        Counting(TritonBackend(s.grpc_url, name=n)) for s, n in zip(servers, "fs", strict=True)
    ]
    members = [
        PoolMember(b.inner.name, b, metrics_url=s.metrics_url)  # type: ignore[arg-type]
        for b, s in zip(backends, servers, strict=True)
    ]
    pool = BackendPool(members, routing=routing)
    scrapes = asyncio.create_task(pool.run_load_scrapes(0.25, 0.2))
    rows = np.random.default_rng(0).normal(size=(64, 30)).astype(np.float32)
    policy = CallPolicy(route="risk", policy_version="bench", hedge=hedge)
    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + duration_s

    async def client(k: int) -> None:
        nonlocal errors
        i = k
        while (t0 := time.perf_counter()) < end:
            x = rows[i % len(rows)].reshape(1, 30)
            req = InferRequest("risk", "", (Tensor("features", "FP32", x),), policy=policy)
            i += concurrency
            try:
                await pool.infer(req, Deadline.after(5.0))
            except SwitchyardError:
                errors += 1
            else:
                latencies.append((time.perf_counter() - t0) * 1000.0)

    await asyncio.sleep(0.6)  # two scrapes: the load-aware mode starts with a reading
    started = time.perf_counter()
    end = started + duration_s
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - started
    scrapes.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await scrapes
    await pool.close()
    s = summarize(latencies, errors, elapsed)
    total = sum(b.calls for b in backends) or 1
    return {
        "routing": routing + (" + hedge p95" if hedge else ""),
        "requests": s.requests,
        "errors": s.errors,
        "throughput": round(s.throughput, 1),
        "p50_ms": round(s.p50, 2),
        "p99_ms": round(s.p99, 2),
        "slow_share": round(backends[1].calls / total, 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--stop-ms", type=float, default=60.0)
    p.add_argument("--period-ms", type=float, default=100.0)
    p.add_argument("--rounds", type=int, default=2, help="alternations of the two modes")
    p.add_argument("--json", type=Path, help="write the rows here too")
    args = p.parse_args(argv)
    inst = TritonInstallation.locate()
    logs = Path(tempfile.mkdtemp(prefix="pool-bench-"))
    servers = [
        TritonServer(
            TritonOptions(REPO, TritonPorts.free(), model_control_mode="explicit",
                          load_models=("risk",)),
            installation=inst,
            log_file=logs / f"{n}.log",
        )
        for n in ("fast", "slow")
    ]  # fmt: skip
    done = threading.Event()
    rows: list[dict[str, Any]] = []
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready()
        pid = servers[1].pid
        assert pid is not None
        cycler = threading.Thread(
            target=duty_cycle,
            args=(pid, args.stop_ms / 1e3, args.period_ms / 1e3, done),
            daemon=True,
        )
        cycler.start()
        for _ in range(args.rounds):
            for routing, hedge in MODES:
                row = asyncio.run(phase(servers, routing, args.duration, args.concurrency, hedge))
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        done.set()
        for s in servers:
            s.stop()
    print("| routing | requests | errors | throughput/s | p50 ms | p99 ms | slow server's share |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['routing']} | {r['requests']} | {r['errors']} | {r['throughput']} "
            f"| {r['p50_ms']} | {r['p99_ms']} | {r['slow_share']:.1%} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
