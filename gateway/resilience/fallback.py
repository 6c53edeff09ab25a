"""The fallback ladder: what answers when the primary target cannot, in a fixed order.

    (a) fallback_model  the route's distilled model (its own Triton in the default stack)
    (b) cache           the last answer for the same input hash (LRU + Redis, TTL per route)
    (c) default         the route's static answer

A layer of the request path, `infer(request, deadline)`, above the coalescer. The route's
ladder rides on the request (`CallPolicy`); the trigger is the primary error's class trait
`fallback_reason` (the `reason` label of `fallback_total`): ``breaker_open`` /
``no_ready_server`` (fail fast), ``error`` (failed after retries), ``overloaded`` (the server
said RESOURCE_EXHAUSTED), ``deadline`` (primary ran out of time, or too little was left to
try it), ``latency`` (the primary's p99 is over the route's ``slo.p99_ms``; only a trickle of
probe requests goes to the primary until it recovers). The default rung answers only
requests of independent rows whose outputs are scalars (the service decides at plan time).

Part of each request's deadline is held back from the primary so the ladder has time to run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import structlog

from gateway.clock import Clock, monotonic
from gateway.errors import DeadlineExceeded, SwitchyardError
from gateway.metrics import Metrics
from gateway.resilience.cache import CachedAnswer, PredictionCache, serves
from gateway.stats import p99
from gateway.tensors import backend_parameters, numpy_dtype, to_bytes
from gateway.tracing import Tracing, span
from gateway.types import CallPolicy, Deadline, InferRequest, InferResponse, Target, Tensor

log = structlog.get_logger(__name__)


class InferLayer(Protocol):
    async def infer(self, request: InferRequest, deadline: Deadline) -> InferResponse: ...


RUNGS = ("fallback_model", "cache", "default")
#: model_version reported when the route's static default answers: no model produced it.
DEFAULT_VERSION = "default"


@dataclass(frozen=True)
class LatencyTriggerPolicy:
    p99_ms: float = 300.0  # threshold for routes whose file sets no slo.p99_ms
    slo_multiplier: float = 1.0  # trip when the primary's p99 passes this x the route's SLO
    window_s: float = 30.0
    min_samples: int = 20  # fewer samples in the window never trip it
    probe_every_s: float = 0.5  # while tripped, one request per this goes to the primary
    max_samples: int = 10_000


@dataclass(frozen=True)
class FallbackPolicy:
    reserve_s: float = 0.1  # of each deadline held back from the primary for the ladder...
    reserve_fraction: float = 0.3  # ...but never more than this share of what is left
    min_primary_s: float = 0.005  # less left than this: skip the primary ("deadline")
    warm_interval_s: float = 5.0  # period of the fallback models' warm-up probe
    latency: LatencyTriggerPolicy = field(default_factory=LatencyTriggerPolicy)


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
                self._p99_s = p99(values)
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


def cache_keys(request: InferRequest) -> tuple[str, ...]:
    """The cache keys of a request (the Service's, when it computed them)."""
    return request.cache_keys or input_digests(
        request.model, request.version, request.inputs, request.batchable
    )


def input_digests(
    model: str, version: str, inputs: Sequence[Tensor], batchable: bool
) -> tuple[str, ...]:
    """One digest per row when rows are independent (blake2b of ``model@version`` and the
    row's bytes: /v1 and /v2 agree for the same row), else one over every input."""
    if batchable and len(inputs) == 1:
        prefix = f"{model}@{version}".encode()
        rows = np.ascontiguousarray(inputs[0].data)
        return tuple(_digest(prefix, row.tobytes()) for row in rows)
    h = hashlib.blake2b(f"{model}@{version}".encode(), digest_size=16)
    for t in inputs:
        h.update(t.name.encode() + b"\0" + t.datatype.encode() + str(t.shape).encode())
        h.update(to_bytes(t))
    return (h.hexdigest(),)


def _digest(prefix: bytes, data: bytes) -> str:
    h = hashlib.blake2b(prefix, digest_size=16)
    h.update(data)
    return h.hexdigest()


class FallbackLadder:
    """A layer of the request path: wraps the primary call of every routed request."""

    tracing: Tracing | None = None  # set by the composition root: a span per rung

    def __init__(
        self,
        *,
        inner: InferLayer,
        cache: PredictionCache,
        metrics: Metrics,
        policy: FallbackPolicy,
        clock: Clock = monotonic,
    ) -> None:
        self.inner = inner  # the coalescer (primary and fallback models alike)
        self.cache = cache
        self.metrics = metrics
        self.policy = policy
        self.clock = clock
        self._latency: dict[tuple[str, str], LatencyTrigger] = {}

    async def infer(self, request: InferRequest, deadline: Deadline) -> InferResponse:
        """The primary's answer; when it cannot give one (breaker open, error after retries,
        out of time, too slow, overloaded), the first rung that answers every row. The
        response names the rung (``parameters.fallback_used``) and the version that
        answered."""
        route = request.policy
        if route is None:  # a model without a route: no ladder, nothing cached
            return await self.inner.infer(request, deadline)
        keys: Sequence[str] | None = None
        # A stateful call (a sequence's step) or one a custom parameter shapes is no input's
        # fixed answer: the caches neither serve nor keep it.
        cacheable = not backend_parameters(request.parameters)
        if route.response_cache_ttl_s > 0 and cacheable:  # deterministic models, per route
            keys = cache_keys(request)
            hit = await self._from_cache(request, keys, deadline.remaining() / 4)
            if hit is not None:
                return hit
        reason = self._skip_reason(route, request, deadline)
        error: SwitchyardError | None = None  # built only when needed
        if reason is None:
            try:
                return await self._primary(
                    request, keys, self._primary_deadline(route, deadline), cacheable
                )
            except SwitchyardError as exc:
                reason = exc.fallback_reason
                if reason is None or not route.has_ladder:
                    raise  # bad input or load shedding: the caller must see it
                error = exc
        rescue = await self._rescue(request, keys, deadline, reason)
        if rescue is not None:
            return rescue
        if reason == "latency":
            # Skipped for being slow, and no rung answered: a slow answer beats none, and
            # the primary may spend what is left (the ladder has nothing more to give).
            return await self._primary(request, keys, deadline, cacheable)
        raise error or DeadlineExceeded("no time left for the primary")

    async def _primary(
        self,
        request: InferRequest,
        keys: Sequence[str] | None,
        deadline: Deadline,
        cacheable: bool = True,
    ) -> InferResponse:
        """The primary's answer, timed for the latency trigger and remembered in the cache."""
        route = request.policy
        assert route is not None
        started = self.clock()
        try:
            with span(self.tracing, "rung primary", model=request.model):
                resp = await self.inner.infer(request, deadline)
        except DeadlineExceeded:
            self._trigger(request).observe(self.clock() - started)
            raise
        self._trigger(request).observe(self.clock() - started)
        ttl = max(route.cache_ttl_s, route.response_cache_ttl_s)
        if ttl > 0 and cacheable:
            self._remember(request, keys or cache_keys(request), resp, ttl)
        return resp

    # -- before the primary ----------------------------------------------------------------
    def _skip_reason(
        self, route: CallPolicy, request: InferRequest, deadline: Deadline
    ) -> str | None:
        """A reason to not even try the primary, or None."""
        if not route.has_ladder:
            return None
        if deadline.remaining() < self.policy.min_primary_s:
            return "deadline"
        trigger = self._trigger(request)
        latency = self.policy.latency
        threshold = (
            route.p99_ms * latency.slo_multiplier if route.p99_ms is not None else latency.p99_ms
        )
        if trigger.tripped(threshold) and not trigger.take_probe():
            return "latency"
        return None

    def _primary_deadline(self, route: CallPolicy, deadline: Deadline) -> Deadline:
        """The primary's share of the budget: the rest is kept for the ladder."""
        if not route.has_ladder:
            return deadline  # no ladder: the primary may spend everything
        left = deadline.remaining()
        return deadline.shortened(min(self.policy.reserve_s, left * self.policy.reserve_fraction))

    # -- the rungs -------------------------------------------------------------------------
    async def _rescue(
        self, request: InferRequest, keys: Sequence[str] | None, deadline: Deadline, reason: str
    ) -> InferResponse | None:
        """Walk the ladder; the first rung that answers every row wins. None: none did."""
        route = request.policy
        assert route is not None
        tracing = self.tracing
        if route.fallback is not None and deadline.remaining() > self.policy.min_primary_s:
            with span(tracing, "rung fallback_model", reason=reason):
                resp = await self._fallback_model(route.fallback, request, deadline)
            if resp is not None:
                return self._answered(resp, "fallback_model", reason, _rows(request))
        if route.cache_ttl_s > 0 and not backend_parameters(request.parameters):
            with span(tracing, "rung cache", reason=reason):
                hit = await self._from_cache(
                    request, keys or cache_keys(request), deadline.remaining(), rung="cache"
                )
            if hit is not None:
                return self._answered(hit, "cache", reason, _rows(request))
        if route.default is not None and request.batchable:
            with span(tracing, "rung default", reason=reason):
                return self._answered(
                    _default_response(request, route.default), "default", reason, _rows(request)
                )
        return None

    async def _fallback_model(
        self, target: Target, request: InferRequest, deadline: Deadline
    ) -> InferResponse | None:
        """The same inputs to the route's distilled model (the service checked at plan time
        that its schema fits the primary's; explicit outputs are kept)."""
        fallback = dataclasses.replace(
            request, model=target.model, version=target.version, policy=None, priority=0
        )
        try:
            resp = await self.inner.infer(fallback, deadline)
        except SwitchyardError as exc:
            log.info("fallback_model_failed", target=str(target), error=exc.code)
            return None
        # The answer names the version that produced it: the fallback's, never the primary's.
        return dataclasses.replace(resp, model=target.model, version=resp.version or target.version)

    def _answered(self, resp: InferResponse, rung: str, reason: str, n: int) -> InferResponse:
        self.metrics.fallback.labels(rung, reason).inc(n)
        return dataclasses.replace(resp, parameters={**resp.parameters, "fallback_used": rung})

    # -- the cache -------------------------------------------------------------------------
    def _remember(
        self, request: InferRequest, keys: Sequence[str], resp: InferResponse, ttl: float
    ) -> None:
        per_row = len(keys) > 1 or request.batchable
        # A call that named its outputs got those only: its answer serves calls that ask
        # for no more (cache.serves); a call that named none got every output.
        complete = not request.outputs
        for i, key in enumerate(keys):
            if self.cache.fresh(key, resp.model, resp.version, ttl, request.outputs):
                continue  # this version's answer to this input is cached and fresh
            outputs = {
                name: [t.datatype, *_unit(t.data[i] if per_row else t.data)]
                for name, t in resp.outputs.items()
            }
            self.cache.put(key, {"model": resp.model, "version": resp.version,
                                 "outputs": outputs, "complete": complete}, ttl)  # fmt: skip

    async def _from_cache(
        self, request: InferRequest, keys: Sequence[str], timeout_s: float, rung: str = ""
    ) -> InferResponse | None:
        """Every key's answer from the cache as one response, or None (any miss)."""
        hits: list[CachedAnswer] = []
        for key in keys:
            hit = await self.cache.get(key, timeout_s)
            if hit is None or not serves(hit, request.outputs):
                return None
            hits.append(hit)
        per_row = len(keys) > 1 or request.batchable
        outputs: dict[str, Tensor] = {}
        for name in request.outputs or hits[0]["outputs"]:
            datatype = hits[0]["outputs"][name][0]
            units = [_array(datatype, *h["outputs"][name][1:]) for h in hits]
            outputs[name] = Tensor(name, datatype, np.stack(units) if per_row else units[0])
        first = hits[0]
        return InferResponse(
            str(first.get("model") or request.model),
            str(first.get("version") or request.version),
            outputs,
            request.request_id,
        )

    # -- warm-up ---------------------------------------------------------------------------
    async def warm(self, probes: Sequence[InferRequest], timeout_s: float) -> dict[str, bool]:
        """One known input through every route's fallback model: keeps it loaded and hot,
        and feeds its server's breaker with fresh outcomes."""
        results = {}
        for probe in probes:
            deadline = Deadline.after(timeout_s, self.clock)
            try:
                await self.inner.infer(probe, deadline)
                ok = True
            except SwitchyardError as exc:
                log.warning("fallback_warm_probe_failed", target=probe.model, error=exc.code)
                ok = False
            results[f"{probe.model}@{probe.version}"] = ok
        return results

    async def run_warmer(
        self, probes: Callable[[], Sequence[InferRequest]], timeout_s: float
    ) -> None:
        """Background task: `warm` every `warm_interval_s` until cancelled. ``probes`` reads
        the live route table, so reloaded routes are probed too."""
        while True:
            await self.warm(probes(), timeout_s)
            await asyncio.sleep(self.policy.warm_interval_s)

    # -- internals -------------------------------------------------------------------------
    def _trigger(self, request: InferRequest) -> LatencyTrigger:
        key = (request.model, request.version)
        trigger = self._latency.get(key)
        if trigger is None:
            trigger = self._latency[key] = LatencyTrigger(self.policy.latency, self.clock)
        return trigger


def _rows(request: InferRequest) -> int:
    return len(request.inputs[0].data) if request.batchable and request.inputs else 1


def _unit(a: np.ndarray) -> tuple[list[int], list[Any]]:
    """An array as (shape, flat JSON-able values): BYTES as latin-1 text (lossless)."""
    flat = a.ravel()
    if a.dtype == np.object_:
        return list(a.shape), [
            x.decode("latin-1") if isinstance(x, bytes) else str(x) for x in flat
        ]
    return list(a.shape), flat.tolist()


def _array(datatype: str, shape: list[int], data: list[Any]) -> np.ndarray:
    if datatype == "BYTES":
        arr = np.empty(len(data), dtype=np.object_)
        arr[:] = [x.encode("latin-1") for x in data]
        return arr.reshape(shape)
    return np.asarray(data, dtype=numpy_dtype(datatype)).reshape(shape)


def _default_response(request: InferRequest, default: Mapping[str, Any]) -> InferResponse:
    """The route's static answer for every row: numbers as FP32 [n, 1], text as BYTES [n, 1]."""
    n = _rows(request)
    outputs: dict[str, Tensor] = {}
    for name, value in default.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            arr = np.empty((n, 1), dtype=np.object_)
            arr[:] = str(value).encode()
            outputs[name] = Tensor(name, "BYTES", arr)
        else:
            outputs[name] = Tensor(name, "FP32", np.full((n, 1), value, dtype=np.float32))
    return InferResponse("default", DEFAULT_VERSION, outputs, request.request_id)
