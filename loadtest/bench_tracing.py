"""CPU per request of the gateway with tracing off and on (issue 16).

    python -m loadtest.bench_tracing [--requests 3000] [--rounds 3] [--concurrency 16]

The real app (`build_app` on the shipped config, routes and model repository) in this
process, its backend an in-process stand-in that answers at once, so what is measured is the
gateway's own work per `/v1/predict` over HTTP: adapters, route, ladder, coalescer, metrics,
prediction log (spooled to a temporary directory), and the spans. The client runs in this
process too; its share is the same in every mode, so the differences are the tracing cost.

Modes, alternated round by round:
- ``off``: no ``telemetry.otlp_endpoint``: no SDK object on the path;
- ``on, unsampled``: tracing on, ``sample_ratio: 0`` and no traceparent (non-recording spans);
- ``on, sampled``: every request traced and exported with the real OTLP/HTTP exporter to a
  receiver in another process (the exporter's thread is in this process's CPU time).

A script, not a timed test: numbers depend on the machine (docs/benchmarks.md has a run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from gateway.app import build_app
from gateway.config import load_settings
from gateway.log import configure_logging
from gateway.tritonserver import free_port
from gateway.types import Deadline, InferRequest, InferResponse, Tensor

ROOT = Path(__file__).resolve().parents[1]


class InstantBackend:
    """Answers every call at once with a fixed score (the control plane says ready)."""

    async def infer(self, request: InferRequest, deadline: Deadline) -> InferResponse:
        n = len(request.inputs[0].data)
        outputs = {
            "score": Tensor("score", "FP32", np.full((n, 1), 0.25, np.float32)),
            "decision": Tensor("decision", "BYTES", np.array([[b"approve"]] * n, dtype=object)),
            "confidence": Tensor("confidence", "FP32", np.full((n, 1), 0.75, np.float32)),
        }
        return InferResponse(request.model, request.version or "2", outputs, request.request_id)

    async def model_ready(self, model: str, version: str, timeout_s: float) -> bool:
        return True

    async def server_ready(self, timeout_s: float) -> bool:
        return True

    async def close(self) -> None:
        return None


def _receiver(port: int) -> None:
    """An OTLP/HTTP sink in its own process: accepts and drops every export."""

    async def accept(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post("/v1/traces", accept)
    web.run_app(app, host="127.0.0.1", port=port, print=None, handle_signals=False)


async def _run_mode(env: dict[str, str], body: dict[str, Any], requests: int, conc: int) -> float:
    """Process CPU ms per request over ``requests`` predictions (after a warm-up)."""
    with tempfile.TemporaryDirectory() as spool:
        settings = load_settings(
            ROOT / "configs/gateway.yaml",
            env={**env, "SWITCHYARD__REDIS__URL": '""'},
            base_dir=ROOT,
            predlog_spool_dir=spool,
            telemetry_triton_scrape_interval_s=0.0,
            telemetry_gpu=False,
        )
        app = build_app(settings, backend=InstantBackend())  # type: ignore[arg-type]
        server = TestServer(app)
        await server.start_server()
        url = str(server.make_url("/v1/predict"))
        try:
            async with ClientSession() as http:

                async def worker(n: int) -> None:
                    for _ in range(n):
                        async with http.post(url, json=body) as r:
                            assert r.status == 200, await r.text()
                            await r.read()

                await asyncio.gather(*(worker(50) for _ in range(conc)))  # warm-up
                t0 = time.process_time()
                await asyncio.gather(*(worker(requests // conc) for _ in range(conc)))
                cpu = time.process_time() - t0
        finally:
            await server.close()
    return cpu / (requests // conc * conc) * 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    configure_logging("warning", True)  # no access line per request: not what is measured
    body = json.loads((ROOT / "configs/examples/predict-risk.json").read_text())
    port = free_port()
    sink = multiprocessing.get_context("spawn").Process(target=_receiver, args=(port,))
    sink.start()
    endpoint = f"http://127.0.0.1:{port}"
    modes = {
        "off": {},
        "on, unsampled": {
            "SWITCHYARD__TELEMETRY__OTLP_ENDPOINT": endpoint,
            "SWITCHYARD__TELEMETRY__SAMPLE_RATIO": "0",
        },
        "on, sampled": {
            "SWITCHYARD__TELEMETRY__OTLP_ENDPOINT": endpoint,
            "SWITCHYARD__TELEMETRY__SAMPLE_RATIO": "1",
        },
    }
    results: dict[str, list[float]] = {m: [] for m in modes}
    try:
        time.sleep(1.0)  # the sink's start-up; exports before it would only be retried
        for _ in range(args.rounds):
            for mode, env in modes.items():
                ms = asyncio.run(_run_mode(env, body, args.requests, args.concurrency))
                results[mode].append(ms)
                print(f"{mode:15s} {ms:.3f} ms CPU/request", flush=True)
    finally:
        sink.terminate()
        sink.join(5)
    print("\nmedian CPU ms per /v1/predict (gateway + in-process client):")
    base = statistics.median(results["off"])
    for mode, runs in results.items():
        med = statistics.median(runs)
        runs_s = " ".join(f"{x:.3f}" for x in runs)
        print(f"  {mode:15s} {med:.3f}  (+{med - base:.3f} vs off)   runs: {runs_s}")
    if args.json:
        args.json.write_text(json.dumps({"cpu_ms_per_request": results, "pid": os.getpid()}))


if __name__ == "__main__":
    main()
