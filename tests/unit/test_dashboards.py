"""The Grafana dashboards in configs/grafana/dashboards hold queries that work: each panel's
and annotation's PromQL parses (promtool, on a rules file made of them), names only metrics
the gateway or Triton export or that rules.yml records, and each dashboard has the views the
specs ask of it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.promql import dashboards, known_names, metric_names, promtool, queries

#: Per dashboard uid: names its queries must use (the seed's list of views).
REQUIRED = {
    "switchyard-executive": {
        "model:inference_error_ratio:rate1h",  # availability and its error budget
        "model:inference_slow_ratio:rate1h",  # latency error budget
        "model:inference_latency_seconds:p95_5m",
        "model:inference_latency_seconds:p99_5m",
        "nv_gpu_utilization",  # cost per inference: GPUs
        "model_accuracy",
        "canary_accuracy_delta",
    },
    "switchyard-oncall": {
        "inference_requests_total",  # rate and errors by code
        "inference_latency_seconds_bucket",  # p95 and p99
        "feature_lookups_total",
        "route_reloads_total",  # recent deploys
        "fallback_total",
        "breaker_state",
        "feature_drift_psi",  # drift against the training distribution (gateway/drift)
        "prediction_drift_psi",
    },
    "switchyard-debug": {
        "inference_latency_seconds_count",  # traffic per version
        "nv_inference_pending_request_count",  # queue length
        "nv_inference_queue_duration_us",
        "batch_fill_ratio",
        "nv_cpu_utilization",
        "nv_gpu_memory_used_bytes",
        "gpu_utilization",
        "prediction_log_lag",
    },
}


def check_rules(path: Path, exprs: list[str]) -> subprocess.CompletedProcess[str]:
    rules = [{"record": f"dashboard:query_{i}:check", "expr": e} for i, e in enumerate(exprs)]
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    return subprocess.run([promtool(), "check", "rules", str(path)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_the_three_dashboards_are_provisioned() -> None:
    assert set(dashboards()) == set(REQUIRED)
    provider = yaml.safe_load((REPO_ROOT / "configs/grafana/provisioning/dashboards/"
                               "switchyard.yml").read_text())["providers"][0]  # fmt: skip
    assert provider["type"] == "file"  # every JSON file of the mounted directory
    uids = set()
    for name in ("provisioning/datasources/prometheus.yml", "compose/datasources.yml"):
        ds = yaml.safe_load((REPO_ROOT / "configs/grafana" / name).read_text())
        uids.add(ds["datasources"][0]["uid"])
    (uid,) = uids
    for dash in dashboards().values():
        assert all(p["datasource"]["uid"] == uid for p in dash["panels"]), dash["uid"]
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), dash["uid"]


@pytest.mark.parametrize("uid", sorted(REQUIRED))
def test_every_query_parses(uid: str, tmp_path: Path) -> None:
    found = queries(dashboards()[uid])
    done = check_rules(tmp_path / "rules.yml", [e for _, e in found])
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(found)} rules found" in done.stdout


def test_promtool_rejects_a_broken_query(tmp_path: Path) -> None:
    done = check_rules(tmp_path / "rules.yml", ["sum(rate(inference_requests_total[5m])"])
    assert done.returncode != 0


@pytest.mark.parametrize("uid", sorted(REQUIRED))
def test_queries_name_exported_metrics_and_cover_the_views(uid: str) -> None:
    dash = dashboards()[uid]
    known = known_names()
    used: set[str] = set()
    for where, expr in queries(dash):
        names = metric_names(expr)
        assert names, f"{where}: no metric"
        assert names <= known, f"{where}: {names - known} exported by neither gateway nor Triton"
        used |= names
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            (metric,) = re.findall(r"label_values\((\w+),", var["query"]["query"])
            assert metric in known
    assert REQUIRED[uid] <= used, REQUIRED[uid] - used
    reloads = [a for a in dash["annotations"]["list"] if "route_reloads_total" in a.get("expr", "")]
    assert reloads, "route reloads are not annotated"
