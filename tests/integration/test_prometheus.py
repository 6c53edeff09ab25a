"""configs/prometheus and configs/grafana against a real Prometheus (Debian's `prometheus`
package: `make deps` installs it): promtool validates config and rules, and a Prometheus
started here scrapes the session gateway and Triton, then answers a PromQL query."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gateway.tritonserver import TritonServer, free_port
from tests.conftest import unavailable
from tests.integration.conftest import GatewayProcess, wait_http_ok
from tests.integration.test_predlog import predict
from tests.promql import dashboards, queries

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} not installed (make deps, or apt-get install prometheus)")
    return path


def test_promtool_accepts_config_and_rules() -> None:
    promtool = tool("promtool")
    for args in (["check", "config", str(CONFIGS / "prometheus/prometheus.yml")],
                 ["check", "rules", str(CONFIGS / "prometheus/rules.yml")]):  # fmt: skip
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_alerts_cover_every_slo() -> None:
    rules = yaml.safe_load((CONFIGS / "prometheus/rules.yml").read_text())
    exprs = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    text = " ".join(exprs.values())
    for needle in ("p99_5m > 0.1", "error_ratio", "fallback_share", "breaker_state",
                   "prediction_log_lag"):  # fmt: skip
        assert needle in text, needle


def test_dashboard_panels_cover_the_required_views() -> None:
    dashes = [json.loads(f.read_text()) for f in (CONFIGS / "grafana/dashboards").glob("*.json")]
    panels = [p for dash in dashes for p in dash["panels"]]
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for metric in ("inference_latency_seconds_bucket", "fallback_total", "breaker_state",
                   "batch_fill_ratio", "gpu_utilization", "gpu_memory_used_bytes",
                   "prediction_log_lag"):  # fmt: skip
        assert metric in exprs, metric
    assert "by (model, arm, le)" in exprs  # latency per arm
    ds = yaml.safe_load((CONFIGS / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    assert all(p["datasource"]["uid"] == uid for p in panels)


@pytest.fixture
def prometheus(gateway: GatewayProcess, triton: TritonServer, tmp_path: Path) -> Iterator[str]:
    binary = tool("prometheus")
    triton_target = urllib.parse.urlsplit(triton.metrics_url).netloc
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(CONFIGS / "prometheus/rules.yml")],
        "scrape_configs": [
            {"job_name": "gateway", "static_configs": [{"targets": [f"127.0.0.1:{gateway.port}"]}]},
            {"job_name": "triton", "static_configs": [{"targets": [triton_target]}]},
        ],
    }  # fmt: skip
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{url}/-/ready", 60, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def query(url: str, promql: str) -> list[dict]:
    q = urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_gateway_latency_and_triton(
    prometheus: str, gateway: GatewayProcess
) -> None:
    for i in range(5):
        predict(gateway, f"prom-{time.time_ns()}-{i}")
    deadline = time.monotonic() + 30
    while True:
        latency = query(prometheus, 'inference_latency_seconds_count{model="risk"}')
        up = {r["metric"]["job"]: r["value"][1] for r in query(prometheus, "up")}
        if (latency and up.get("triton") == "1") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert latency, "the gateway's latency histogram never reached Prometheus"
    assert float(latency[0]["value"][1]) >= 5
    assert {"model", "version", "arm"} <= set(latency[0]["metric"])
    assert up == {"gateway": "1", "triton": "1"}
    buckets = query(prometheus, 'sum by (le) (inference_latency_seconds_bucket{model="risk"})')
    assert any(b["metric"]["le"] == "+Inf" for b in buckets)
    assert query(prometheus, "nv_inference_count")  # Triton's own counters, scraped too


def test_recording_rules_and_dashboard_queries_run_on_real_series(
    prometheus: str, gateway: GatewayProcess
) -> None:
    """rules.yml's SLO ratios come out of the gateway's real series (names and labels line up),
    and every dashboard query runs on a real Prometheus, not only parses."""
    ratios = ('model:inference_error_ratio:rate5m{model="risk"}',
              'model:inference_slow_ratio:rate5m{model="risk"}',
              'model:inference_latency_seconds:p99_5m{model="risk"}')  # fmt: skip
    deadline = time.monotonic() + 30
    while True:  # keep requests coming: rates need an increase between two scrapes
        predict(gateway, f"prom-rules-{time.time_ns()}")
        got = {q: query(prometheus, q) for q in ratios}
        p99 = float(got[ratios[2]][0]["value"][1]) if got[ratios[2]] else math.nan
        if (all(got.values()) and not math.isnan(p99)) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for q, result in got.items():
        assert result, f"{q} was never recorded"
    for q in ratios[:2]:
        assert 0.0 <= float(got[q][0]["value"][1]) <= 1.0
    assert 0.0 < p99 < 5.0
    for dash in dashboards().values():
        for _, expr in queries(dash):
            query(prometheus, expr)  # asserts status "success"
