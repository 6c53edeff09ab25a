"""Prometheus metrics of ARCHITECTURE section 7, held in one registry that the app owns.

Under `serve --workers N` every worker writes its values to PROMETHEUS_MULTIPROC_DIR (set by
the parent before the workers import prometheus_client) and /metrics aggregates all workers.
Gauges therefore name a ``multiprocess_mode``; one without it is reported per pid.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 1.0,
    2.5, 5.0,
)  # fmt: skip


class Metrics:
    def __init__(
        self, registry: CollectorRegistry | None = None, multiprocess_dir: str | None = None
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.multiprocess_dir = multiprocess_dir
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
            multiprocess_mode="livemax",  # the most open view among live workers
        )
        self.shed = Counter(
            "shed_total", "Requests shed by admission control", ["backend"], registry=r
        )
        self.hedges = Counter(
            "hedges_total",
            "Late calls a route hedged on another replica, by outcome (gateway/resilience/hedge)",
            ["outcome"],
            registry=r,
        )
        self.route_reloads = Counter(
            "route_reloads_total", "Route table reloads by result", ["result"], registry=r
        )
        self.shadow = Counter(
            "shadow_requests_total",
            "Shadow copies by outcome (agree, disagree, error, dropped)",
            ["model", "target", "result"],
            registry=r,
        )
        self.shadow_score_delta = Histogram(
            "shadow_score_delta",
            "Absolute score difference between a shadow target and the primary answer",
            ["model", "target"],
            buckets=(0.001, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0),
            registry=r,
        )
        self.predlog_entries = Counter(
            "prediction_log_entries_total",
            "Prediction log entries written, by sink",
            ["sink"],
            registry=r,
        )
        # Fast successes over the access-log budget (log.access): counted here, not written.
        self.access_skipped = Counter(
            "access_log_skipped_total",
            "Access lines not written: fast successes over log.access.max_lines_per_s",
            registry=r,
        )
        # What the HPA scales on (deploy/k8s): predictions the gateway is working on now.
        self.in_flight = Gauge(
            "gateway_in_flight_requests",
            "Prediction requests in flight in the gateway, every protocol",
            registry=r,
            multiprocess_mode="livesum",
        )
        # Prediction log durability (gateway.predlog): lag = accepted, not yet in the stream.
        self.predlog_lag = Gauge(
            "prediction_log_lag",
            "Prediction log entries accepted but not yet in the Redis stream (buffer + spool)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.predlog_spooled = Counter(
            "prediction_log_spooled_total",
            "Entries left in the disk spool for replay (or kept: no Redis), by reason",
            ["reason"],
            registry=r,
        )
        self.predlog_replayed = Counter(
            "prediction_log_replayed_total", "Spooled entries replayed to Redis", registry=r
        )
        self.predlog_dropped = Counter(
            "prediction_log_dropped_total",
            "Entries lost (spool unwritable) or skipped as duplicates, by reason",
            ["reason"],
            registry=r,
        )
        self.feature_lookups = Counter(
            "feature_lookups_total",
            "Online feature lookups by result (hit, cache, missing, error)",
            ["feature_set", "result"],
            registry=r,
        )
        self.model_accuracy = Gauge(
            "model_accuracy",
            "Accuracy from joined feedback labels",
            ["model", "version", "arm"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.canary_accuracy_delta = Gauge(
            "canary_accuracy_delta",
            "Challenger accuracy minus champion accuracy, from joined labels",
            ["model", "version"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.batch_fill_ratio = Gauge(
            "batch_fill_ratio",
            "Inferences per Triton execution (nv_inference_count / nv_inference_exec_count)",
            ["model", "version"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.triton_queue_seconds = Gauge(
            "triton_queue_seconds",
            "Mean time a request waited in Triton's queue over the last scrape interval",
            ["model", "version"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        # Drift against the training distribution (gateway/drift): PSI over a sliding window,
        # the most drifted view among live workers (each sees its share of the traffic).
        self.feature_drift_psi = Gauge(
            "feature_drift_psi",
            "Population stability index of a live input feature against its training histogram",
            ["model", "version", "feature"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.prediction_drift_psi = Gauge(
            "prediction_drift_psi",
            "Population stability index of the live score against the holdout score histogram",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.drift_window_rows = Gauge(
            "drift_window_rows",
            "Sampled rows in the drift window the PSI gauges are computed over",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livesum",
        )

    def render(self) -> bytes:
        return self.render_for("")[0]

    def render_for(self, accept: str) -> tuple[bytes, str]:
        """The exposition the scraper asked for (``Accept``), and its content type: the
        OpenMetrics text when asked, which alone carries the latency histograms' exemplars
        (trace ids); else the classic Prometheus text. Exemplars are per process: under
        ``--workers`` (multiprocess mode) prometheus_client keeps none."""
        registry = self.registry
        if self.multiprocess_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiprocess_dir)
        if "application/openmetrics-text" not in accept:
            return generate_latest(registry), CONTENT_TYPE_LATEST
        encoder, content_type = choose_encoder(accept)
        return encoder(registry), content_type
