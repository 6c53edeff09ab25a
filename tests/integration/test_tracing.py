"""One trace from the client through the gateway into Triton (issue 16).

An OTLP/HTTP receiver runs in the test; a real tritonserver (OpenTelemetry trace mode, the
flags `up` uses) and a real gateway process both export to it. A request sent with a W3C
traceparent, over REST and over gRPC, must come back as one trace under the client's trace
id holding the gateway's spans and Triton's, Triton's joined under the gateway's backend call.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from aiohttp import ClientSession, web
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from gateway.tritonserver import (
    TritonInstallation,
    TritonOptions,
    TritonPorts,
    TritonServer,
    free_port,
)
from tests.integration.conftest import start_gateway, stop_gateway, wait_http_ok

ROOT = Path(__file__).resolve().parents[2]
FEATURES = json.loads((ROOT / "configs/examples/predict-risk.json").read_text())["features"]
#: The same features as one row, in the model's order (the tensor form for gRPC).
ORDER = json.loads((ROOT / "model_repository/risk/2/manifest.json").read_text())["input_schema"]
ROW = np.asarray([[FEATURES[name] for name in ORDER["features"]]], dtype=np.float32)


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, object]


@dataclass
class Receiver:
    """The spans posted to POST /v1/traces, by trace id."""

    url: str = ""
    traces: dict[str, list[ReceivedSpan]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)  # exports that did not decode

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            self._decode(request.content_type, request.headers.get("Content-Encoding"), body)
        except Exception as exc:
            self.errors.append(f"{request.content_type}: {exc!r}: {body[:300]!r}")
            return web.Response(status=400)
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def _decode(self, content_type: str, encoding: str | None, body: bytes) -> None:
        if encoding == "gzip":
            body = gzip.decompress(body)
        if content_type == "application/json":  # Triton's exporter (opentelemetry-cpp)
            export = json_format.ParseDict(
                _ids_as_base64(json.loads(body)),
                ExportTraceServiceRequest(),
                ignore_unknown_fields=True,
            )
        else:  # application/x-protobuf: the Python SDK's
            export = ExportTraceServiceRequest.FromString(body)
        for rs in export.resource_spans:
            attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    span_attrs: dict[str, object] = {
                        a.key: (a.value.string_value or a.value.int_value) for a in s.attributes
                    }
                    self.traces[s.trace_id.hex()].append(ReceivedSpan(
                        attrs.get("service.name", ""), s.name, s.trace_id.hex(),
                        s.span_id.hex(), s.parent_span_id.hex(), span_attrs))  # fmt: skip

    async def wait_for(self, trace_id: str, done: object, timeout_s: float) -> list[ReceivedSpan]:
        """Poll until ``done(spans)`` holds for the trace (exports come in batches)."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = list(self.traces.get(trace_id, ()))
            if done(spans):  # type: ignore[operator]
                return spans
            if time.monotonic() > deadline:
                got = sorted((s.service, s.name) for s in spans)
                others = {t: sorted({(x.service, x.name) for x in v})
                          for t, v in self.traces.items() if t != trace_id}  # fmt: skip
                pytest.fail(f"trace {trace_id} incomplete after {timeout_s}s: {got}; "
                            f"other traces: {others}; undecoded: {self.errors}")  # fmt: skip
            await asyncio.sleep(0.1)


_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def _ids_as_base64(export: dict[str, Any]) -> dict[str, Any]:
    """OTLP/JSON writes trace and span ids as hex, where protobuf's JSON mapping expects
    base64 for bytes fields: convert them so ParseDict reads the real ids."""
    for rs in export.get("resourceSpans", ()):
        for ss in rs.get("scopeSpans", ()):
            for span in ss.get("spans", ()):
                for key in _ID_FIELDS:
                    if span.get(key):
                        span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
    return export


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    rec.url = f"http://127.0.0.1:{port}"
    yield rec
    await runner.cleanup()


def complete(spans: list[ReceivedSpan]) -> bool:
    """The gateway's backend call and Triton's top span below it have both arrived."""
    names = {(s.service, s.name) for s in spans}
    return ("switchyard", "triton ModelInfer") in names and any(
        s.service == "triton" for s in spans
    )


def assert_joined(spans: list[ReceivedSpan], root: str, client_span: str) -> None:
    by_id = {s.span_id: s for s in spans}
    gateway = [s for s in spans if s.service == "switchyard"]
    triton = [s for s in spans if s.service == "triton"]
    names = {s.name for s in gateway}
    assert {root, "route", "fallback", "rung primary", "coalesce", "pool",
            "triton ModelInfer", "predlog.record"} <= names, names  # fmt: skip
    top = next(s for s in gateway if s.name == root)
    assert top.parent_id == client_span  # the client's span is the gateway's parent
    assert top.attributes["model"] == "risk" and top.attributes["arm"]
    assert str(top.attributes["policy_version"]).startswith("routes@")
    call = next(s for s in gateway if s.name == "triton ModelInfer")
    # Triton's spans hang under the gateway's backend call: its root's parent is that span.
    triton_roots = [s for s in triton if s.parent_id not in by_id or by_id[s.parent_id] is call]
    assert triton_roots and all(s.parent_id == call.span_id for s in triton_roots), [
        (s.name, s.parent_id) for s in triton
    ]


@pytest.mark.slow
async def test_one_trace_from_client_through_gateway_into_triton(
    receiver: Receiver,
    triton_installation: TritonInstallation,
    repo_root: Path,
    tmp_path: Path,
) -> None:
    server = TritonServer(
        TritonOptions(
            model_repository=repo_root / "model_repository",
            ports=TritonPorts.free(),
            model_control_mode="explicit",
            load_models=("risk",),
            trace_url=f"{receiver.url}/v1/traces",
            trace_export_delay_ms=200,
        ),
        installation=triton_installation,
        log_file=tmp_path / "tritonserver.log",
        ready_timeout_s=120,
    )
    env = {
        "SWITCHYARD__TELEMETRY__OTLP_ENDPOINT": receiver.url,
        "SWITCHYARD__TELEMETRY__EXPORT_DELAY_MS": "200",
        "SWITCHYARD__TELEMETRY__SAMPLE_RATIO": "0",  # only the client's sampled traceparent
    }
    await asyncio.to_thread(server.start)
    try:
        await asyncio.to_thread(server.wait_ready)
        gw = await asyncio.to_thread(start_gateway, repo_root, tmp_path, server.grpc_url, env)
        try:
            await asyncio.to_thread(wait_http_ok, f"{gw.url}/healthz", 30, gw.process, gw.log_file)
            # REST: the traceparent header.
            rest_trace, rest_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
            async with ClientSession() as http:
                resp = await http.post(
                    f"{gw.url}/v1/predict",
                    json={"model_name": "risk", "entity_id": "e-1", "features": FEATURES},
                    headers={"traceparent": f"00-{rest_trace}-{rest_span}-01"},
                )
                assert resp.status == 200, await resp.text()
            spans = await receiver.wait_for(rest_trace, complete, 30)
            assert_joined(spans, "POST /v1/predict", rest_span)

            # gRPC: the traceparent metadata, through stock tritonclient.
            grpc_trace, grpc_span = "5b8aa5a2d2c872e8321cf37308d69df2", "051581bf3cb55c13"
            await asyncio.to_thread(_grpc_infer, gw.grpc_url, grpc_trace, grpc_span)
            spans = await receiver.wait_for(grpc_trace, complete, 30)
            assert_joined(spans, "grpc ModelInfer", grpc_span)
            assert receiver.errors == []
        finally:
            await asyncio.to_thread(stop_gateway, gw)
    finally:
        await asyncio.to_thread(server.stop)


def _grpc_infer(url: str, trace_id: str, span_id: str) -> None:
    client = grpcclient.InferenceServerClient(url)
    try:
        inp = grpcclient.InferInput(ORDER["tensor"], list(ROW.shape), "FP32")
        inp.set_data_from_numpy(ROW)
        client.infer("risk", [inp], headers={"traceparent": f"00-{trace_id}-{span_id}-01"})
    finally:
        client.close()
