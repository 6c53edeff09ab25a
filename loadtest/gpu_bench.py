"""GPU benchmark: a compute-bound torch MLP on KIND_GPU instances, DLPack in and out.

    python -m loadtest.gpu_bench --dry-run --out /tmp/gpu-repo   # build + validate, no GPU
    python -m loadtest.gpu_bench --json docs/gpu_bench.json       # on a machine with a GPU

Cases (each fresh tritonserver(s) on its own model repository), all in one run by default:
  batching-off / batching-on(-10ms)  dynamic batching's gain (5 ms and 10 ms queue windows)
  instances-2                        two model instances on the same GPU
  shared-gpu / shared-gpu-mps        two models on GPU 0 in one tritonserver, without and
                                     with the MPS daemon
  planned-mps                        the `gpu plan` MPS layout: one tritonserver per model on
                                     GPU 0, each capped by the planner's
                                     CUDA_MPS_ACTIVE_THREAD_PERCENTAGE
  alone-gpu0                         one model with GPU 0 to itself (the dedicated reference)
  dedicated-gpu                      mlp_a alone on GPU 0 and mlp_b on GPU 1 (needs 2 GPUs)
For each: throughput, p50/p99, batch_fill_ratio (Triton's inference count over execution
count, divided by max_batch_size) and mean GPU utilisation (pynvml, sampled during the run).
``--gateway`` adds the same load through a gateway's /v2 surface (`serve --workers N`).
``--dry-run`` builds and checks every case it would run (configs parse as Triton's
ModelConfig, batching windows in 5-10 ms, GPU indexes, MPS shares) and prints the plan.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gateway.progress import QUIET, Progress, Task, add_flag
from gateway.tritonserver import TritonInstallation
from loadtest.stats import summarize

WIDTH, DEPTH, MAX_BATCH = 4096, 8, 64  # ~134 M multiply-adds per row: compute-bound in FP16
STARTUP_S = 30.0  # rough tritonserver + torch start per case, for the dry run's estimate

MODEL_PY = '''"""A torch MLP on the GPU; tensors cross the backend boundary by DLPack (no copy)."""
import json

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        width = int(cfg["parameters"]["width"]["string_value"])
        depth = int(cfg["parameters"]["depth"]["string_value"])
        self.device = torch.device("cuda", int(args["model_instance_device_id"]))
        torch.manual_seed(0)
        layers = []
        for _ in range(depth):
            layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
        self.net = torch.nn.Sequential(*layers).half().to(self.device).eval()

    @torch.inference_mode()
    def execute(self, requests):
        xs = [from_dlpack(pb_utils.get_input_tensor_by_name(r, "INPUT").to_dlpack())
              for r in requests]
        sizes = [x.shape[0] for x in xs]
        y = self.net(torch.cat(xs).to(self.device, torch.float16))
        out = []
        for part in torch.split(y, sizes):
            t = pb_utils.Tensor.from_dlpack("OUTPUT", to_dlpack(part.contiguous()))
            out.append(pb_utils.InferenceResponse(output_tensors=[t]))
        return out
'''


@dataclass(frozen=True)
class ModelSpec:
    name: str
    batching: bool = True
    instances: int = 1
    gpus: tuple[int, ...] = (0,)
    queue_delay_us: int = 5000  # the architecture's 5-10 ms batching budget

    def config(self) -> str:
        batching = (
            f"dynamic_batching {{\n  preferred_batch_size: [ {MAX_BATCH // 2}, {MAX_BATCH} ]\n"
            f"  max_queue_delay_microseconds: {self.queue_delay_us}\n}}\n"
            if self.batching
            else ""
        )
        gpus = ", ".join(str(g) for g in self.gpus)
        return (
            f'name: "{self.name}"\nbackend: "python"\nmax_batch_size: {MAX_BATCH}\n'
            f'input [ {{ name: "INPUT", data_type: TYPE_FP16, dims: [ {WIDTH} ] }} ]\n'
            f'output [ {{ name: "OUTPUT", data_type: TYPE_FP16, dims: [ {WIDTH} ] }} ]\n'
            f"instance_group [ {{ count: {self.instances}, kind: KIND_GPU, gpus: [ {gpus} ] }} ]\n"
            f"{batching}"
            f'parameters {{ key: "width", value: {{ string_value: "{WIDTH}" }} }}\n'
            f'parameters {{ key: "depth", value: {{ string_value: "{DEPTH}" }} }}\n'
            # DLPack in: let the backend hand GPU-resident inputs over without a host copy.
            'parameters { key: "FORCE_CPU_ONLY_INPUT_TENSORS", value: { string_value: "no" } }\n'
        )


@dataclass(frozen=True)
class Case:
    name: str
    models: tuple[ModelSpec, ...]
    mps: bool = False
    min_gpus: int = 1
    #: One tritonserver per model (MPS caps threads per process), with these env vars each.
    server_per_model: bool = False
    model_env: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()

    def env(self, model: str) -> dict[str, str]:
        return dict(dict(self.model_env).get(model, ()))


#: GPU memory of one mlp instance: FP16 weights and biases, plus a CUDA context with torch.
MLP_BYTES = DEPTH * (WIDTH * WIDTH + WIDTH) * 2 + (1 << 30)


def planned_mps_case(models: tuple[str, ...] = ("mlp_a", "mlp_b")) -> Case:
    """What `python -m gateway gpu plan` decides for these models on one GPU, as a case."""
    from gateway.placement.plan import Gpu, ModelDemand, plan

    placed = plan([ModelDemand(m, MLP_BYTES) for m in models], [Gpu(0, "bench GPU", 80 << 30)])
    env = tuple(
        (a.model, (("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", str(a.mps_thread_pct)),))
        for a in placed.assignments()
        if a.mps_thread_pct is not None
    )
    specs = tuple(ModelSpec(a.model, gpus=(a.gpu,)) for a in placed.assignments())
    return Case("planned-mps", specs, mps=True, server_per_model=True, model_env=env)


CASES = (
    Case("batching-off", (ModelSpec("mlp", batching=False),)),
    Case("batching-on", (ModelSpec("mlp"),)),
    Case("batching-on-10ms", (ModelSpec("mlp", queue_delay_us=10_000),)),
    Case("instances-2", (ModelSpec("mlp", instances=2),)),
    Case("shared-gpu", (ModelSpec("mlp_a"), ModelSpec("mlp_b"))),
    Case("shared-gpu-mps", (ModelSpec("mlp_a"), ModelSpec("mlp_b")), mps=True),
    planned_mps_case(),
    Case("alone-gpu0", (ModelSpec("mlp_a"),)),
    Case("dedicated-gpu", (ModelSpec("mlp_a", gpus=(0,)), ModelSpec("mlp_b", gpus=(1,))),
         min_gpus=2),
)  # fmt: skip


def build_repository(case: Case, root: Path) -> Path:
    """Write one model repository for ``case`` under ``root``; returns it."""
    repo = root / case.name
    for spec in case.models:
        (repo / spec.name / "1").mkdir(parents=True, exist_ok=True)
        (repo / spec.name / "config.pbtxt").write_text(spec.config())
        (repo / spec.name / "1" / "model.py").write_text(MODEL_PY)
    return repo


def validate_repository(repo: Path, min_gpus: int = 1) -> list[str]:
    """Parse every config.pbtxt as Triton's ModelConfig and compile every model.py; dynamic
    batching windows must be 5-10 ms and GPU indexes below the case's GPU count."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    names = []
    for cfg in sorted(repo.glob("*/config.pbtxt")):
        msg = text_format.Parse(cfg.read_text(), model_config_pb2.ModelConfig())
        if msg.name != cfg.parent.name:
            raise ValueError(f"{cfg}: name {msg.name!r} is not the folder's")
        if msg.instance_group[0].kind != model_config_pb2.ModelInstanceGroup.KIND_GPU:
            raise ValueError(f"{cfg}: not KIND_GPU")
        if any(g >= min_gpus for group in msg.instance_group for g in group.gpus):
            raise ValueError(f"{cfg}: a GPU index beyond the case's {min_gpus} GPU(s)")
        if msg.HasField("dynamic_batching"):
            delay = msg.dynamic_batching.max_queue_delay_microseconds
            if not 5000 <= delay <= 10_000:
                raise ValueError(f"{cfg}: batching window {delay} us is outside 5-10 ms")
        compile((cfg.parent / "1" / "model.py").read_text(), str(cfg.parent / "1"), "exec")
        names.append(msg.name)
    return names


def validate_case(case: Case, root: Path) -> str:
    """Build and check one case; a line saying what it would run."""
    models = validate_repository(build_repository(case, root), case.min_gpus)
    if case.model_env and not case.mps:
        raise ValueError(f"{case.name}: MPS thread percentages without MPS")
    pct = [int(case.env(m).get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", 0)) for m in models]
    if sum(pct) > 100 or any(not 0 <= p <= 100 for p in pct):
        raise ValueError(f"{case.name}: MPS thread percentages {pct} exceed one GPU")
    parts = []
    for spec in case.models:
        window = f"batching {spec.queue_delay_us / 1000:g} ms" if spec.batching else "no batching"
        env = " ".join(f"{k}={v}" for k, v in case.env(spec.name).items())
        gpus = ",".join(map(str, spec.gpus))
        parts.append(
            f"{spec.name} (gpu {gpus}, x{spec.instances}, {window}{', ' + env if env else ''})"
        )
    servers = len(case.models) if case.server_per_model else 1
    mps = ", MPS" if case.mps else ""
    return f"{case.name}: {'; '.join(parts)}; {servers} tritonserver(s){mps}"


# -- measuring -----------------------------------------------------------------------------
@dataclass
class Result:
    case: str
    path: str  # "triton-grpc" or "gateway-v2"
    model: str
    throughput: float
    p50_ms: float
    p99_ms: float
    errors: int
    batch_fill_ratio: float | None = None
    gpu_util_pct: dict[int, float] = field(default_factory=dict)


class GpuSampler:
    """Mean GPU utilisation per device over a run, sampled by pynvml on a thread."""

    def __init__(self, period_s: float = 0.1) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handles = [
            pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
        ]
        self._samples: list[list[int]] = [[] for _ in self._handles]
        self._period = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            for i, h in enumerate(self._handles):
                self._samples[i].append(self._nvml.nvmlDeviceGetUtilizationRates(h).gpu)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def means(self) -> dict[int, float]:
        return {i: float(np.mean(s)) for i, s in enumerate(self._samples) if s}


async def _load(url: str, model: str, concurrency: int, duration_s: float, grpc_: bool) -> Any:
    rows = np.random.default_rng(0).normal(size=(1, WIDTH)).astype(np.float16)
    lat: list[float] = []
    errors = 0
    end = time.perf_counter() + duration_s
    if grpc_:
        import tritonclient.grpc.aio as client_mod
        from tritonclient.grpc import InferInput
    else:
        import tritonclient.http.aio as client_mod  # type: ignore[no-redef]
        from tritonclient.http import InferInput  # type: ignore[assignment]
    client = client_mod.InferenceServerClient(url)
    inp = InferInput("INPUT", [1, WIDTH], "FP16")
    inp.set_data_from_numpy(rows)

    async def worker() -> None:
        nonlocal errors
        while (t0 := time.perf_counter()) < end:
            try:
                await client.infer(model, [inp])
            except Exception:
                errors += 1
            else:
                lat.append((time.perf_counter() - t0) * 1000)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await client.close()
    return summarize(lat, errors, elapsed)


def _triton_counts(metrics_url: str, model: str) -> tuple[float, float]:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    inf = exe = 0.0
    for line in text.splitlines():
        if f'model="{model}"' not in line:
            continue
        if line.startswith("nv_inference_count{"):
            inf += float(line.rsplit(" ", 1)[1])
        elif line.startswith("nv_inference_exec_count{"):
            exe += float(line.rsplit(" ", 1)[1])
    return inf, exe


@contextlib.contextmanager
def _mps(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    subprocess.run(["nvidia-cuda-mps-control", "-d"], check=True)
    try:
        yield
    finally:
        subprocess.run(["nvidia-cuda-mps-control"], input=b"quit\n", check=False)


@dataclass(frozen=True)
class _EnvInstallation(TritonInstallation):
    """The wheel's tritonserver with extra environment variables (a per-process MPS cap)."""

    extra_env: tuple[tuple[str, str], ...] = ()

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        return {**super().environment(base), **dict(self.extra_env)}


def _servers(case: Case, repo: Path, root: Path) -> dict[str, Any]:
    """model -> its TritonServer (one for all, or one per model with its env), not started."""
    from gateway.tritonserver import TritonOptions, TritonPorts, TritonServer

    if not case.server_per_model:
        server = TritonServer(
            TritonOptions(model_repository=repo, ports=TritonPorts.free()),
            log_file=root / f"{case.name}.log",
            ready_timeout_s=600,
        )
        return {m.name: server for m in case.models}
    base = TritonInstallation.locate()
    out = {}
    for m in case.models:
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        installation = _EnvInstallation(**fields, extra_env=tuple(case.env(m.name).items()))
        out[m.name] = TritonServer(
            TritonOptions(model_repository=repo, ports=TritonPorts.free(),
                          model_control_mode="explicit", load_models=(m.name,)),
            installation=installation,
            log_file=root / f"{case.name}-{m.name}.log",
            ready_timeout_s=600,
        )  # fmt: skip
    return out


def run_case(
    case: Case,
    root: Path,
    args: argparse.Namespace,
    task: Task | None = None,
    progress: Progress = QUIET,
) -> list[Result]:
    task = task or Task()
    task.note(f"{case.name}: starting tritonserver")
    repo = build_repository(case, root)
    results = []
    servers = _servers(case, repo, root)
    unique = list(dict.fromkeys(servers.values()))
    with _mps(case.mps), contextlib.ExitStack() as stack:
        for server in unique:
            stack.enter_context(server)
        gateway = _start_gateway(servers, args.gateway, root) if args.gateway else None
        try:
            paths: list[tuple[str, dict[str, str], bool]] = [
                ("triton-grpc", {m: s.grpc_url for m, s in servers.items()}, True)
            ]
            if gateway:
                paths.append(("gateway-v2", {m: gateway[0] for m in servers}, False))
            for path, urls, grpc_ in paths:
                task.note(f"{case.name}: {path}, {args.duration:g} s of load")
                before = {
                    m.name: _triton_counts(servers[m.name].metrics_url, m.name) for m in case.models
                }
                with GpuSampler() as gpu:
                    summaries = asyncio.run(_all(urls, case, args, grpc_))
                for spec, s in zip(case.models, summaries, strict=True):
                    inf0, exe0 = before[spec.name]
                    inf1, exe1 = _triton_counts(servers[spec.name].metrics_url, spec.name)
                    fill = (inf1 - inf0) / (exe1 - exe0) / MAX_BATCH if exe1 > exe0 else None
                    results.append(
                        Result(case.name, path, spec.name, s.throughput, s.p50, s.p99,
                               s.errors, fill, gpu.means())
                    )  # fmt: skip
                    progress.echo(f"  {results[-1]}")
        finally:
            if gateway:
                gateway[1].terminate()
                gateway[1].wait(30)
    return results


async def _all(
    urls: Mapping[str, str], case: Case, args: argparse.Namespace, grpc_: bool
) -> list[Any]:
    return list(
        await asyncio.gather(
            *(
                _load(urls[m.name], m.name, args.concurrency, args.duration, grpc_)
                for m in case.models
            )
        )
    )


def _start_gateway(
    servers: Mapping[str, Any], workers: int, root: Path
) -> tuple[str, subprocess.Popen]:
    import os

    from gateway.tritonserver import free_port

    port = free_port()
    first = next(iter(servers.values()))
    # One pool entry per distinct tritonserver, each asked only for the models it serves.
    pool: dict[str, list[str]] = {}
    http_of = {server.grpc_url: server.http_url for server in servers.values()}
    for model, server in servers.items():
        pool.setdefault(server.grpc_url, []).append(model)
    spec = [{"name": f"t{i}", "grpc_url": url, "http_url": http_of[url], "models": models}
            for i, (url, models) in enumerate(pool.items())]  # fmt: skip
    env = {
        **os.environ,
        "SWITCHYARD__TRITON__GRPC_URL": first.grpc_url,
        "SWITCHYARD__TRITON__SERVERS": json.dumps(spec),
        "SWITCHYARD__SERVER__PORT": str(port),
        "SWITCHYARD__SERVER__GRPC_PORT": str(free_port()),  # not the default, maybe taken
        "SWITCHYARD__SERVER__HOST": "127.0.0.1",
        "SWITCHYARD__LOG__LEVEL": "warning",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--workers", str(workers)],
        env=env,
        stdout=(root / "gateway.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return f"127.0.0.1:{port}", proc
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("gateway did not start; see gateway.log")


def gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:
        return 0


def table(results: Sequence[Result]) -> str:
    lines = [
        "| case | path | model | inferences/s | p50 ms | p99 ms | errors | batch fill "
        "| GPU util % |",
        "|" + " --- |" * 9,
    ]
    for r in results:
        fill = f"{r.batch_fill_ratio:.2f}" if r.batch_fill_ratio is not None else "-"
        util = ", ".join(f"gpu{i} {u:.0f}" for i, u in r.gpu_util_pct.items())
        lines.append(
            f"| {r.case} | {r.path} | {r.model} | {r.throughput:.0f} | {r.p50_ms:.2f} "
            f"| {r.p99_ms:.2f} | {r.errors} | {fill} | {util} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loadtest.gpu_bench", description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="build and validate repositories only")
    p.add_argument("--out", type=Path, help="where repositories go (default: a temp dir)")
    p.add_argument("--cases", default=",".join(c.name for c in CASES))
    p.add_argument("--concurrency", type=int, default=256, help="clients per model")
    p.add_argument("--duration", type=float, default=15.0, help="seconds of load per case and path")
    p.add_argument("--gateway", type=int, default=0, help="also via a gateway of N workers")
    p.add_argument("--json", type=Path)
    add_flag(p)
    args = p.parse_args(argv)
    progress = Progress.for_stream(flag=args.progress)  # stderr; stdout stays the table
    wanted = [c for c in CASES if c.name in args.cases.split(",")]
    root = args.out or Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    unknown = set(args.cases.split(",")) - {c.name for c in CASES}
    if unknown:
        print(f"error: unknown case(s) {sorted(unknown)}", file=sys.stderr)
        return 2
    if args.dry_run:
        for case in wanted:
            print(validate_case(case, root))
        per_case = args.duration * (2 if args.gateway else 1) + STARTUP_S
        print(f"{len(wanted)} cases, about {len(wanted) * per_case / 60:.1f} min on a GPU "
              f"({args.duration:g} s per load phase + ~{STARTUP_S:g} s start each); "
              f"repositories under {root}")  # fmt: skip
        return 0
    gpus = gpu_count()
    if gpus == 0:
        print("error: no NVIDIA GPU visible (pynvml); use --dry-run here", file=sys.stderr)
        return 2
    results: list[Result] = []
    with progress.task("gpu_bench", len(wanted), "configuration") as task:
        for case in wanted:
            if gpus < case.min_gpus:
                progress.echo(f"skip {case.name}: needs {case.min_gpus} GPUs, have {gpus}")
            elif case.mps and shutil.which("nvidia-cuda-mps-control") is None:
                progress.echo(f"skip {case.name}: nvidia-cuda-mps-control not found")
            else:
                results.extend(run_case(case, root, args, task, progress))
            task.advance()
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
