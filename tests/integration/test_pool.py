"""Server pools with two real tritonservers serving the same models: traffic spreads over
both, a server that goes away leaves rotation without failed requests, and comes back."""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from gateway.tritonserver import TritonInstallation, TritonOptions, TritonPorts, TritonServer
from tests.integration.conftest import start_gateway, stop_gateway, wait_http_ok

pytestmark = pytest.mark.slow

MODELS = ("risk", "digits")


def predict(url: str, i: int) -> dict[str, Any]:
    body = json.dumps({"model_name": "risk", "features": [float(i % 7)] * 30}).encode()
    req = urllib.request.Request(f"{url}/v1/predict", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return {"status": r.status, **json.loads(r.read())}


def successes(server: TritonServer) -> int:
    """Rows this server has answered for risk. Rows, not requests: the gateway merges
    concurrent rows into one call (gateway/batching.py), which Triton counts once."""
    with urllib.request.urlopen(f"{server.http_url}/v2/models/risk/stats", timeout=5) as r:
        stats = json.loads(r.read())
    return sum(int(s["inference_count"]) for s in stats["model_stats"])


def servers_state(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/admin/routes", timeout=5) as r:
        return json.loads(r.read())["servers"]


def poll(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def server(repo: Path, inst: TritonInstallation, log: Path, ports: TritonPorts) -> TritonServer:
    options = TritonOptions(repo, ports, model_control_mode="explicit", load_models=MODELS)
    return TritonServer(options, installation=inst, log_file=log)


def test_pool_spreads_load_drops_a_dead_server_and_brings_it_back(
    triton_installation: TritonInstallation, repo_root: Path, tmp_path: Path
) -> None:
    repo = repo_root / "model_repository"
    ports_a, ports_b = TritonPorts.free(), TritonPorts.free()
    a = server(repo, triton_installation, tmp_path / "a.log", ports_a)
    b = server(repo, triton_installation, tmp_path / "b.log", ports_b)
    b2 = server(repo, triton_installation, tmp_path / "b2.log", ports_b)
    gw = None
    try:
        a.start()
        b.start()
        a.wait_ready()
        b.wait_ready()
        env = {
            "SWITCHYARD__TRITON__SERVERS": (
                f"[{{name: a, grpc_url: '{a.grpc_url}', models: [risk, digits, risk_distilled]}},"
                f" {{name: b, grpc_url: '{b.grpc_url}', models: [risk, digits]}}]"
            ),
            "SWITCHYARD__REDIS__URL": "''",
            "SWITCHYARD__LOG__LEVEL": "warning",
        }
        gw = start_gateway(repo_root, tmp_path, a.grpc_url, extra_env=env)
        wait_http_ok(f"{gw.url}/readyz", 60, gw.process, gw.log_file)
        before_a, before_b = successes(a), successes(b)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: predict(gw.url, i), range(400)))
        assert all(r["status"] == 200 and r["fallback_used"] is None for r in answers)
        # Triton counts a request just after answering it: wait for the stats to settle.
        poll(lambda: successes(a) + successes(b) - before_a - before_b >= 400, 5, "stats")
        served_a, served_b = successes(a) - before_a, successes(b) - before_b
        # Least in-flight over both: each server takes a real share of the requests.
        assert min(served_a, served_b) >= 40, (served_a, served_b)

        b.stop()  # b goes away: the pool drops it, a answers everything
        poll(lambda: not servers_state(gw.url)["b"]["ready"], 10, "b to leave rotation")
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: predict(gw.url, i), range(200)))
        assert [r["status"] for r in answers] == [200] * 200
        assert all(r["fallback_used"] is None and r["model_version"] == "2" for r in answers)

        b2.start()  # a new server on b's address: back in rotation once ready
        b2.wait_ready()
        poll(lambda: servers_state(gw.url)["b"]["ready"], 15, "b to rejoin")
        before = successes(b2)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: predict(gw.url, i), range(200)))
        assert successes(b2) - before >= 20
    finally:
        if gw is not None:
            stop_gateway(gw)
        for s in (a, b, b2):
            s.stop()
