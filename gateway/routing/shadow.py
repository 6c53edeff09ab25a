"""Shadow traffic: copies of live requests sent to other versions, compared, never returned.

Copies are scheduled only once the primary answers are final, as background tasks, so they
cannot slow or change what the caller gets. At most `max_in_flight` copies run at once; beyond
that a copy is dropped and counted, never queued (a slow shadow must not pile up memory).
Each result is compared with the primary answer -- same decision (agreement) and score delta
-- logged with both versions and counted per (model, shadow target).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from gateway.backends.base import Backend
from gateway.catalog import ModelCatalog
from gateway.errors import SwitchyardError
from gateway.metrics import Metrics
from gateway.routing.table import Shadow
from gateway.tracing import Tracing, span
from gateway.types import Deadline, Target

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Primary:
    """What the caller got, to compare the shadow's answer with."""

    request_id: str
    model_name: str
    target: Target
    row: np.ndarray
    features: Any
    score: float | None
    decision: str | None


@dataclass(slots=True)
class Agreement:
    compared: int = 0
    agreed: int = 0
    abs_delta_sum: float = 0.0
    errors: int = 0
    dropped: int = 0

    def to_dict(self) -> dict[str, Any]:
        n = self.compared
        return {
            "compared": n,
            "agreement_rate": self.agreed / n if n else None,
            "mean_abs_score_delta": self.abs_delta_sum / n if n else None,
            "errors": self.errors,
            "dropped": self.dropped,
        }


class ShadowDispatcher:
    tracing: Tracing | None = None  # set by the composition root: a span per copy

    def __init__(
        self,
        backend: Backend,
        catalog: Callable[[], ModelCatalog],
        metrics: Metrics,
        *,
        max_in_flight: int = 64,
        timeout_s: float = 2.0,
        rng: random.Random | None = None,
    ) -> None:
        self.backend = backend
        self.catalog = catalog  # the live snapshot's catalog (reloads replace it)
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.rng = rng or random.Random()
        self.stats: dict[tuple[str, str], Agreement] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def dispatch(self, shadows: tuple[Shadow, ...], primary: Primary) -> None:
        """Schedule the sampled copies; returns at once (never awaits the backend)."""
        for shadow in shadows:
            if shadow.target == primary.target or self.rng.random() >= shadow.sample:
                continue
            key = (primary.model_name, str(shadow.target))
            stats = self.stats.setdefault(key, Agreement())
            if len(self._tasks) >= self.max_in_flight:
                stats.dropped += 1
                self.metrics.shadow.labels(*key, "dropped").inc()
                continue
            task = asyncio.create_task(self._run(shadow.target, primary, stats))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, target: Target, primary: Primary, stats: Agreement) -> None:
        labels = (primary.model_name, str(target))
        try:
            # The copy's task inherited the request's context: its span joins that trace.
            with span(self.tracing, "shadow", model=primary.model_name, target=str(target)):
                out = await self._infer(target, primary)
        except (SwitchyardError, ValueError) as exc:
            stats.errors += 1
            self.metrics.shadow.labels(*labels, "error").inc()
            log.warning(
                "shadow_error", request_id=primary.request_id, shadow=str(target), error=str(exc)
            )
            return
        score, decision = out.get("score"), out.get("decision")
        agree = decision == primary.decision
        delta = None if score is None or primary.score is None else float(score) - primary.score
        stats.compared += 1
        stats.agreed += agree
        if delta is not None:
            stats.abs_delta_sum += abs(delta)
            self.metrics.shadow_score_delta.labels(*labels).observe(abs(delta))
        self.metrics.shadow.labels(*labels, "agree" if agree else "disagree").inc()
        log.info(
            "shadow_compare",
            request_id=primary.request_id,
            model=primary.model_name,
            primary_version=str(primary.target),
            shadow_version=str(target),
            primary_decision=primary.decision,
            shadow_decision=decision,
            score_delta=delta,
            agree=agree,
        )

    async def _infer(self, target: Target, primary: Primary) -> Mapping[str, Any]:
        catalog = self.catalog()
        schema = catalog.schema(target.model, target.version)
        same = catalog.schema(primary.target.model, primary.target.version)
        row = (
            primary.row
            if same.features == schema.features
            else (schema.vectorize(primary.features))
        )
        request = schema.infer_request(row.reshape(1, -1), f"shadow-{primary.request_id}")
        resp = await self.backend.infer(request, Deadline.after(self.timeout_s))
        out: dict[str, Any] = {}
        for name, t in resp.outputs.items():
            v = t.data.ravel()[0]
            out[name] = v.decode() if isinstance(v, bytes) else v
        return out

    def summary(self) -> dict[str, dict[str, Any]]:
        return {f"{m} -> {t}": s.to_dict() for (m, t), s in sorted(self.stats.items())}

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
