"""First-request latency of a freshly loaded version, with and without Triton warm-up.

    python -m loadtest.bench_warmup [--rounds 5] [--model risk] [--version 2]

One tritonserver (explicit model control) on a temporary repository holding the model twice:
as shipped (`model_warmup` from its golden inputs) and as `<model>_cold` (the same files, the
warm-up block and files removed). Each round loads one copy, times the load, then the first
and the second request (a golden row, one at a time, gRPC), then unloads it. Prints one line
per case with the median and the worst of the rounds. The numbers go in docs/lifecycle.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from gateway.tritonserver import TritonOptions, TritonPorts, TritonServer


def make_repo(src: Path, dest: Path, model: str) -> None:
    shutil.copytree(src / model, dest / model, ignore=shutil.ignore_patterns("__pycache__"))
    cold = dest / f"{model}_cold"
    shutil.copytree(dest / model, cold)
    shutil.rmtree(cold / "warmup", ignore_errors=True)
    shutil.rmtree(cold / "validation", ignore_errors=True)
    config = (cold / "config.pbtxt").read_text().split("model_warmup")[0]
    (cold / "config.pbtxt").write_text(config.replace(f'name: "{model}"', f'name: "{model}_cold"'))


def measure(client: grpcclient.InferenceServerClient, name: str, version: str, row: np.ndarray):
    start = time.perf_counter()
    client.load_model(name)
    load_s = time.perf_counter() - start
    assert client.is_model_ready(name, version), f"{name}/{version} not ready after load"
    times = []
    for _ in range(2):
        inp = grpcclient.InferInput("features", list(row.shape), "FP32")
        inp.set_data_from_numpy(row)
        start = time.perf_counter()
        client.infer(name, [inp], model_version=version, client_timeout=30)
        times.append((time.perf_counter() - start) * 1000)
    client.unload_model(name)
    deadline = time.monotonic() + 30
    while client.is_model_ready(name, version) and time.monotonic() < deadline:
        time.sleep(0.05)  # unload is asynchronous: wait before the next load
    return load_s, times[0], times[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--model", default="risk")
    p.add_argument("--version", default="2")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    manifest = json.loads(
        (args.repository / args.model / args.version / "manifest.json").read_text()
    )
    row = np.asarray([manifest["golden"]["cases"][0]["features"]], np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        make_repo(args.repository, repo, args.model)
        server = TritonServer(
            TritonOptions(repo, TritonPorts.free(), model_control_mode="explicit"),
            log_file=Path(tmp) / "tritonserver.log",
        )
        with server:
            client = grpcclient.InferenceServerClient(server.grpc_url)
            results: dict[str, list[tuple[float, float, float]]] = {"warm-up": [], "none": []}
            for _ in range(args.rounds):  # interleaved, so drift in machine load hits both
                results["none"].append(measure(client, f"{args.model}_cold", args.version, row))
                results["warm-up"].append(measure(client, args.model, args.version, row))
            client.close()
    print(f"{args.model}/{args.version}, {args.rounds} rounds, one golden row per request (gRPC)")
    print(
        f"{'warm-up':<8} {'load s (median/max)':>20} {'1st request ms':>18} {'2nd request ms':>18}"
    )
    for case, rows in results.items():
        load, first, second = zip(*rows, strict=True)
        print(
            f"{case:<8} {statistics.median(load):>11.2f} / {max(load):<6.2f}"
            f" {statistics.median(first):>9.2f} / {max(first):<6.2f}"
            f" {statistics.median(second):>9.2f} / {max(second):<6.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
