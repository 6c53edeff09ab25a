"""OpenTelemetry tracing of the request path, and nothing at all when it is off.

With ``telemetry.otlp_endpoint`` set, the composition root builds one `Tracing` (an SDK
tracer provider with a batching OTLP/HTTP exporter) and hands it to each layer; without it,
every layer holds ``None`` and its span is the shared `NOOP` context: no SDK object is made
or touched per request (docs/benchmarks.md measures both).

The spans of one /v1 request, as a tree (names are what the collector shows)::

    POST /v1/predict          adapter (REST; gRPC: "grpc ModelInfer"), W3C traceparent in
      route                   plan: route table -> target and arm
      features                feature_refs from the online store (only when asked for)
      fallback                the ladder; fallback_used when a rung answered
        rung primary|fallback_model|cache|default
          coalesce            the coalescer (a merged call runs under its first member)
            pool              admission, breaker, retry
              triton ModelInfer   one per attempt; traceparent goes on to Triton, whose
                                  own spans join the same trace
      predlog.record          the prediction-log entry
      shadow                  a copy to a shadow target (its own task, same trace)

Sampling is parent-based: a caller's sampled traceparent is always traced, an unsampled one
never; requests without one are sampled at ``telemetry.sample_ratio``.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.types import Deadline, InferRequest, InferResponse

#: The span of a layer when tracing is off: one stateless, reusable context manager.
NOOP: AbstractContextManager[None] = contextlib.nullcontext()

#: A layer's span outside any sampled request: the non-recording span, shared.
_NOT_RECORDING: AbstractContextManager[Span] = contextlib.nullcontext(trace.INVALID_SPAN)

_PROPAGATOR = TraceContextTextMapPropagator()  # stateless: W3C traceparent / tracestate


class Tracing:
    """One process's tracer, and the W3C propagation in and out of it."""

    def __init__(
        self,
        provider: TracerProvider,
        sample_ratio: float = 1.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("switchyard")
        self.sample_ratio = sample_ratio
        self.rng = rng

    @classmethod
    def build(
        cls,
        processor: SpanProcessor,
        *,
        sample_ratio: float = 1.0,
        service_name: str = "switchyard",
    ) -> Tracing:
        # The adapters decide (`sampled`) before any span exists, so the SDK's sampler only
        # sees requests that are traced: parent-based, always on for our own roots.
        provider = TracerProvider(
            sampler=ParentBased(root=ALWAYS_ON),
            resource=Resource.create({"service.name": service_name}),
        )
        provider.add_span_processor(processor)
        return cls(provider, sample_ratio)

    @classmethod
    def otlp(
        cls,
        endpoint: str,
        *,
        sample_ratio: float = 1.0,
        service_name: str = "switchyard",
        export_delay_ms: int = 1000,
    ) -> Tracing:
        """Spans batched to an OTLP/HTTP collector at ``endpoint`` (``/v1/traces`` added)."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=traces_url(endpoint))
        # The exporter posts from the processor's own thread, never on the event loop.
        processor = BatchSpanProcessor(exporter, schedule_delay_millis=export_delay_ms)
        return cls.build(processor, sample_ratio=sample_ratio, service_name=service_name)

    def span(
        self,
        name: str,
        attributes: Mapping[str, Any] | None = None,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
    ) -> AbstractContextManager[Span]:
        """A child of the current span, current while the block runs. Only within a
        sampled request: with no recording span around (an unsampled request, a background
        warm-up probe) nothing is made at all."""
        if not trace.get_current_span().is_recording():
            return _NOT_RECORDING
        return self._start(name, attributes, kind, None)

    def _start(
        self,
        name: str,
        attributes: Mapping[str, Any] | None,
        kind: SpanKind,
        context: Context | None,
    ) -> AbstractContextManager[Span]:
        attrs = {k: v for k, v in (attributes or {}).items() if v is not None}
        return self.tracer.start_as_current_span(name, context, kind, attrs)

    def server_span(
        self,
        name: str,
        traceparent: str | None,
        tracestate: str | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> AbstractContextManager[Span]:
        """The adapter's span: a child of the caller's ``traceparent`` when it sent one (an
        invalid one is ignored: the request starts a trace of its own). A request that is
        not sampled gets no span at all: not even a non-recording one."""
        if not self.sampled(traceparent):
            return _NOT_RECORDING
        parent = None
        if traceparent:
            carrier = {"traceparent": traceparent}
            if tracestate:
                carrier["tracestate"] = tracestate
            parent = _PROPAGATOR.extract(carrier)
        return self._start(name, attributes, SpanKind.SERVER, parent)

    def sampled(self, traceparent: str | None) -> bool:
        """Parent-based: the caller's sampled flag when it sent a valid traceparent, else
        ``sample_ratio``."""
        if traceparent and len(traceparent) == 55 and traceparent[2] == "-":
            try:
                return bool(int(traceparent[53:], 16) & 1)
            except ValueError:
                pass  # not hex: as if absent
        return self.sample_ratio >= 1.0 or self.rng() < self.sample_ratio

    def outgoing(self) -> tuple[tuple[str, str], ...]:
        """gRPC metadata carrying the current span onwards (nothing when not sampled: Triton
        traces every request that carries a context)."""
        if not trace.get_current_span().get_span_context().trace_flags.sampled:
            return ()
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        return tuple(carrier.items())

    @staticmethod
    def annotate(**attributes: Any) -> None:
        """Attributes on the current span (``None`` values skipped)."""
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes({k: v for k, v in attributes.items() if v is not None})

    @staticmethod
    def exemplar() -> dict[str, str] | None:
        """The current trace as a metric exemplar, when it is sampled."""
        ctx = trace.get_current_span().get_span_context()
        if not ctx.trace_flags.sampled:
            return None
        return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}

    def shutdown(self) -> None:
        """Export what is queued, then stop the exporter thread."""
        self.provider.shutdown()


def span(tracing: Tracing | None, name: str, **attributes: Any) -> AbstractContextManager[Any]:
    """A layer's span: `NOOP` when tracing is off (the hot path's branch)."""
    return NOOP if tracing is None else tracing.span(name, attributes)


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a collector's base URL (as OTEL_EXPORTER_OTLP_ENDPOINT)."""
    base = endpoint.rstrip("/")
    return base if base.endswith("/v1/traces") else base + "/v1/traces"


class _Layer(Protocol):
    async def infer(self, request: InferRequest, deadline: Deadline) -> InferResponse: ...


class TracedLayer:
    """A span around a layer of the stack: the composition root wraps layers in it only when
    tracing is on, so the layers themselves stay as they are."""

    def __init__(self, inner: _Layer, tracing: Tracing, name: str) -> None:
        self.inner = inner
        self.tracing = tracing
        self.name = name

    async def infer(self, request: InferRequest, deadline: Deadline) -> InferResponse:
        attrs = {"model": request.model, "version": request.version or None}
        with self.tracing.span(self.name, attrs) as s:
            resp = await self.inner.infer(request, deadline)
            if resp.fallback_used is not None:
                s.set_attribute("fallback_used", resp.fallback_used)
            return resp
