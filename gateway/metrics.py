"""Prometheus metrics of ARCHITECTURE section 7, held in one registry that the app owns."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 1.0,
    2.5, 5.0,
)  # fmt: skip


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "inference_latency_seconds",
            "End-to-end prediction latency at the gateway",
            ["model", "version", "arm"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "inference_requests_total",
            "Prediction requests by outcome",
            ["model", "status"],
            registry=r,
        )
        self.fallback = Counter(
            "fallback_total", "Answers served by a fallback rung", ["rung", "reason"], registry=r
        )
        self.breaker_state = Gauge(
            "breaker_state",
            "Circuit breaker state (0 closed, 1 half-open, 2 open)",
            ["server", "model"],
            registry=r,
        )
        self.shed = Counter(
            "shed_total", "Requests shed by admission control", ["backend"], registry=r
        )
        self.route_reloads = Counter(
            "route_reloads_total", "Route table reloads by result", ["result"], registry=r
        )
        self.predlog_entries = Counter(
            "prediction_log_entries_total",
            "Prediction log entries written, by sink",
            ["sink"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
