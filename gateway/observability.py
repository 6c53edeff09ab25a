"""Wiring of everything that observes predictions: Redis client, prediction log, online
features, feedback labels and join, Triton batch metrics, GPU gauges.

The composition root builds one `Observability` from Settings and ties `start`/`close` to the
app's lifetime; closing flushes the prediction log before Redis goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import structlog

from gateway.clock import Clock, monotonic
from gateway.config import Settings
from gateway.errors import FeedbackUnavailable
from gateway.features import FeatureStore
from gateway.gpu import GpuCollector
from gateway.metrics import Metrics
from gateway.predlog.feedback import LabelStore, join_labels, model_streams
from gateway.predlog.redaction import LogPolicies
from gateway.predlog.redis_stream import StreamWriter
from gateway.predlog.spool import Spool
from gateway.predlog.writer import PredictionLog
from gateway.redis_conn import Client, async_client
from gateway.security.secrets import redaction_salt
from gateway.triton_metrics import TritonMetricsScraper

log = structlog.get_logger(__name__)


def redis_client(settings: Settings) -> Client | None:
    """A pooled client or a cluster client (connects lazily), or None when `redis.url` is
    empty."""
    r = settings.redis
    if not r.url:
        return None
    return async_client(
        r,
        socket_connect_timeout=r.connect_timeout_s,
        socket_timeout=r.socket_timeout_s,
        health_check_interval=30,
    )


@dataclass
class Observability:
    settings: Settings
    metrics: Metrics
    predlog: PredictionLog
    policies: LogPolicies
    redis: Client | None = None
    features: FeatureStore | None = None
    labels: LabelStore | None = None
    scraper: TritonMetricsScraper | None = None
    gpu: GpuCollector | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        await self.predlog.start()
        if self.scraper is not None:
            await self.scraper.start()
        if self.labels is not None and self.settings.feedback.join_interval_s > 0:
            self._tasks.append(asyncio.create_task(self._join_loop(), name="label-join"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.scraper is not None:
            await self.scraper.close()
        await self.predlog.close()
        if self.gpu is not None:
            self.metrics.registry.unregister(self.gpu)
            self.gpu.close()
        if self.redis is not None:
            await self.redis.aclose()

    async def join_once(self) -> None:
        """Join labels with the log and export accuracy and the canary delta."""
        assert self.redis is not None and self.labels is not None
        streams = await model_streams(self.redis, self.settings.predlog.stream_prefix)
        report = await join_labels(
            self.redis, self.labels, streams, self.settings.feedback.join_window_s
        )
        for a in report.arms:
            self.metrics.model_accuracy.labels(a.model, a.version, a.arm).set(a.accuracy)
        for (model, version), delta in report.deltas().items():
            self.metrics.canary_accuracy_delta.labels(model, version).set(delta)

    async def _join_loop(self) -> None:
        while True:
            try:
                await self.join_once()
            except FeedbackUnavailable as exc:
                log.warning("label_join_failed", error=str(exc))
            await asyncio.sleep(self.settings.feedback.join_interval_s)


def log_policies(settings: Settings) -> LogPolicies:
    """Redaction per model; when anything is hashed, the hashes are keyed (a salt is set,
    read from its file, or generated once: gateway.security.secrets)."""
    p = settings.predlog

    def build(salt: str) -> LogPolicies:
        return LogPolicies.from_settings(
            p.policies,
            p.sample_rate,
            salt,
            hash_always=p.hash_always,
            context_allow=p.context_allow,
        )

    policies = build(p.redact_salt)
    if policies.redacts and not p.redact_salt:
        policies = build(redaction_salt(settings))
    return policies


def build_observability(
    settings: Settings, metrics: Metrics, clock: Clock = monotonic
) -> Observability:
    p, f, t = settings.predlog, settings.features, settings.telemetry
    client = redis_client(settings)
    fb = settings.feedback
    answered = fb.answered_prefix if fb.require_answered else None  # feedback integrity
    writer = (
        StreamWriter(client, p.stream_prefix, p.maxlen, answered, fb.answered_ttl_s)
        if client
        else None
    )
    predlog = PredictionLog(
        # With Redis the spool is a write-ahead log rotated by age too, so confirmed segments
        # go within about segment_max_age_s; without it, the segments are the log.
        spool=Spool(
            p.spool_dir,
            p.fsync,
            p.segment_bytes,
            max_age_s=p.segment_max_age_s if writer is not None else 0.0,
            keep_confirmed_s=p.keep_confirmed_s if writer is not None else 0.0,
        ),
        metrics=metrics,
        writer=writer,
        buffer_size=p.buffer_size,
        batch_size=p.batch_size,
        flush_interval_s=p.flush_interval_s,
        retry_interval_s=p.retry_interval_s,
        orphan_scan_interval_s=p.orphan_scan_interval_s,
        clock=clock,
    )
    obs = Observability(settings, metrics, predlog, log_policies(settings), redis=client)
    if client is not None:
        obs.features = FeatureStore(
            client, metrics, f.key_prefix, f.timeout_ms, f.cache_ttl_s, f.cache_size, clock
        )
        obs.labels = LabelStore(client, fb.label_prefix, fb.label_ttl_s, answered)
    if t.triton_scrape_interval_s > 0 and settings.triton.metrics_url:
        obs.scraper = TritonMetricsScraper(
            settings.triton.metrics_url, metrics, t.triton_scrape_interval_s
        )
    if t.gpu:
        obs.gpu = GpuCollector.detect()
        if obs.gpu is not None:
            metrics.registry.register(obs.gpu)
    return obs
