"""The drift gauges: every `update_interval_s` the tracker's PSI goes to /metrics.

A background task of the app (cleanup_ctx in gateway/app.py). Versions whose window has
emptied (no traffic, or below min_rows) lose their series, so a stale PSI never keeps an
alert firing.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from gateway.clock import Clock
from gateway.config import Settings
from gateway.drift.reference import load_reference
from gateway.drift.tracker import DriftTracker
from gateway.metrics import Metrics

log = structlog.get_logger(__name__)


class DriftExporter:
    def __init__(self, tracker: DriftTracker, metrics: Metrics) -> None:
        self.tracker = tracker
        self.metrics = metrics
        self._features: set[tuple[str, str, str]] = set()
        self._scores: set[tuple[str, str]] = set()

    def export(self) -> None:
        m = self.metrics
        features: set[tuple[str, str, str]] = set()
        scores: set[tuple[str, str]] = set()
        for r in self.tracker.snapshot():
            for name, value in r.features.items():
                m.feature_drift_psi.labels(r.model, r.version, name).set(value)
                features.add((r.model, r.version, name))
            m.drift_window_rows.labels(r.model, r.version).set(r.rows)
            if r.score is not None:
                m.prediction_drift_psi.labels(r.model, r.version).set(r.score)
                scores.add((r.model, r.version))
        # NaN first: under PROMETHEUS_MULTIPROC_DIR a removed child's last value stays in the
        # worker's file, and NaN compares false with every alert threshold.
        for key in self._features - features:
            _drop(m.feature_drift_psi, key)
        for vkey in {k[:2] for k in self._features} - {k[:2] for k in features}:
            _drop(m.drift_window_rows, vkey)
        for skey in self._scores - scores:
            _drop(m.prediction_drift_psi, skey)
        self._features, self._scores = features, scores

    async def run(self, sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        while True:
            await sleep(self.tracker.policy.update_interval_s)
            try:
                self.export()
            except Exception:  # a bad manifest must not end the exports of the others
                log.exception("drift_export_failed")


def _drop(gauge: Any, labels: tuple[str, ...]) -> None:
    gauge.labels(*labels).set(math.nan)
    gauge.remove(*labels)


@dataclass(frozen=True, slots=True)
class Drift:
    tracker: DriftTracker
    exporter: DriftExporter

    async def ctx(self, _: Any) -> AsyncIterator[None]:
        """aiohttp cleanup_ctx: the export loop lives as long as the app."""
        task = asyncio.create_task(self.exporter.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def build_drift(settings: Settings, metrics: Metrics, clock: Clock) -> Drift | None:
    """The tracker over the model repository's manifests; None when drift.sample_rate is 0."""
    if settings.drift.sample_rate <= 0:
        return None
    repo = settings.routing.model_repository
    tracker = DriftTracker(settings.drift, lambda m, v: load_reference(repo, m, v), clock)
    return Drift(tracker, DriftExporter(tracker, metrics))
