"""Side-by-side benchmark: the same workload against Triton directly (gRPC and HTTP) and through
the gateway (/v2 OIP and /v1/predict), in one run, with the same client.

    python -m loadtest.bench --start                       # starts Triton + a gateway itself
    python -m loadtest.bench --start --workers 2 --duration 20
    python -m loadtest.bench --gateway http://127.0.0.1:8080 \\
        --triton-http http://127.0.0.1:8000 --triton-grpc 127.0.0.1:8001 [--gateway-pid P ...]

Phases, for every target in turn: a closed-loop saturation run (``--concurrency`` clients
back to back) and open-loop runs at a fixed arrival rate -- half the reference target's
saturation (the overhead target is stated there) and half the gateway's own. Load comes from
``--procs`` generator processes (asyncio on uvloop), never from the measured processes.
CPU per request is read from /proc (psutil) for the gateway (all workers) and Triton.

``--pin gateway=1,triton=0,client=0`` pins each side (every thread of the process and its
children, like ``taskset -a``) to its own CPUs, so the gateway's overhead can be measured on a
core of its own instead of time-sharing with Triton and the generator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from gateway.progress import QUIET, Progress, Task, add_flag
from loadtest.stats import Summary, open_loop_schedule, split_schedule, summarize

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL, VERSION, FEATURES = "risk", "2", 30
TARGETS = ("triton-grpc", "triton-http", "gateway-grpc", "gateway-v2", "gateway-v1",
           "baseline-v2", "baseline-v1")  # fmt: skip
#: Which process a target's requests cost CPU in (the Triton side is measured for all).
SIDE_OF = {"gateway": "gateway", "baseline": "baseline"}
GATEWAY_PATHS = ("gateway-v2", "gateway-v1", "gateway-grpc")
#: How often a phase's "seconds left" is redrawn while the generators run.
REFRESH_S = 0.5


# -- the workload --------------------------------------------------------------------------
def _rows(n: int = 64) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, FEATURES)).astype(np.float32)


@dataclass(frozen=True)
class Endpoint:
    """One target: where to send, and the pre-built request bodies to cycle through."""

    name: str
    kind: str  # "http" or "grpc"
    url: str  # full URL for http, host:port for grpc
    side: str  # "triton" or "gateway": whose CPU the request costs


def http_bodies(target: str, rows: np.ndarray) -> list[bytes]:
    out = []
    for i, row in enumerate(rows):
        if target.endswith("-v1"):
            body: dict[str, Any] = {
                "model_name": MODEL,
                "entity_id": f"bench-{i}",
                "features": row.tolist(),
            }
        else:
            body = {
                "inputs": [
                    {"name": "features", "shape": [1, FEATURES], "datatype": "FP32",
                     "data": row.tolist()}
                ]
            }  # fmt: skip
        out.append(json.dumps(body).encode())
    return out


def endpoints(
    gateway: str | None,
    triton_http: str | None,
    triton_grpc: str | None,
    gateway_grpc: str | None = None,
    baseline: str | None = None,
) -> dict:
    infer = f"/v2/models/{MODEL}/versions/{VERSION}/infer"
    eps = {}
    if triton_grpc:
        eps["triton-grpc"] = Endpoint("triton-grpc", "grpc", triton_grpc, "triton")
    if triton_http:
        eps["triton-http"] = Endpoint("triton-http", "http", triton_http + infer, "triton")
    if gateway_grpc:
        eps["gateway-grpc"] = Endpoint("gateway-grpc", "grpc", gateway_grpc, "gateway")
    for side, url in (("gateway", gateway), ("baseline", baseline)):
        if url:
            eps[f"{side}-v2"] = Endpoint(f"{side}-v2", "http", url + infer, side)
            eps[f"{side}-v1"] = Endpoint(f"{side}-v1", "http", url + "/v1/predict", side)
    return eps


# -- one generator process -----------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    endpoint: Endpoint
    duration_s: float
    concurrency: int = 0  # closed loop: this many clients back to back
    schedule: tuple[float, ...] = ()  # open loop: send times from the start
    max_in_flight: int = 1024


@dataclass
class JobResult:
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed_s: float = 0.0
    cpu_s: float = 0.0
    first_error: str = ""


def run_job(job: Job) -> JobResult:
    """Entry point of a generator process: one event loop, one client, one job."""
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        loop = asyncio.new_event_loop()
    cpu0 = time.process_time()
    try:
        result = loop.run_until_complete(_run(job))
    finally:
        loop.close()
    result.cpu_s = time.process_time() - cpu0
    return result


async def _run(job: Job) -> JobResult:
    async with Client(job.endpoint, max(job.concurrency, min(job.max_in_flight, 256))) as send:
        if job.concurrency:
            return await _closed_loop(send, job.concurrency, job.duration_s)
        return await _open_loop(send, job.schedule, job.max_in_flight)


class Client:
    """An async context manager yielding `await send(i)`: request i, bodies cycling."""

    def __init__(self, ep: Endpoint, connections: int) -> None:
        self.ep, self.connections = ep, connections
        self._close: Any = None

    async def __aenter__(self) -> Any:
        rows = _rows()
        if self.ep.kind == "grpc":
            import grpc
            from tritonclient.grpc import service_pb2, service_pb2_grpc

            channel = grpc.aio.insecure_channel(self.ep.url)
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            msgs = []
            for row in rows:
                m = service_pb2.ModelInferRequest(model_name=MODEL, model_version=VERSION)
                spec = m.inputs.add()
                spec.name, spec.datatype = "features", "FP32"
                spec.shape.extend([1, FEATURES])
                m.raw_input_contents.append(row.tobytes())
                msgs.append(m)

            async def send_grpc(i: int) -> None:
                await stub.ModelInfer(msgs[i % len(msgs)], timeout=30)

            self._close = channel.close
            return send_grpc
        import aiohttp

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.connections, force_close=False),
            timeout=aiohttp.ClientTimeout(total=30),
        )
        bodies = http_bodies(self.ep.name, rows)
        headers = {"Content-Type": "application/json"}
        url = self.ep.url

        async def send_http(i: int) -> None:
            async with session.post(url, data=bodies[i % len(bodies)], headers=headers) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}")

        self._close = session.close
        return send_http

    async def __aexit__(self, *exc: object) -> None:
        await self._close()


async def _timed(send: Any, i: int, since: float, result: JobResult) -> None:
    """Send request i; record its latency from `since` (perf_counter), or count its error."""
    try:
        await send(i)
    except Exception as exc:
        result.errors += 1
        result.first_error = result.first_error or repr(exc)
    else:
        result.latencies_ms.append((time.perf_counter() - since) * 1000.0)


async def _closed_loop(send: Any, concurrency: int, duration_s: float) -> JobResult:
    result = JobResult()
    clock = time.perf_counter
    end = clock() + duration_s
    counter = iter(range(sys.maxsize))

    async def client() -> None:
        while (t0 := clock()) < end:
            await _timed(send, next(counter), t0, result)

    start = clock()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    result.elapsed_s = clock() - start
    return result


async def _open_loop(send: Any, schedule: Sequence[float], max_in_flight: int) -> JobResult:
    """Send request i at start + schedule[i], whatever happened to earlier ones; latency runs
    from the scheduled time. Beyond ``max_in_flight`` outstanding requests, count errors."""
    result = JobResult()
    clock = time.perf_counter
    in_flight: set[asyncio.Task[None]] = set()

    start = clock()
    for i, offset in enumerate(schedule):
        due = start + offset
        delay = due - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= max_in_flight:
            result.errors += 1
            result.first_error = result.first_error or "client: too many requests in flight"
            continue
        task = asyncio.create_task(_timed(send, i, due, result))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.gather(*in_flight)
    result.elapsed_s = max(clock() - start, schedule[-1] if schedule else 0.0)
    return result


# -- phases across processes ---------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    target: str
    mode: str
    offered: float | None
    summary: Summary
    cpu_ms: dict[str, float]  # side -> CPU milliseconds per successful request


class CpuMeter:
    """CPU seconds used so far by a process and its children (gateway workers), from /proc."""

    def __init__(self, pid: int | None) -> None:
        self.proc = psutil.Process(pid) if pid else None

    def seconds(self) -> float:
        if self.proc is None:
            return float("nan")
        total = 0.0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system
        return total


def run_phase(
    pool: Any,
    procs: int,
    job: Job,
    meters: dict[str, CpuMeter],
    mode: str,
    task: Task | None = None,
    progress: Progress = QUIET,
) -> tuple[Summary, dict[str, float]]:
    if job.concurrency:
        per = max(1, job.concurrency // procs)
        jobs = [Job(job.endpoint, job.duration_s, concurrency=per) for _ in range(procs)]
    else:
        jobs = [
            Job(job.endpoint, job.duration_s, schedule=tuple(part), max_in_flight=job.max_in_flight)
            for part in split_schedule(job.schedule, procs)
        ]
    before = {side: m.seconds() for side, m in meters.items()}
    results = _wait(pool.map_async(run_job, jobs), job, mode, task or Task())
    after = {side: m.seconds() for side, m in meters.items()}
    lat = [x for r in results for x in r.latencies_ms]
    errors = sum(r.errors for r in results)
    elapsed = max(r.elapsed_s for r in results)
    summary = summarize(lat, errors, elapsed)
    ok = max(1, len(lat))
    cpu = {side: (after[side] - before[side]) * 1000.0 / ok for side in meters}
    cpu["client"] = sum(r.cpu_s for r in results) * 1000.0 / ok
    first = next((r.first_error for r in results if r.first_error), "")
    if first:
        progress.echo(f"  {job.endpoint.name} {mode}: {errors} errors, first: {first}")
    return summary, cpu


def _wait(pending: Any, job: Job, mode: str, task: Task) -> list[JobResult]:
    """The phase's results, telling `task` how long the phase has left while it runs."""
    end = time.monotonic() + job.duration_s
    while not pending.ready():
        task.note(f"{job.endpoint.name} {mode}, {max(0.0, end - time.monotonic()):.0f} s left")
        pending.wait(REFRESH_S)
    results: list[JobResult] = pending.get()
    return results


def planned_phases(args: argparse.Namespace, names: Sequence[str]) -> int:
    """How many phases `benchmark` runs for `names`: warm-up, saturation, then open loop."""
    saturated = set(names) if args.repeat > 0 else set()
    if args.closed_only:
        rates = 0
    elif args.rate:
        rates = 1
    else:
        rates = (args.reference in saturated) + any(n in saturated for n in GATEWAY_PATHS)
    return len(names) * (1 + args.repeat + rates * max(1, args.repeat))


def benchmark(
    args: argparse.Namespace,
    eps: dict[str, Endpoint],
    pids: dict[str, int | None],
    progress: Progress = QUIET,
):
    meters = {side: CpuMeter(pid) for side, pid in pids.items()}
    ctx = multiprocessing.get_context("spawn")
    rows: list[Row] = []
    names = [t for t in args.targets if t in eps]
    client_cpus = args.pin.get("client")
    init = (os.sched_setaffinity, (0, client_cpus)) if client_cpus else (None, ())
    with (
        ctx.Pool(args.procs, *init) as pool,
        progress.task("bench", planned_phases(args, names), "phase") as task,
    ):

        def phase(job: Job, mode: str) -> tuple[Summary, dict[str, float]]:
            done = run_phase(pool, args.procs, job, meters, mode, task, progress)
            task.advance()
            return done

        def report(row: Row) -> None:
            progress.echo(_row_line(row))

        for name in names:  # warm up every path (connections, Triton, caches)
            phase(Job(eps[name], args.warmup, concurrency=8), "warm")
        sat: dict[str, float] = {}
        # Round-robin repeats (A B A B ...): on a noisy machine, drift in the background
        # load hits every target alike instead of whichever ran last.
        for rep in range(args.repeat):
            mode = f"closed c={args.concurrency}" + (f" #{rep + 1}" if args.repeat > 1 else "")
            for name in names:
                job = Job(eps[name], args.duration, concurrency=args.concurrency)
                s, cpu = phase(job, "closed")
                sat[name] = max(sat.get(name, 0.0), s.throughput)
                rows.append(Row(name, mode, None, s, cpu))
                report(rows[-1])
        rates = []
        if args.closed_only:
            pass
        elif args.rate:
            rates.append(("given", args.rate))
        else:
            if args.reference in sat:
                rates.append(
                    (f"1/2 {args.reference} sat", args.rate_fraction * sat[args.reference])
                )
            gw = [sat[n] for n in GATEWAY_PATHS if n in sat]
            if gw:
                rates.append(("1/2 gateway sat", args.rate_fraction * min(gw)))
        rng = random.Random(args.seed)
        for label, rate in rates:
            # Round-robin like the closed phases: a p99 over one 10 s phase swings by several
            # ms with the machine's background, so open-loop latencies are compared per run.
            for rep in range(max(1, args.repeat)):
                schedule = tuple(open_loop_schedule(rate, args.duration, rng))
                mode = f"open {label}" + (f" #{rep + 1}" if args.repeat > 1 else "")
                for name in names:
                    job = Job(eps[name], args.duration, schedule=schedule)
                    s, cpu = phase(job, "open")
                    rows.append(Row(name, mode, rate, s, cpu))
                    report(rows[-1])
    return rows


def _row_line(row: Row) -> str:
    s = row.summary
    return (
        f"  {row.target:12} {row.mode:24} {s.throughput:9.0f}/s p50 {s.p50:7.2f} ms "
        f"p99 {s.p99:7.2f} ms err {s.errors}"
    )


# -- report --------------------------------------------------------------------------------
def table(rows: Sequence[Row]) -> str:
    head = (
        "| target | mode | offered/s | achieved/s | errors | p50 ms | p90 ms | p99 ms | p99.9 ms "
        "| gateway CPU ms/req | Triton CPU ms/req | client CPU ms/req |"
    )
    lines = [head, "|" + " --- |" * 12]
    for r in rows:
        s = r.summary
        offered = f"{r.offered:.0f}" if r.offered else "-"
        side = SIDE_OF.get(r.target.split("-")[0])
        gw = r.cpu_ms.get(side, float("nan")) if side else 0.0
        lines.append(
            f"| {r.target} | {r.mode} | {offered} | {s.throughput:.0f} | {s.errors} "
            f"| {s.p50:.2f} | {s.p90:.2f} | {s.p99:.2f} | {s.p999:.2f} "
            f"| {_num(gw)} | {_num(r.cpu_ms.get('triton'))} | {_num(r.cpu_ms.get('client'))} |"
        )
    return "\n".join(lines)


def overhead(rows: Sequence[Row]) -> str:
    """Added latency and throughput ratio of each gateway path over each direct path."""
    pairs = [("gateway-v2", "triton-http"), ("gateway-v1", "triton-http"),
             ("gateway-v1", "triton-grpc"), ("gateway-v2", "triton-grpc"),
             ("gateway-grpc", "triton-grpc"), ("gateway-v2", "baseline-v2"),
             ("gateway-v1", "baseline-v1")]  # fmt: skip
    by = {(r.target, r.mode): r for r in rows}
    lines = [
        "| mode | gateway path | vs direct | added p50 ms | added p99 ms | throughput ratio |",
        "|" + " --- |" * 6,
    ]
    for mode in dict.fromkeys(r.mode for r in rows):
        for gw, direct in pairs:
            a, b = by.get((gw, mode)), by.get((direct, mode))
            if a is None or b is None:
                continue
            ratio = a.summary.throughput / b.summary.throughput if b.summary.throughput else 0
            lines.append(
                f"| {mode} | {gw} | {direct} | {a.summary.p50 - b.summary.p50:+.2f} "
                f"| {a.summary.p99 - b.summary.p99:+.2f} | {ratio:.2f} |"
            )
    return "\n".join(lines)


def cpu_ratios(rows: Sequence[Row]) -> str:
    """Gateway CPU per request of this checkout against the baseline's, mode by mode."""
    by = {(r.target, r.mode): r for r in rows}
    ratios: dict[str, list[float]] = {}
    lines = ["| mode | path | CPU ms/req | baseline CPU ms/req | ratio |", "|" + " --- |" * 5]
    for mode in dict.fromkeys(r.mode for r in rows):
        for path in ("v2", "v1"):
            a, b = by.get((f"gateway-{path}", mode)), by.get((f"baseline-{path}", mode))
            if a is None or b is None:
                continue
            mine, base = a.cpu_ms.get("gateway", math.nan), b.cpu_ms.get("baseline", math.nan)
            lines.append(f"| {mode} | /{path} | {_num(mine)} | {_num(base)} | {mine / base:.2f} |")
            ratios.setdefault(path, []).append(mine / base)
    for path, values in ratios.items():
        if len(values) > 1:
            mid = statistics.median(values)
            lines.append(f"| median of {len(values)} | /{path} | | | {mid:.2f} "
                         f"(min {min(values):.2f}, max {max(values):.2f}) |")  # fmt: skip
    return "\n".join(lines)


def _num(v: float | None) -> str:
    return "-" if v is None or v != v else f"{v:.3f}"


# -- CPU pinning ---------------------------------------------------------------------------
SIDES = ("gateway", "baseline", "triton", "client")


def parse_pin(spec: str) -> dict[str, set[int]]:
    """``gateway=1,triton=0,client=0`` or ``gateway=2-3,triton=0-1`` -> side -> CPUs."""
    pins: dict[str, set[int]] = {}
    for part in filter(None, spec.split(",")):
        side, _, cpus = part.partition("=")
        if side not in SIDES or not cpus:
            raise argparse.ArgumentTypeError(f"--pin: expected side=CPUS with side in {SIDES}")
        pins.setdefault(side, set())
        for item in cpus.split("+"):
            lo, _, hi = item.partition("-")
            pins[side].update(range(int(lo), int(hi or lo) + 1))
    return pins


def pin_tree(pid: int, cpus: set[int]) -> int:
    """Pin every thread of `pid` and of its descendants; returns how many threads were pinned.
    New threads inherit their creator's mask, so pinning after start-up covers later ones."""
    pinned = 0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            tids = [t.id for t in proc.threads()]
        except psutil.NoSuchProcess:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cpus)
                pinned += 1
            except ProcessLookupError:
                continue
    return pinned


# -- the stack -----------------------------------------------------------------------------
def _gateway_process(
    stack: ExitStack, cwd: Path, env: dict[str, str], workers: int, log_path: Path
) -> tuple[str, int]:
    """A `python -m gateway serve` from ``cwd`` (this checkout or the baseline's), ready."""
    import subprocess
    import urllib.request

    from gateway.tritonserver import free_port

    port = free_port()
    env = {**env, "SWITCHYARD__SERVER__HOST": "127.0.0.1", "SWITCHYARD__SERVER__PORT": str(port),
           "PYTHONPATH": str(cwd)}  # fmt: skip
    log = log_path.open("wb")
    stack.callback(log.close)
    gw = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--workers", str(workers)],
        cwd=cwd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def stop() -> None:
        gw.terminate()
        try:
            gw.wait(30)
        except subprocess.TimeoutExpired:
            gw.kill()

    stack.callback(stop)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return url, gw.pid
        except OSError:
            pass
        if gw.poll() is not None or time.monotonic() > deadline:
            tail = log_path.read_bytes()[-3000:].decode(errors="replace")
            raise RuntimeError(f"gateway did not become ready; {log_path} ends:\n{tail}")
        time.sleep(0.1)


def baseline_checkout(ref: str, into: Path) -> Path:
    """The tree of ``ref`` (e.g. main before a change), exported to run side by side."""
    import subprocess

    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", ref],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


@contextmanager
def started_stack(
    workers: int,
    log_level: str,
    workdir: Path,
    baseline: str | None = None,
    gateway_env: Sequence[str] = (),
) -> Iterator[dict[str, Any]]:
    """Triton (explicit mode, every model loaded) and a gateway process in front of it; with
    ``baseline``, a second gateway from that git ref in front of the same Triton.
    ``gateway_env`` (``KEY=VALUE``) goes to the gateway under test only, e.g. a setting that
    the baseline's settings would refuse as unknown."""
    from gateway.tritonserver import TritonOptions, TritonPorts, TritonServer, free_port

    triton = TritonServer(
        TritonOptions(
            model_repository=REPO_ROOT / "model_repository",
            ports=TritonPorts.free(),
            model_control_mode="explicit",
            load_models=("*",),
        ),
        log_file=workdir / "tritonserver.log",
        ready_timeout_s=120,
    )
    # Redis keys of its own: a benchmark's million entries must not crowd (or, by the
    # stream's MAXLEN, trim) the prediction log of a `make run` stack on the same Redis.
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        stack.enter_context(triton)
        stack.callback(_drop_redis_keys, os.environ, prefix)
        env = {
            **os.environ,
            "SWITCHYARD__TRITON__GRPC_URL": triton.grpc_url,
            "SWITCHYARD__TRITON__HTTP_URL": triton.http_url,
            "SWITCHYARD__PREDLOG__SPOOL_DIR": str(workdir / "spool"),
            "SWITCHYARD__PREDLOG__STREAM_PREFIX": prefix,
            "SWITCHYARD__LOG__LEVEL": log_level,
        }
        grpc_port = free_port()
        # The baseline's 1 s default deadline and a latency trigger out of reach, so that a
        # loaded machine measures the path's cost and not the fallback ladder's (risk's own
        # SLO would send requests past 200 ms, or a p99 over 100 ms, to the distilled model).
        mine = {**env, "SWITCHYARD__SERVER__GRPC_PORT": str(grpc_port),
                "SWITCHYARD__FEEDBACK__ANSWERED_PREFIX": f"{prefix}-answered",
                "SWITCHYARD__ROUTING__SLO_DEADLINE_FACTOR": "10",
                "SWITCHYARD__RESILIENCE__FALLBACK__LATENCY__SLO_MULTIPLIER": "10",
                **dict(kv.split("=", 1) for kv in gateway_env)}  # fmt: skip
        url, pid = _gateway_process(stack, REPO_ROOT, mine, workers, workdir / "gateway.log")
        where: dict[str, Any] = {
            "gateway": url,
            "gateway_grpc": f"127.0.0.1:{grpc_port}",
            "triton_http": triton.http_url,
            "triton_grpc": triton.grpc_url,
            "pids": {"gateway": pid, "triton": triton.pid},
        }
        if baseline:
            tree = baseline_checkout(baseline, workdir / "baseline")
            base_env = {**env, "SWITCHYARD__PREDLOG__SPOOL_DIR": str(workdir / "spool-baseline")}
            if "grpc_port" in (tree / "gateway" / "config.py").read_text():
                base_env["SWITCHYARD__SERVER__GRPC_PORT"] = "0"  # a baseline with a gRPC door
            where["baseline"], where["pids"]["baseline"] = _gateway_process(
                stack, tree, base_env, workers, workdir / "baseline.log"
            )
        yield where


def _drop_redis_keys(env: Mapping[str, str], prefix: str) -> None:
    """Delete what the benchmark's gateways wrote to Redis (best effort: Redis may be gone)."""
    import redis

    client = redis.Redis.from_url(
        env.get("SWITCHYARD__REDIS__URL", "redis://127.0.0.1:6379/0"), socket_timeout=5
    )
    try:
        for pattern in (f"{prefix}:*", f"{prefix}-answered:*"):
            keys = list(client.scan_iter(pattern, count=10_000))
            for i in range(0, len(keys), 10_000):
                client.delete(*keys[i : i + 10_000])
    except redis.RedisError:
        pass
    finally:
        client.close()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="loadtest.bench", description=__doc__.splitlines()[0])
    p.add_argument("--start", action="store_true", help="start Triton and a gateway here")
    p.add_argument("--workers", type=int, default=1, help="gateway workers (with --start)")
    p.add_argument("--baseline", metavar="REF", help="with --start: also run a gateway from "
                   "this git ref (e.g. main) in front of the same Triton")  # fmt: skip
    p.add_argument("--gateway-log-level", default="info", help="gateway log level (--start)")
    p.add_argument("--gateway-env", action="append", default=[], metavar="KEY=VALUE",
                   help="with --start: env for the gateway under test (repeatable)")  # fmt: skip
    p.add_argument("--gateway", help="gateway base URL")
    p.add_argument("--triton-http", help="Triton HTTP base URL")
    p.add_argument("--triton-grpc", help="Triton gRPC host:port")
    p.add_argument("--gateway-pid", type=int, help="for CPU per request (workers included)")
    p.add_argument("--triton-pid", type=int)
    p.add_argument("--targets", default=",".join(TARGETS), type=lambda s: s.split(","))
    p.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds per target, unmeasured")
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop clients in all")
    p.add_argument("--procs", type=int, default=1, help="load generator processes")
    p.add_argument("--rate", type=float, help="open-loop rate; default: fractions of saturation")
    p.add_argument("--rate-fraction", type=float, default=0.5)
    p.add_argument("--closed-only", action="store_true", help="saturation phases only")
    p.add_argument("--repeat", type=int, default=1, help="saturation and open-loop phases, "
                   "round-robin (0: no saturation phase, the open loop once)")  # fmt: skip
    p.add_argument("--reference", default="triton-http", help="direct target whose saturation "
                   "sets the open-loop rate")  # fmt: skip
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path, help="write the rows here too")
    p.add_argument(
        "--pin",
        type=parse_pin,
        default={},
        metavar="SIDE=CPUS,...",
        help="pin gateway/triton/client to CPUs, e.g. gateway=1,triton=0,client=0",
    )
    add_flag(p)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with ExitStack() as stack:
        if args.start:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
            where = stack.enter_context(
                started_stack(
                    args.workers, args.gateway_log_level, workdir, args.baseline, args.gateway_env
                )
            )
        else:
            where = {
                "gateway": args.gateway,
                "triton_http": args.triton_http,
                "triton_grpc": args.triton_grpc,
                "pids": {"gateway": args.gateway_pid, "triton": args.triton_pid},
            }
        for side, cpus in args.pin.items():
            if side != "client" and where["pids"].get(side):
                n = pin_tree(where["pids"][side], cpus)
                print(f"# pinned {side} ({n} threads) to CPUs {sorted(cpus)}", file=sys.stderr)
        eps = endpoints(
            where["gateway"], where["triton_http"], where["triton_grpc"],
            where.get("gateway_grpc"), where.get("baseline"),
        )  # fmt: skip
        if not eps:
            print("error: no targets (use --start or give URLs)", file=sys.stderr)
            return 2
        print(
            f"# {os.cpu_count()} CPUs, gateway workers={args.workers if args.start else '?'}, "
            f"{args.procs} generator process(es), {args.duration:.0f} s per phase"
            + (f", client on CPUs {sorted(args.pin['client'])}" if "client" in args.pin else ""),
            file=sys.stderr,
        )
        rows = benchmark(args, eps, where["pids"], Progress.for_stream(flag=args.progress))
    print(table(rows))
    print()
    print(overhead(rows))
    if any(r.target.startswith("baseline") for r in rows):
        print()
        print(cpu_ratios(rows))
    if args.json:
        args.json.write_text(
            json.dumps(
                [{**asdict(r), "throughput": r.summary.throughput} for r in rows],
                indent=1,
            )
        )
    failed = sum(r.summary.errors for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
