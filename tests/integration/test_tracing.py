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
import secrets
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
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

    async def wait_for(
        self, trace_id: str, done: object, timeout_s: float, required: bool = True
    ) -> list[ReceivedSpan] | None:
        """Poll until ``done(spans)`` holds for the trace (exports come in batches); past the
        deadline fail, or return None when not ``required``."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = list(self.traces.get(trace_id, ()))
            if done(spans):  # type: ignore[operator]
                return spans
            if time.monotonic() > deadline and not required:
                return None
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


GATEWAY_SPANS = {"route", "fallback", "rung primary", "coalesce", "pool", "triton ModelInfer",
                 "predlog.record"}  # fmt: skip


def gateway_complete(root: str) -> Callable[[list[ReceivedSpan]], bool]:
    """Every gateway span of the request has arrived. The two processes export in batches of
    their own, and a batch may hold part of a trace: a partial trace would fail on a span
    still on its way. (A span ends after its children, so the root's arrival means theirs.)"""

    def done(spans: list[ReceivedSpan]) -> bool:
        return GATEWAY_SPANS | {root} <= {s.name for s in spans if s.service == "switchyard"}

    return done


def complete(root: str) -> Callable[[list[ReceivedSpan]], bool]:
    """The gateway's spans and Triton's top span under the gateway's backend call."""

    def done(spans: list[ReceivedSpan]) -> bool:
        call = next((s for s in spans if s.name == "triton ModelInfer"), None)
        return (
            gateway_complete(root)(spans)
            and call is not None
            and any(s.service == "triton" and s.parent_id == call.span_id for s in spans)
        )

    return done


#: tritonserver 2.51 exports no span at all for a few requests that carry a sampled
#: traceparent: 58 of 60 sent straight to it (no gateway) were traced. A request whose
#: Triton spans do not come within this long is sent again under a new trace id.
TRITON_SPANS_WAIT_S = 5.0
ATTEMPTS = 3


async def joined_trace(
    receiver: Receiver, send: Callable[[str, str], Awaitable[None]], root: str
) -> None:
    """Send with a fresh traceparent until one trace holds the gateway's spans and Triton's
    joined under the backend call; the gateway's own spans must arrive for every attempt."""
    for _ in range(ATTEMPTS):
        trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
        await send(trace_id, span_id)
        await receiver.wait_for(trace_id, gateway_complete(root), 30)  # fails the test if not
        spans = await receiver.wait_for(
            trace_id, complete(root), TRITON_SPANS_WAIT_S, required=False
        )
        if spans is not None:
            assert_joined(spans, root, span_id)
            return
    pytest.fail(f"{root}: no Triton span under the gateway's call in {ATTEMPTS} traces")


def assert_joined(spans: list[ReceivedSpan], root: str, client_span: str) -> None:
    by_id = {s.span_id: s for s in spans}
    gateway = [s for s in spans if s.service == "switchyard"]
    triton = [s for s in spans if s.service == "triton"]
    names = {s.name for s in gateway}
    assert GATEWAY_SPANS | {root} <= names, names
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
            async with ClientSession() as http:

                async def rest(trace_id: str, span_id: str) -> None:  # the traceparent header
                    resp = await http.post(
                        f"{gw.url}/v1/predict",
                        json={"model_name": "risk", "entity_id": "e-1", "features": FEATURES},
                        headers={"traceparent": f"00-{trace_id}-{span_id}-01"},
                    )
                    assert resp.status == 200, await resp.text()

                await joined_trace(receiver, rest, "POST /v1/predict")

            async def grpc(trace_id: str, span_id: str) -> None:  # metadata, stock tritonclient
                await asyncio.to_thread(_grpc_infer, gw.grpc_url, trace_id, span_id)

            await joined_trace(receiver, grpc, "grpc ModelInfer")
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
