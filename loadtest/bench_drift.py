"""CPU cost of drift tracking (gateway/drift) per request, in-process, with and without it.

    python -m loadtest.bench_drift [--n 20000] [--requests 3000] [--reps 5]

Two measurements, CPU time (time.process_time) of this one process:
1. the tracker alone: `observe` of one risk/2 row (30 features, the real manifest's training
   histograms) at sample_rate 1.0 and 0.1, `observe_rows` of a 32-row /v2 batch, and one
   `snapshot` (what the background export does every 5 s);
2. the real app (build_app on the shipped model repository and risk route, a FakeBackend from
   tests/unit standing in for Triton, no Redis: the prediction log spools to a temp dir),
   `/v1/predict` through aiohttp's in-process test client, one request at a time. The mode
   changes on every request (off, sample_rate 1.0, the default 0.1, round robin: the
   service's tracker is swapped), so a busy machine slows every mode alike; CPU time per
   request (server and in-process client together) is averaged per mode.
A script, not a timed test: numbers depend on the machine. Figures in docs/observability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from gateway.drift.reference import load_reference
from gateway.drift.tracker import DriftPolicy, DriftTracker

REPO = Path(__file__).resolve().parents[1]


def _cpu_us(fn: Any, n: int) -> float:
    t0 = time.process_time()
    for i in range(n):
        fn(i)
    return (time.process_time() - t0) / n * 1e6


def tracker_costs(n: int) -> dict[str, float]:
    ref = load_reference(REPO / "model_repository", "risk", "2")
    assert ref is not None, "risk/2 has no training histograms"
    rows = np.random.default_rng(1).normal(10, 5, size=(n, len(ref.features))).astype(np.float32)
    out = {}
    for rate in (1.0, 0.1):
        t = DriftTracker(DriftPolicy(sample_rate=rate), lambda m, v: ref, rng=random.Random(1))
        t.observe("risk", "2", rows[0], 0.5)  # the lazy reference load, outside the timing
        observe = t.observe
        out[f"observe_us_rate_{rate:g}"] = _cpu_us(
            lambda i, f=observe: f("risk", "2", rows[i], 0.5), n
        )
    t = DriftTracker(DriftPolicy(sample_rate=1.0), lambda m, v: ref)
    batch = rows[:32]
    out["observe_rows_32_us_rate_1"] = _cpu_us(
        lambda i: t.observe_rows("risk", "2", batch, None), max(1, n // 32)
    )
    out["snapshot_us"] = _cpu_us(lambda i: t.snapshot(), 200)
    return out


async def app_costs(requests: int, reps: int) -> dict[str, float]:
    from aiohttp.test_utils import TestClient, TestServer

    from gateway.api.keys import SERVICE
    from gateway.app import build_app
    from gateway.config import load_settings
    from tests.unit.fake_backend import FakeBackend, FakeModel
    from tests.unit.fakes import toy_fn

    def risk_fn(inputs: Any) -> Any:  # the toy model's outputs for a 30-feature row
        x = inputs["features"]
        return toy_fn({"features": dataclasses.replace(x, data=x.data / 100)})

    manifest = json.loads((REPO / "model_repository/risk/2/manifest.json").read_text())
    names = manifest["input_schema"]["features"]
    rng = np.random.default_rng(2)
    bodies = [
        json.dumps({"model_name": "risk", "entity_id": f"e{i}",
                    "features": dict(zip(names, rng.normal(10, 5, len(names)).tolist(),
                                         strict=True))}).encode()
        for i in range(requests)
    ]  # fmt: skip
    cpu: dict[str, list[float]] = {"off": [], "on_1.0": [], "on_0.1": []}
    with tempfile.TemporaryDirectory() as tmp:
        routes = Path(tmp) / "routes"
        routes.mkdir()
        (routes / "risk.yaml").write_text((REPO / "configs/routes/risk.yaml").read_text())
        base = load_settings(
            None, env={}, routing_model_repository=str(REPO / "model_repository"),
            routing_routes_dir=str(routes), predlog_spool_dir=str(Path(tmp) / "spool"),
        )  # fmt: skip
        models = [FakeModel(m, risk_fn, versions=("1", "2"))
                  for m in ("risk", "risk_distilled", "digits")]  # fmt: skip
        settings = dataclasses.replace(base, drift=DriftPolicy(sample_rate=1.0))
        app = build_app(settings, backend=FakeBackend(models))
        service = app[SERVICE]
        full = service.drift
        tenth = DriftTracker(DriftPolicy(sample_rate=0.1), full.references, rng=random.Random(3))
        modes = [("off", None), ("on_1.0", full), ("on_0.1", tenth)]
        client = TestClient(TestServer(app))
        await client.start_server()
        try:
            for i, body in enumerate(bodies[:60]):  # warm: first-call paths, reference loads
                service.drift = modes[i % 3][1]
                await client.post("/v1/predict", data=io.BytesIO(body))
            for _ in range(reps):
                for i, body in enumerate(bodies):
                    # Interleaved per request: load on the machine hits every mode alike.
                    label, tracker = modes[i % 3]
                    service.drift = tracker
                    t0 = time.process_time()
                    resp = await client.post("/v1/predict", data=io.BytesIO(body))
                    await resp.read()
                    cpu[label].append(time.process_time() - t0)
                    assert resp.status == 200
        finally:
            await client.close()
    mean = {k: statistics.fmean(v) * 1e6 for k, v in cpu.items()}
    sem = {k: statistics.stdev(v) * 1e6 / len(v) ** 0.5 for k, v in cpu.items()}
    return {
        "request_cpu_us_drift_off": mean["off"],
        "request_cpu_us_drift_rate_1": mean["on_1.0"],
        "request_cpu_us_drift_rate_0.1": mean["on_0.1"],
        "added_us_rate_1": mean["on_1.0"] - mean["off"],
        "added_us_rate_0.1": mean["on_0.1"] - mean["off"],
        "stderr_us_of_each_mean": max(sem.values()),
        **{f"median_us_{k}": statistics.median(v) * 1e6 for k, v in cpu.items()},
        "requests_per_mode": float(len(cpu["off"])),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20_000, help="tracker calls per figure")
    p.add_argument("--requests", type=int, default=3000, help="requests per pass")
    p.add_argument("--reps", type=int, default=5, help="passes over the requests")
    args = p.parse_args(argv)
    out = tracker_costs(args.n)
    out.update(asyncio.run(app_costs(args.requests, args.reps)))
    for k, v in out.items():
        print(f"{k:34s} {v:9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
