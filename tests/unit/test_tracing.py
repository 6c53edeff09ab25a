"""OpenTelemetry spans of the request path (issue 16): one span per layer under the caller's
traceparent, the answer's attributes, parent-based sampling, exemplars on /metrics, and no
tracing machinery at all when it is off.

Through the real aiohttp app on FakeBackends behind a real BackendPool, the spans caught by
the SDK's in-memory exporter.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.api.keys import SERVICE, TRACING
from gateway.api.middleware import trace_requests
from gateway.app import build_app, build_tracing
from gateway.backends.pool import BackendPool, PoolMember
from gateway.config import ConfigError, TelemetrySettings, load_settings
from gateway.errors import BackendUnavailable
from gateway.resilience.breaker import BreakerPolicy
from gateway.resilience.retry import RetryPolicy
from gateway.tracing import NOOP, TracedLayer, Tracing, span, traces_url
from tests.unit.fake_backend import FakeBackend, FakeModel
from tests.unit.fakes import ListSink, small_fn, toy_backend, write_repo, write_small_model

ROUTE = (
    'fallback: {target: toy_small, version: "1", default: {score: 0.5, decision: review}}\n'
    "slo: {p99_ms: 100}\n"
)
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
UNSAMPLED = f"00-{TRACE_ID}-{CLIENT_SPAN}-00"
# A generous deadline: on a loaded machine the route's own (2 x its 100 ms p99) could turn a
# span-tree test into a fallback test.
BODY = {"model_name": "toy", "entity_id": "e-1", "features": {"a": 1.0, "b": 2.0, "c": 3.0},
        "context": {"deadline_ms": 10_000}}  # fmt: skip


class Stack:
    def __init__(self, client: TestClient, exporter: InMemorySpanExporter, primary: FakeBackend):
        self.client, self.exporter, self.primary = client, exporter, primary

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def by_name(self) -> dict[str, ReadableSpan]:
        return {s.name: s for s in self.spans()}


async def make(tmp_path: Path, aiohttp_client: Any, sample_ratio: float = 1.0) -> Stack:
    settings = write_repo(tmp_path, ROUTE)
    write_small_model(settings.routing.model_repository)
    primary = toy_backend()
    small = FakeBackend([FakeModel("toy_small", small_fn)], name="small")
    pool = BackendPool(
        [
            PoolMember("primary", primary, frozenset({"toy"})),
            PoolMember("fallback", small, frozenset({"toy_small"})),
        ],
        breaker_policy=BreakerPolicy(consecutive_failures=50, open_s=60),
        retry_policy=RetryPolicy(max_attempts=1),
    )
    exporter = InMemorySpanExporter()
    tracing = Tracing.build(SimpleSpanProcessor(exporter), sample_ratio=sample_ratio)
    app = build_app(settings, backend=pool, tracing=tracing)
    app[SERVICE].predlog = ListSink()
    return Stack(await aiohttp_client(app), exporter, primary)


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> set[str]:
    assert parent.context is not None
    me = parent.context.span_id
    return {s.name for s in spans if s.parent is not None and s.parent.span_id == me}


async def test_v1_request_yields_one_span_per_layer_under_the_callers_trace(
    tmp_path: Path, aiohttp_client: Any
) -> None:
    stack = await make(tmp_path, aiohttp_client)
    resp = await stack.client.post("/v1/predict", json=BODY, headers={"traceparent": SAMPLED})
    assert resp.status == 200, await resp.text()
    spans = stack.spans()
    names = stack.by_name()
    assert {s.context.trace_id for s in spans if s.context} == {int(TRACE_ID, 16)}
    root = names["POST /v1/predict"]
    assert root.parent is not None and root.parent.span_id == int(CLIENT_SPAN, 16)
    assert root.parent.is_remote
    assert children(spans, root) == {"route", "fallback", "predlog.record"}
    assert children(spans, names["fallback"]) == {"rung primary"}
    assert children(spans, names["rung primary"]) == {"coalesce"}
    assert children(spans, names["coalesce"]) == {"pool"}
    body = await resp.json()
    attrs = dict(root.attributes or {})
    assert attrs["model"] == "toy"
    assert attrs["version"] == body["model_version"] == "2"
    assert attrs["arm"] == "champion"
    assert attrs["policy_version"] == body["policy_version"]
    assert attrs["http.response.status_code"] == 200
    assert "fallback_used" not in attrs
    assert dict(names["route"].attributes or {})["arm"] == "champion"
    assert dict(names["pool"].attributes or {})["model"] == "toy"


async def test_a_fallback_answer_names_its_rung_in_the_trace(
    tmp_path: Path, aiohttp_client: Any
) -> None:
    stack = await make(tmp_path, aiohttp_client)
    stack.primary.fail_with = BackendUnavailable("down")
    resp = await stack.client.post("/v1/predict", json=BODY, headers={"traceparent": SAMPLED})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["fallback_used"] == "fallback_model"
    spans, names = stack.spans(), stack.by_name()
    assert dict(names["POST /v1/predict"].attributes or {})["fallback_used"] == "fallback_model"
    assert dict(names["fallback"].attributes or {})["fallback_used"] == "fallback_model"
    assert children(spans, names["fallback"]) == {"rung primary", "rung fallback_model"}
    assert not names["rung primary"].status.is_ok  # the primary's failure is on its span
    pools = [s for s in spans if s.name == "pool"]
    assert {dict(s.attributes or {})["model"] for s in pools} == {"toy", "toy_small"}


async def test_v2_infer_is_traced_through_the_same_core(
    tmp_path: Path, aiohttp_client: Any
) -> None:
    stack = await make(tmp_path, aiohttp_client)
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 3],
                        "data": [1.0, 2.0, 3.0]}]}  # fmt: skip
    resp = await stack.client.post(
        "/v2/models/toy/infer", json=body, headers={"traceparent": SAMPLED}
    )
    assert resp.status == 200, await resp.text()
    names = stack.by_name()
    root = names["POST /v2/models/{model}/infer"]
    assert root.context is not None and root.context.trace_id == int(TRACE_ID, 16)
    assert {"route", "fallback", "pool", "predlog.record"} <= set(names)
    assert dict(root.attributes or {})["arm"] == "champion"


async def test_sampling_is_parent_based(tmp_path: Path, aiohttp_client: Any) -> None:
    stack = await make(tmp_path, aiohttp_client, sample_ratio=0.0)
    # Ratio 0 for requests of their own: none traced ...
    assert (await stack.client.post("/v1/predict", json=BODY)).status == 200
    assert stack.spans() == []
    # ... nor a caller's unsampled traceparent; its sampled one always is.
    headers = {"traceparent": UNSAMPLED}
    assert (await stack.client.post("/v1/predict", json=BODY, headers=headers)).status == 200
    assert stack.spans() == []
    headers = {"traceparent": SAMPLED}
    assert (await stack.client.post("/v1/predict", json=BODY, headers=headers)).status == 200
    assert "POST /v1/predict" in stack.by_name()


async def test_probes_and_metrics_are_not_traced(tmp_path: Path, aiohttp_client: Any) -> None:
    stack = await make(tmp_path, aiohttp_client)
    assert (await stack.client.get("/healthz")).status == 200
    assert (await stack.client.get("/metrics")).status == 200
    assert stack.spans() == []


async def test_latency_exemplars_carry_the_trace_id_in_openmetrics_only(
    tmp_path: Path, aiohttp_client: Any
) -> None:
    stack = await make(tmp_path, aiohttp_client)
    assert (await stack.client.post("/v1/predict", json=BODY,
                                    headers={"traceparent": SAMPLED})).status == 200  # fmt: skip
    om = await stack.client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert om.headers["Content-Type"].startswith("application/openmetrics-text")
    text = await om.text()
    bucket = re.search(r"^inference_latency_seconds_bucket\{.*# \{(.*?)\}", text, re.M)
    assert bucket is not None, text
    assert f'trace_id="{TRACE_ID}"' in bucket.group(1)
    plain = await stack.client.get("/metrics")
    assert plain.headers["Content-Type"].startswith("text/plain")
    assert TRACE_ID not in await plain.text()


async def test_off_means_no_tracing_objects_on_the_path(tmp_path: Path) -> None:
    settings = write_repo(tmp_path, ROUTE)
    write_small_model(settings.routing.model_repository)
    assert build_tracing(settings.telemetry) is None  # no endpoint: off
    app = build_app(settings, backend=toy_backend())
    service = app[SERVICE]
    assert app[TRACING] is None and service.tracing is None
    assert trace_requests not in app.middlewares
    layer: Any = service.stack
    while layer is not None:  # fallback -> coalescer -> pool: none wrapped
        assert not isinstance(layer, TracedLayer)
        assert getattr(layer, "tracing", None) is None
        layer = getattr(layer, "inner", None)
    assert span(None, "x", model="m") is NOOP


def test_telemetry_settings_from_the_environment() -> None:
    env = {
        "SWITCHYARD__TELEMETRY__OTLP_ENDPOINT": "http://127.0.0.1:4318",
        "SWITCHYARD__TELEMETRY__SAMPLE_RATIO": "0.25",
    }
    t = load_settings(None, env=env).telemetry
    assert (t.otlp_endpoint, t.sample_ratio) == ("http://127.0.0.1:4318", 0.25)
    tracing = build_tracing(t)
    assert tracing is not None
    tracing.shutdown()
    assert traces_url(t.otlp_endpoint) == "http://127.0.0.1:4318/v1/traces"
    assert traces_url("http://c:4318/v1/traces") == "http://c:4318/v1/traces"
    with pytest.raises(ConfigError, match="sample_ratio"):
        TelemetrySettings(sample_ratio=1.5)
    with pytest.raises(ConfigError, match="otlp_endpoint"):
        TelemetrySettings(otlp_endpoint="127.0.0.1:4318")


def test_outgoing_context_only_for_a_sampled_span() -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing.build(SimpleSpanProcessor(exporter))
    assert tracing.outgoing() == ()  # no current span
    with tracing.server_span("s", SAMPLED):
        (key, value), *_ = tracing.outgoing()
        assert key == "traceparent"
        assert value.startswith(f"00-{TRACE_ID}-") and value.endswith("-01")
        assert value.split("-")[2] != CLIENT_SPAN  # our span is the parent now
    with tracing.server_span("s", UNSAMPLED):
        assert tracing.outgoing() == ()
    with tracing.server_span("s", "garbage"):  # an invalid header: a trace of its own
        assert TRACE_ID not in dict(tracing.outgoing())["traceparent"]


def test_up_starts_triton_tracing_to_the_same_collector(tmp_path: Path) -> None:
    import argparse
    import dataclasses

    from gateway.cli import _local_triton
    from gateway.tritonserver import TritonPorts

    settings = write_repo(tmp_path)
    args = argparse.Namespace(triton_address="127.0.0.1")
    off = _local_triton(args, settings, TritonPorts(), ("*",), tmp_path / "t.log")
    assert off.options.trace_args() == []
    assert not any("trace" in a for a in off.options.args(tmp_path))
    on_settings = dataclasses.replace(
        settings,
        telemetry=TelemetrySettings(otlp_endpoint="http://127.0.0.1:4318", export_delay_ms=250),
    )
    on = _local_triton(args, on_settings, TritonPorts(), ("*",), tmp_path / "t.log")
    argv = on.options.args(tmp_path)
    flags = [argv[i + 1] for i, a in enumerate(argv) if a == "--trace-config"]
    assert flags == [
        "mode=opentelemetry",
        "rate=0",  # only what the gateway propagates
        "count=-1",
        "level=TIMESTAMPS",
        "opentelemetry,url=http://127.0.0.1:4318/v1/traces",
        "opentelemetry,resource=service.name=triton",
        "opentelemetry,bsp_schedule_delay=250",
    ]


async def test_grpc_metadata_traceparent_parents_the_adapter_span(
    tmp_path: Path, aiohttp_client: Any
) -> None:
    import dataclasses

    import numpy as np
    import tritonclient.grpc.aio as grpcclient

    from gateway.api.grpc_server import grpc_serving
    from gateway.tritonserver import free_port

    settings = write_repo(tmp_path, ROUTE)
    write_small_model(settings.routing.model_repository)
    server = dataclasses.replace(settings.server, host="127.0.0.1", grpc_port=free_port())
    settings = dataclasses.replace(settings, server=server)
    exporter = InMemorySpanExporter()
    app = build_app(
        settings, backend=toy_backend(), tracing=Tracing.build(SimpleSpanProcessor(exporter))
    )
    app[SERVICE].predlog = ListSink()
    app.cleanup_ctx.append(grpc_serving(settings))
    await aiohttp_client(app)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    try:
        x = np.ones((1, 3), dtype=np.float32)
        inp = grpcclient.InferInput("features", [1, 3], "FP32")
        inp.set_data_from_numpy(x)
        await client.infer("toy", [inp], headers={"traceparent": SAMPLED})
    finally:
        await client.close()
    names = {s.name: s for s in exporter.get_finished_spans()}
    root = names["grpc ModelInfer"]
    assert root.parent is not None and root.parent.span_id == int(CLIENT_SPAN, 16)
    assert root.context is not None and root.context.trace_id == int(TRACE_ID, 16)
    assert dict(root.attributes or {})["model"] == "toy"
    assert {"route", "fallback", "pool", "predlog.record"} <= set(names)
