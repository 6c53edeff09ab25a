"""Chaos replay against a running stack (`make run`): SIGKILL the primary Triton under load.

    python -m loadtest.chaos --gateway http://127.0.0.1:8080 --triton-grpc-port 8001 \\
        --requests 3000 --concurrency 32 [--restart]

Sends ``--requests`` predictions at ``--concurrency``, kills the tritonserver listening on
``--triton-grpc-port`` (found through /proc by its command line) once ``--kill-at`` of them
are done, and prints availability (share of 200s; fallback answers count), fallback share,
time to recover (kill -> every answer a 200 again) and, with ``--restart``, the time until the
primary answers again after a fresh tritonserver is started on the same ports.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np


@dataclass(frozen=True)
class Sample:
    sent: float
    done: float
    status: int
    fallback: str | None


def find_triton(grpc_port: int) -> int:
    """PID of the tritonserver whose command line has --grpc-port=<port>."""
    flag = f"--grpc-port={grpc_port}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"tritonserver") and flag in argv:
            return int(entry.name)
    raise SystemExit(f"no tritonserver with {flag.decode()} found")


async def load(args: argparse.Namespace, pid: int) -> tuple[list[Sample], float]:
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(256, 30)).astype(np.float32).tolist()
    samples: list[Sample] = []
    killed_at = [0.0]
    counter = iter(range(args.requests))
    kill_after = int(args.requests * args.kill_at)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def worker() -> None:
            for i in counter:
                body = {"model_name": args.model, "features": rows[i % len(rows)]}
                sent = time.monotonic()
                try:
                    async with session.post(f"{args.gateway}/v1/predict", json=body) as r:
                        payload = await r.json()
                        fallback = payload.get("fallback_used") if r.status == 200 else None
                        samples.append(Sample(sent, time.monotonic(), r.status, fallback))
                except (aiohttp.ClientError, TimeoutError):
                    samples.append(Sample(sent, time.monotonic(), 0, None))
                if len(samples) >= kill_after and not killed_at[0]:
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
                    killed_at[0] = time.monotonic()
                    print(f"killed tritonserver pid {pid} after {len(samples)} requests")

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return samples, killed_at[0]


async def until_primary(args: argparse.Namespace, timeout_s: float) -> float | None:
    started = time.monotonic()
    body = {"model_name": args.model, "features": [0.0] * 30}
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - started < timeout_s:
            async with session.post(f"{args.gateway}/v1/predict", json=body) as r:
                if r.status == 200 and (await r.json()).get("fallback_used") is None:
                    return time.monotonic() - started
            await asyncio.sleep(0.1)
    return None


def report(samples: list[Sample], killed_at: float) -> None:
    total = len(samples)
    ok = sum(s.status == 200 for s in samples)
    fallback = sum(s.fallback is not None for s in samples)
    failed_after = [s.done for s in samples if s.status != 200 and s.sent >= killed_at]
    recover = (max(failed_after) - killed_at) if failed_after else 0.0
    latencies = np.array([s.done - s.sent for s in samples if s.status == 200]) * 1000
    print(f"requests        {total}")
    print(f"availability    {ok / total:.4%}  ({total - ok} not 200)")
    print(f"fallback share  {fallback / total:.2%}")
    print(f"time to recover {recover:.3f} s  (kill -> last non-200 answer)")
    if latencies.size:
        print(f"latency p50/p99 {np.percentile(latencies, 50):.1f} / "
              f"{np.percentile(latencies, 99):.1f} ms")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", default="http://127.0.0.1:8080")
    parser.add_argument("--model", default="risk")
    parser.add_argument("--triton-grpc-port", type=int, default=8001)
    parser.add_argument("--triton-http-port", type=int, default=8000)
    parser.add_argument("--triton-metrics-port", type=int, default=8002)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--kill-at", type=float, default=0.2, help="share done before the kill")
    parser.add_argument("--restart", action="store_true", help="start a new primary afterwards")
    parser.add_argument("--model-repository", default="model_repository")
    args = parser.parse_args(argv)

    pid = find_triton(args.triton_grpc_port)
    samples, killed_at = asyncio.run(load(args, pid))
    report(samples, killed_at)
    if args.restart:
        cmd = [sys.executable, "-m", "gateway", "triton", "--model-repository",
               args.model_repository, "--http-port", str(args.triton_http_port),
               "--grpc-port", str(args.triton_grpc_port), "--metrics-port",
               str(args.triton_metrics_port), "--model-control-mode", "explicit",
               "--load-model", "*", "--log-file", "var/log/tritonserver-restarted.log"]  # fmt: skip
        started = time.monotonic()
        # its own session and no inherited stdout: it outlives this script, like the killed one
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, start_new_session=True)
        back = asyncio.run(until_primary(args, 120))
        if back is None:
            print("primary did not take traffic back within 120 s")
        else:
            print(f"back to primary {time.monotonic() - started:.1f} s after the restart "
                  "began (includes Triton start-up)")  # fmt: skip
        print(f"restarted tritonserver: pid {proc.pid} (stop it with Ctrl-C or kill)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
