"""The fallback ladder: what answers when the primary target cannot, in a fixed order.

    (a) fallback_model  the route's distilled model (its own Triton in the default stack)
    (b) cache           the last answer for the same input hash (LRU + Redis, TTL per route)
    (c) default         the route's static answer

Triggers (the `reason` label of `fallback_total`): ``breaker_open`` / ``no_ready_server``
(fail fast), ``error`` (failed after retries), ``deadline`` (primary ran out of time, or too
little was left to try it), ``latency`` (the primary's p99 is over the route's threshold;
only a trickle of probe requests goes to the primary until it recovers).

Part of each request's deadline is held back from the primary so the ladder has time to run.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from gateway.backends.base import Backend, InferResponse
from gateway.catalog import ModelCatalog
from gateway.clock import Clock, monotonic
from gateway.errors import (
    BackendError,
    BackendUnavailable,
    DeadlineExceeded,
    SwitchyardError,
)
from gateway.metrics import Metrics
from gateway.resilience.breaker import CircuitOpen
from gateway.resilience.cache import CachedAnswer, PredictionCache
from gateway.resilience.deadline import Deadline
from gateway.routing.table import Route, Target

log = structlog.get_logger(__name__)

RUNGS = ("fallback_model", "cache", "default")
#: model_version reported when the route's static default answers: no model produced it.
DEFAULT_VERSION = "default"
_SCALARS = ("score", "decision", "confidence")


@dataclass(frozen=True)
class LatencyTriggerPolicy:
    p99_ms: float = 300.0  # threshold for routes not in route_p99_ms
    window_s: float = 30.0
    min_samples: int = 20  # fewer samples in the window never trip it
    probe_every_s: float = 0.5  # while tripped, one request per this goes to the primary
    max_samples: int = 10_000
    route_p99_ms: Mapping[str, float] = field(default_factory=dict)  # per-route thresholds


@dataclass(frozen=True)
class FallbackPolicy:
    reserve_s: float = 0.1  # of each deadline held back from the primary for the ladder...
    reserve_fraction: float = 0.3  # ...but never more than this share of what is left
    min_primary_s: float = 0.005  # less left than this: skip the primary ("deadline")
    warm_interval_s: float = 5.0  # period of the fallback models' warm-up probe
    latency: LatencyTriggerPolicy = field(default_factory=LatencyTriggerPolicy)
    #: Per-route response cache TTL (route name -> seconds), for deterministic models only:
    #: a hit answers without calling the backend. Off for every route not listed.
    response_cache_ttl_s: Mapping[str, float] = field(default_factory=dict)


class LatencyTrigger:
    """Rolling p99 of one primary target's latency; recomputed at most every 250 ms."""

    def __init__(self, policy: LatencyTriggerPolicy, clock: Clock = monotonic) -> None:
        self.policy = policy
        self.clock = clock
        # Times and latencies in two deques (same length always): the recompute reads the
        # latencies straight into numpy, without a Python-level pass over tuples.
        self._times: deque[float] = deque(maxlen=policy.max_samples)
        self._values: deque[float] = deque(maxlen=policy.max_samples)
        self._p99_s: float | None = None
        self._computed_at = float("-inf")
        self._last_probe = float("-inf")

    def observe(self, latency_s: float) -> None:
        self._times.append(self.clock())
        self._values.append(latency_s)

    def p99_s(self) -> float | None:
        now = self.clock()
        if now - self._computed_at >= 0.25:
            horizon = now - self.policy.window_s
            times, values = self._times, self._values
            while times and times[0] < horizon:
                times.popleft()
                values.popleft()
            if len(values) < self.policy.min_samples:
                self._p99_s = None
            else:
                latencies = np.fromiter(values, np.float64, len(values))
                self._p99_s = float(np.percentile(latencies, 99))
            self._computed_at = now
        return self._p99_s

    def tripped(self, threshold_ms: float) -> bool:
        p99 = self.p99_s()
        return p99 is not None and p99 * 1000.0 > threshold_ms

    def take_probe(self) -> bool:
        now = self.clock()
        if now - self._last_probe >= self.policy.probe_every_s:
            self._last_probe = now
            return True
        return False


@dataclass(frozen=True, slots=True)
class Rescue:
    """What the ladder answered with: a fallback model response, or one answer per row."""

    rung: str  # the first row's rung (all rows' for a fallback model response)
    response: InferResponse | None = None
    answers: tuple[tuple[str, CachedAnswer], ...] = ()  # (rung, answer) per row


def reason_for(exc: SwitchyardError) -> str | None:
    """The fallback trigger a primary failure maps to; None: not the ladder's business
    (bad input, or load shedding, which must reach the client as 503)."""
    if isinstance(exc, CircuitOpen):
        return "breaker_open"
    if exc.details.get("reason") == "no_ready_server":
        return "no_ready_server"
    if isinstance(exc, DeadlineExceeded):
        return "deadline"
    if isinstance(exc, BackendUnavailable | BackendError):
        return "error"
    return None


class FallbackLadder:
    def __init__(
        self,
        *,
        backend: Backend,
        catalog: Callable[[], ModelCatalog],
        cache: PredictionCache,
        metrics: Metrics,
        policy: FallbackPolicy,
        clock: Clock = monotonic,
    ) -> None:
        self.backend = backend
        self.catalog = catalog  # the live catalog (reloads replace it)
        self.cache = cache
        self.metrics = metrics
        self.policy = policy
        self.clock = clock
        self._latency: dict[Target, LatencyTrigger] = {}

    # -- before the primary ----------------------------------------------------------------
    def skip_reason(self, route: Route, target: Target, deadline: Deadline) -> str | None:
        """A reason to not even try the primary, or None."""
        if deadline.remaining() < self.policy.min_primary_s:
            return "deadline"
        trigger = self._trigger(target)
        if trigger.tripped(self._threshold_ms(route)) and not trigger.take_probe():
            return "latency"
        return None

    def primary_deadline(self, route: Route, deadline: Deadline) -> Deadline:
        """The primary's share of the budget: the rest is kept for the ladder."""
        fb = route.fallback
        if fb.target is None and fb.default is None and fb.cache_ttl_s <= 0:
            return deadline  # no ladder: the primary may spend everything
        left = deadline.remaining()
        reserve = min(self.policy.reserve_s, left * self.policy.reserve_fraction)
        return Deadline(deadline.expires_at - reserve, deadline.clock)

    def caches_responses(self, route: Route) -> bool:
        """Whether the route has a response cache (callers skip `cached_responses` if not)."""
        return self._response_ttl(route) > 0

    async def cached_responses(
        self, route: Route, keys: Sequence[str], deadline: Deadline
    ) -> list[CachedAnswer] | None:
        """Every row's answer from the response cache, or None (off, or any miss)."""
        if self._response_ttl(route) <= 0:
            return None
        hits = []
        for key in keys:
            hit = await self.cache.get(key, deadline.remaining() / 4)
            if hit is None:
                return None
            hits.append(hit)
        return hits

    # -- after the primary -----------------------------------------------------------------
    def observe(self, target: Target, latency_s: float) -> None:
        self._trigger(target).observe(latency_s)

    def remember(self, route: Route, keys: Sequence[str], answers: Sequence[CachedAnswer]) -> None:
        ttl = max(route.fallback.cache_ttl_s, self._response_ttl(route))
        if ttl > 0:
            for key, answer in zip(keys, answers, strict=True):
                self.cache.put(key, answer, ttl)

    async def rescue(
        self,
        route: Route,
        rows: np.ndarray,
        keys: Sequence[str],
        request_id: str,
        deadline: Deadline,
        reason: str,
    ) -> Rescue | None:
        """Walk the ladder; the first rung that answers every row wins. None: none did."""
        fb = route.fallback
        if fb.target is not None and deadline.remaining() > self.policy.min_primary_s:
            resp = await self._fallback_model(fb.target, rows, request_id, deadline)
            if resp is not None:
                return self._count(Rescue("fallback_model", response=resp), reason, len(keys))
        answers: list[CachedAnswer | None] = [None] * len(keys)
        if fb.cache_ttl_s > 0:
            for i, key in enumerate(keys):
                answers[i] = await self.cache.get(key, deadline.remaining())
        default = _default_answer(fb.default) if fb.default is not None else None
        rows_answered: list[tuple[str, CachedAnswer]] = []
        for a in answers:
            if a is not None:
                rows_answered.append(("cache", a))
            elif default is not None:
                rows_answered.append(("default", default))
            else:
                return None  # a row nothing can answer fails the call
        for rung, _ in rows_answered:
            self.metrics.fallback.labels(rung, reason).inc()
        return Rescue(rows_answered[0][0], answers=tuple(rows_answered))

    async def _fallback_model(
        self, target: Target, rows: np.ndarray, request_id: str, deadline: Deadline
    ) -> InferResponse | None:
        try:
            schema = self.catalog().schema(target.model, target.version)
            if rows.shape[1] != len(schema.features):
                log.warning("fallback_schema_mismatch", target=str(target))
                return None
            request = schema.infer_request(rows, request_id)
            resp = await self.backend.infer(request, deadline.check("fallback model"))
        except SwitchyardError as exc:
            log.info("fallback_model_failed", target=str(target), error=exc.code)
            return None
        # The answer names the version that produced it: the fallback's, never the primary's.
        return dataclasses.replace(resp, model=target.model, version=resp.version or target.version)

    # -- warm-up ---------------------------------------------------------------------------
    async def warm(self, routes: Sequence[Route], timeout_s: float) -> dict[str, bool]:
        """One known input through every route's fallback model: keeps it loaded and hot,
        and feeds its server's breaker with fresh outcomes."""
        results = {}
        for route in routes:
            t = route.fallback.target
            if t is None:
                continue
            schema = self.catalog().schema(t.model, t.version)
            rows = np.zeros((1, len(schema.features)), dtype=np.float32)
            deadline = Deadline.after(timeout_s, self.clock)
            resp = await self._fallback_model(t, rows, "warm-probe", deadline)
            results[str(t)] = resp is not None
            if resp is None:
                log.warning("fallback_warm_probe_failed", target=str(t))
        return results

    async def run_warmer(self, routes: Any, timeout_s: float) -> None:
        """Background task: `warm` every `warm_interval_s` until cancelled. ``routes`` is the
        live RouteTableRef, so reloaded routes are probed too."""
        while True:
            await self.warm(list(routes.current.routes.values()), timeout_s)
            await asyncio.sleep(self.policy.warm_interval_s)

    # -- internals -------------------------------------------------------------------------
    def _trigger(self, target: Target) -> LatencyTrigger:
        trigger = self._latency.get(target)
        if trigger is None:
            trigger = self._latency[target] = LatencyTrigger(self.policy.latency, self.clock)
        return trigger

    def _threshold_ms(self, route: Route) -> float:
        latency = self.policy.latency
        return float(latency.route_p99_ms.get(route.name, latency.p99_ms))

    def _response_ttl(self, route: Route) -> float:
        return float(self.policy.response_cache_ttl_s.get(route.name, 0.0))

    def _count(self, rescue: Rescue, reason: str, n: int) -> Rescue:
        self.metrics.fallback.labels(rescue.rung, reason).inc(n)
        return rescue


def _default_answer(default: Mapping[str, Any]) -> CachedAnswer:
    return {
        "version": DEFAULT_VERSION,
        "score": default.get("score"),
        "decision": default.get("decision"),
        "confidence": default.get("confidence"),
        "outputs": {
            k: v for k, v in default.items() if k not in ("score", "decision", "confidence")
        },
    }
