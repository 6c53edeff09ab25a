"""What the rule and dashboard tests need to know about PromQL: where promtool is, the metric
names a query mentions, and the names the gateway, Triton and our recording rules provide.

Parsing itself is promtool's job (a real PromQL parser); `metric_names` only lists the names in
a query that promtool has accepted, so it can stay a small tokenizer.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from gateway.gpu import GpuCollector
from gateway.metrics import Metrics
from tests.conftest import REPO_ROOT, unavailable

RULES = REPO_ROOT / "configs/prometheus/rules.yml"
DASHBOARDS = REPO_ROOT / "configs/grafana/dashboards"
#: Grafana's built-in variables, replaced by typical values before parsing.
BUILTINS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}

#: Triton's own metric names (docs/user_guide/metrics.md of triton-inference-server/server).
#: The CPU-side ones are checked against a running tritonserver in
#: tests/integration/test_triton_metric_names.py; the GPU ones appear only with a GPU.
TRITON_CPU_METRICS = frozenset({
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
    "nv_inference_exec_count", "nv_inference_pending_request_count",
    "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
    "nv_cpu_utilization", "nv_cpu_memory_total_bytes", "nv_cpu_memory_used_bytes",
})  # fmt: skip
TRITON_GPU_METRICS = frozenset({
    "nv_gpu_utilization", "nv_gpu_memory_total_bytes", "nv_gpu_memory_used_bytes",
    "nv_gpu_power_usage", "nv_gpu_power_limit", "nv_energy_consumption",
})  # fmt: skip
#: Series Prometheus itself writes: per scrape target, and per active alert.
PROMETHEUS_METRICS = frozenset({"up", "ALERTS"})

_KEYWORDS = frozenset({
    "and", "or", "unless", "bool", "by", "without", "on", "ignoring", "group_left",
    "group_right", "offset", "inf", "nan",
})  # fmt: skip
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        unavailable("promtool not installed (make deps, or apt-get install prometheus)")
    return path


def metric_names(expr: str) -> set[str]:
    """Metric (and recording rule) names in a PromQL expression that promtool accepted."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges and subqueries
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        before = s[m.start() - 1] if m.start() else " "
        if before.isdigit() or before == ".":  # the exponent of 1e-9
            continue
        if s[m.end() :].lstrip().startswith("(") or m.group().lower() in _KEYWORDS:
            continue  # a function or aggregation, or an operator
        names.add(m.group())
    return names


def gateway_metric_names() -> set[str]:
    """Every series name the gateway's /metrics can carry: the Metrics registry, whose
    families are listed by type (labelled children do not exist before first use), plus the
    pynvml GPU collector, fed one fake GPU."""
    metrics = Metrics()
    metrics.registry.register(GpuCollector(_OneGpu()))
    names = set()
    for family in metrics.registry.collect():
        names |= {family.name + suffix for suffix in _SUFFIXES[family.type]}
    return names


def recorded_names(rules: dict[str, Any] | None = None) -> set[str]:
    rules = rules or load_rules()
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def load_rules(path: Path = RULES) -> dict[str, Any]:
    rules: dict[str, Any] = yaml.safe_load(path.read_text())
    return rules


def known_names() -> set[str]:
    return (
        gateway_metric_names()
        | TRITON_CPU_METRICS
        | TRITON_GPU_METRICS
        | PROMETHEUS_METRICS
        | recorded_names()
    )


def dashboards() -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(DASHBOARDS.glob("*.json")):
        dash = json.loads(path.read_text())
        out[dash["uid"]] = dash
    return out


def substitute(expr: str, dash: dict[str, Any]) -> str:
    for var, value in BUILTINS.items():
        expr = expr.replace(var, value)
    for var in dash["templating"]["list"]:
        value = ".*" if var["type"] == "query" else var["query"]  # textbox: its default
        expr = re.sub(rf"\${var['name']}\b", value, expr)
    assert "$" not in expr, expr
    return expr


def queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every Prometheus annotation."""
    out = [(f"panel {p['title']!r}", substitute(t["expr"], dash))
           for p in dash["panels"] for t in p["targets"]]  # fmt: skip
    out += [(f"annotation {a['name']!r}", substitute(a["expr"], dash))
            for a in dash["annotations"]["list"] if "expr" in a]  # fmt: skip
    return out


class _OneGpu:
    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=50)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(used=1)
