"""Metrics text parsed and checked by name and label; Triton batch fill; GPU gauges."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import build_app
from gateway.gpu import GpuCollector
from gateway.metrics import Metrics
from gateway.triton_metrics import ModelCounters, TritonMetricsScraper, derive, parse_counters
from tests.unit.fakes import toy_backend, write_repo

TRITON_TEXT = """\
# HELP nv_inference_count Number of inferences performed
# TYPE nv_inference_count counter
nv_inference_count{model="risk",version="2"} 120
nv_inference_count{model="digits",version="1"} 0
# HELP nv_inference_exec_count Number of model executions performed
# TYPE nv_inference_exec_count counter
nv_inference_exec_count{model="risk",version="2"} 30
nv_inference_exec_count{model="digits",version="1"} 0
# HELP nv_inference_queue_duration_us Cumulative inference queuing duration in microseconds
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{model="risk",version="2"} 60000
# HELP nv_inference_request_success Number of successful inference requests
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="risk",version="2"} 120
"""


def samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


async def test_metrics_endpoint_names_and_labels(tmp_path: Path, aiohttp_client) -> None:
    settings = write_repo(tmp_path)
    client = await aiohttp_client(build_app(settings, backend=toy_backend()))
    body = {"model_name": "toy", "entity_id": "e1", "features": [1, 2, 3]}
    resp = await client.post("/v1/predict", data=io.BytesIO(json.dumps(body).encode()))
    assert resp.status == 200
    text = await (await client.get("/metrics")).text()
    got = samples(text)
    (count,) = got["inference_latency_seconds_count"]
    assert count.labels == {"model": "toy", "version": "2", "arm": "champion"}
    assert count.value == 1
    assert any(s.labels.get("le") == "+Inf" for s in got["inference_latency_seconds_bucket"])
    (ok,) = [s for s in got["inference_requests_total"] if s.labels["status"] == "ok"]
    assert ok.labels["model"] == "toy" and ok.value == 1
    assert "prediction_log_lag" in got
    assert not any(name.startswith("gpu_") for name in got)  # no GPU here: absent, not zero


def test_batch_fill_and_queue_time_from_triton_counters() -> None:
    counters = parse_counters(TRITON_TEXT)
    assert counters[("risk", "2")] == ModelCounters(120, 30, 60000, 120)
    metrics = Metrics()
    scraper = TritonMetricsScraper("http://unused", metrics, interval_s=1)
    scraper.update(counters)
    get = metrics.registry.get_sample_value
    assert get("batch_fill_ratio", {"model": "risk", "version": "2"}) == 4.0
    assert get("triton_queue_seconds", {"model": "risk", "version": "2"}) == pytest.approx(5e-4)
    assert get("batch_fill_ratio", {"model": "digits", "version": "1"}) is None  # idle
    later = ModelCounters(inferences=130, executions=40, queue_us=61000, requests=130)
    fill, queue = derive(counters[("risk", "2")], later)
    assert fill == 1.0 and queue == pytest.approx(1e-4)  # over the interval, not cumulative
    assert derive(later, ModelCounters(8, 2, 0, 8))[0] == 4.0  # Triton restarted


class FakeNvml:
    def __init__(self, count: int, fail: bool = False) -> None:
        self.count, self.fail = count, fail

    def nvmlInit(self) -> None:
        if self.fail:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=40 + h)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(used=1024 * (h + 1))

    def nvmlShutdown(self) -> None:
        pass


def test_gpu_gauges_present_with_a_gpu_absent_without() -> None:
    assert GpuCollector.detect(FakeNvml(0, fail=True)) is None
    assert GpuCollector.detect(FakeNvml(0)) is None
    collector = GpuCollector.detect(FakeNvml(2))
    assert collector is not None
    metrics = Metrics()
    metrics.registry.register(collector)
    got = samples(metrics.render().decode())
    assert [(s.labels["gpu"], s.value) for s in got["gpu_utilization"]] == [("0", 0.4), ("1", 0.41)]
    assert [s.value for s in got["gpu_memory_used_bytes"]] == [1024, 2048]
