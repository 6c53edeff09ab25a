"""The `scale` scenario: throughput and p99 end to end for each replica count.

    python -m loadtest.scale                                  # here: 1-2 Tritons x 1-2 workers
    python -m loadtest.scale --tritons 1,2 --workers 1,2 --duration 10 --concurrency 32

For every (Tritons, gateway workers) pair it starts one `python -m gateway serve --workers W`
whose pool holds the first T servers (load-aware routing, each server's /metrics scraped),
drives `/v1/predict` from ``--procs`` generator processes (loadtest/bench.py's client), and
reports requests/s, p50, p99 and errors. Closed loop (``--concurrency`` clients) by default;
``--rate`` makes it open loop at that arrival rate, so p99 is measured at a fixed load.

On a GPU machine the same harness targets 10,000/s end to end: point it at Tritons already
running there (``--triton GRPC_HOST:PORT=METRICS_URL``, repeated) instead of starting local
ones, and give the target:

    python -m loadtest.scale --triton 10.0.0.5:8001=http://10.0.0.5:8002/metrics \\
        --triton 10.0.0.6:8001=http://10.0.0.6:8002/metrics --tritons 1,2 --workers 4,8 \\
        --procs 8 --rate 10000 --duration 60 --target-rps 10000 --max-p99-ms 100

With ``--target-rps`` the exit status is 1 unless the largest configuration sustains that
many successful requests/s with p99 under ``--max-p99-ms``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from gateway.tritonserver import TritonOptions, TritonPorts, TritonServer
from loadtest.bench import REPO_ROOT, Endpoint, Job, _gateway_process, run_phase
from loadtest.stats import open_loop_schedule


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tritons", type=_ints, default=[1, 2], help="replica counts, e.g. 1,2")
    p.add_argument("--workers", type=_ints, default=[1, 2], help="gateway worker counts")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per configuration")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop clients in all")
    p.add_argument("--rate", type=float, default=0.0, help="open loop: requests/s in all")
    p.add_argument("--procs", type=int, default=2, help="load generator processes")
    p.add_argument(
        "--triton",
        action="append",
        default=[],
        metavar="GRPC=METRICS_URL",
        help="an existing Triton (repeat); none: start max(--tritons) here",
    )
    p.add_argument("--routing", default="load_aware", choices=("load_aware", "least_in_flight"))
    p.add_argument("--target-rps", type=float, default=0.0)
    p.add_argument("--max-p99-ms", type=float, default=100.0)
    p.add_argument("--json", type=Path, help="write the rows here too")
    return p.parse_args(argv)


def servers_env(servers: Sequence[tuple[str, str]]) -> str:
    """The SWITCHYARD__TRITON__SERVERS value for these (grpc, metrics) pairs."""
    entries = [
        f"{{name: t{i}, grpc_url: '{grpc}', metrics_url: '{metrics}'}}"
        for i, (grpc, metrics) in enumerate(servers)
    ]
    return "[" + ", ".join(entries) + "]"


def _local_tritons(stack: ExitStack, n: int, workdir: Path) -> list[tuple[str, str]]:
    servers = []
    for i in range(n):
        s = TritonServer(
            TritonOptions(REPO_ROOT / "model_repository", TritonPorts.free(),
                          model_control_mode="explicit", load_models=("*",)),
            log_file=workdir / f"triton{i}.log",
            ready_timeout_s=120,
        )  # fmt: skip
        stack.enter_context(s)
        servers.append((s.grpc_url, s.metrics_url))
    return servers


def measure(
    pool: Any, args: argparse.Namespace, url: str, duration_s: float
) -> dict[str, float | int]:
    ep = Endpoint("gateway-v1", "http", url + "/v1/predict", "gateway")
    if args.rate > 0:
        schedule = tuple(open_loop_schedule(args.rate, duration_s, random.Random(0)))
        job = Job(ep, duration_s, schedule=schedule, max_in_flight=4096)
    else:
        job = Job(ep, duration_s, concurrency=args.concurrency)
    s, _ = run_phase(pool, args.procs, job, {}, "scale")
    return {
        "requests": s.requests,
        "errors": s.errors,
        "rps": round(s.throughput, 1),
        "p50_ms": round(s.p50, 2),
        "p99_ms": round(s.p99, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="scale-"))
    rows: list[dict[str, Any]] = []
    ctx = multiprocessing.get_context("spawn")
    with ExitStack() as stack, ctx.Pool(args.procs) as procs:
        if args.triton:
            servers = [tuple(t.split("=", 1)) for t in args.triton]
        else:
            servers = _local_tritons(stack, max(args.tritons), workdir)
        if max(args.tritons) > len(servers):
            raise SystemExit(f"--tritons asks for {max(args.tritons)}, have {len(servers)}")
        for t in args.tritons:
            for w in args.workers:
                with ExitStack() as gw:
                    env = {
                        **os.environ,
                        "SWITCHYARD__TRITON__SERVERS": servers_env(servers[:t]),  # type: ignore[arg-type]
                        "SWITCHYARD__TRITON__ROUTING": args.routing,
                        "SWITCHYARD__REDIS__URL": "",
                        "SWITCHYARD__PREDLOG__SPOOL_DIR": str(workdir / f"spool-{t}-{w}"),
                        "SWITCHYARD__LOG__LEVEL": "warning",
                        "SWITCHYARD__SERVER__GRPC_PORT": "0",
                    }
                    url, _ = _gateway_process(gw, REPO_ROOT, env, w, workdir / f"gw-{t}-{w}.log")
                    if args.warmup > 0:
                        measure(procs, args, url, args.warmup)
                    row = {"tritons": t, "workers": w, **measure(procs, args, url, args.duration)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.target_rps:
        best = rows[-1]
        ok = best["rps"] >= args.target_rps and best["p99_ms"] <= args.max_p99_ms
        verdict = "met" if ok else "NOT met"
        print(
            f"target {args.target_rps:.0f}/s at p99 <= {args.max_p99_ms:.0f} ms: {verdict} "
            f"({best['rps']}/s, p99 {best['p99_ms']} ms)"
        )
        return 0 if ok else 1
    return 0


def table(rows: Sequence[dict[str, Any]]) -> str:
    out = [
        "| Tritons | gateway workers | requests/s | p50 ms | p99 ms | errors |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    out += [
        f"| {r['tritons']} | {r['workers']} | {r['rps']} | {r['p50_ms']} | {r['p99_ms']} "
        f"| {r['errors']} |"
        for r in rows
    ]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
