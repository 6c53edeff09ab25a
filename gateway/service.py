"""InferenceService: the protocol-independent predict pipeline (ARCHITECTURE section 2).

`/v1` (JSON predictions) and `/v2` (Open Inference Protocol) are thin adapters over it.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import structlog

from gateway.backends.base import Backend, InferRequest, InferResponse
from gateway.batching import BatchingPolicy, Coalescer
from gateway.catalog import ModelCatalog, ModelSchema
from gateway.clock import Clock, monotonic
from gateway.errors import ClientError, DeadlineExceeded, NotReady, SwitchyardError
from gateway.features import FeatureStore
from gateway.metrics import Metrics
from gateway.predlog.redaction import LogPolicies, LogPolicy
from gateway.resilience.deadline import Deadline
from gateway.resilience.fallback import FallbackLadder, reason_for
from gateway.routing.shadow import Primary, ShadowDispatcher
from gateway.routing.table import Route, RouteTableRef, Target

log = structlog.get_logger(__name__)

_SCALAR_OUTPUTS = ("score", "decision", "confidence")


class PredictionSink(Protocol):
    def record(self, entry: dict[str, Any]) -> None: ...


@dataclass(frozen=True, slots=True)
class PredictRequest:
    request_id: str
    model_name: str
    features: Any = None
    entity_id: str | None = None
    feature_refs: tuple[str, ...] = ()
    context: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Prediction:
    request_id: str
    model_name: str
    model_version: str
    policy_version: str
    score: float | None
    decision: str | None
    confidence: float | None
    outputs: dict[str, Any]
    arm: str
    latency_ms: float = 0.0
    fallback_used: str | None = None
    explanations_ref: str | None = None
    #: The Triton model that produced the answer (the fallback model's name when it did;
    #: "default" for the route's static default). Logged, not returned.
    served_by: str = ""

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "request_id": self.request_id,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "policy_version": self.policy_version,
            "score": self.score,
            "decision": self.decision,
            "confidence": self.confidence,
            "explanations_ref": self.explanations_ref,
            "fallback_used": self.fallback_used,
            "latency_ms": round(self.latency_ms, 3),
        }
        if self.outputs:
            body["outputs"] = self.outputs
        return body


@dataclass(frozen=True, slots=True)
class _Planned:
    """One validated request, bound to the target that will answer it."""

    request: PredictRequest
    route: Route
    target: Target
    arm: str
    row: np.ndarray
    input_hash: str  # cache key of the response cache and field of the prediction log


class InferenceService:
    def __init__(
        self,
        *,
        routes: RouteTableRef,
        catalog: ModelCatalog,
        backend: Backend,
        predlog: PredictionSink,
        metrics: Metrics,
        default_deadline_ms: int = 1000,
        max_deadline_ms: int = 30_000,
        control_timeout_s: float = 2.0,
        clock: Clock = monotonic,
        features: FeatureStore | None = None,
        log_policies: LogPolicies | None = None,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        shadow: ShadowDispatcher | None = None,
        fallback: FallbackLadder | None = None,
        batching: BatchingPolicy | None = None,
    ) -> None:
        self.routes = routes
        self.catalog = catalog
        self.backend = backend
        self.predlog = predlog
        self.metrics = metrics
        self.default_deadline_ms = default_deadline_ms
        self.max_deadline_ms = max_deadline_ms
        self.control_timeout_s = control_timeout_s
        self.clock = clock
        self.features = features  # online feature store; None: feature_refs answer 400
        self.log_policies = log_policies or LogPolicies(LogPolicy(), {})
        self.wall = wall  # prediction log timestamps
        self.rng = rng or random.Random()  # random splits; tests inject a seeded one
        self.shadow = shadow
        self.fallback = fallback  # None: no ladder, primary errors reach the caller
        #: Merges concurrent single-row calls per target under load (gateway/batching.py).
        self.coalescer = (
            Coalescer(batching, self._call_rows) if batching and batching.enabled else None
        )
        #: Requests per (model, arm) since start, for GET /admin/routes.
        self.arm_counts: Counter[tuple[str, str]] = Counter()
        #: Metric children of successful answers per (model, version, arm), built once.
        self._ok_metrics: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    # -- deadlines -------------------------------------------------------------------------
    def deadline_for(self, context: Mapping[str, Any], route: Route | None = None) -> Deadline:
        ms = context.get("deadline_ms")
        if ms is None:
            ms = route.deadline_ms if route and route.deadline_ms else self.default_deadline_ms
        return Deadline.after(min(ms, self.max_deadline_ms) / 1000.0, self.clock)

    # -- /v1 predictions -------------------------------------------------------------------
    # The pipeline is split into steps with one owner each: features (online store),
    # choose (routing), answer (resilience: breakers, retries, fallback), after_answer (log,
    # shadow traffic). predict_batch only sequences them.

    async def _features(self, req: PredictRequest, deadline: Deadline) -> Any:
        """Inline features, or feature_refs resolved from the online store (inline wins)."""
        if not req.feature_refs:
            return req.features
        if self.features is None:
            raise ClientError(
                "feature_refs need the online feature store, which is not configured",
                code="feature_store_unavailable",
            )
        resolved = await self.features.resolve(req.feature_refs, req.entity_id, deadline)
        if req.features is None:
            return resolved
        if not isinstance(req.features, Mapping):
            raise ClientError(
                "with feature_refs, inline features must be an object of name -> number",
                code="invalid_field",
                details={"field": "features"},
            )
        return {**resolved, **req.features}

    def _choose(self, route: Route, req: PredictRequest) -> tuple[Target, str]:
        """The target and arm name that answer this request: segment, then split."""
        target, arm = route.choose(req.entity_id, req.context, self.rng)
        self.arm_counts[(route.name, arm)] += 1
        return target, arm

    async def _plan(self, req: PredictRequest, deadline: Deadline) -> _Planned:
        route = self.routes.current.get(req.model_name)
        target, arm = self._choose(route, req)
        schema = self.catalog.schema(target.model, target.version)
        # Inline features need no await: a coroutine per request costs more than the step.
        features = await self._features(req, deadline) if req.feature_refs else req.features
        row = schema.vectorize(features)
        return _Planned(req, route, target, arm, row, input_hash(target, row))

    async def _answer(
        self, target: Target, group: list[_Planned], deadline: Deadline
    ) -> list[Prediction]:
        """One backend call for every request bound to this target; when the primary cannot
        answer (breaker open, error after retries, out of time, too slow), the fallback
        ladder does, and each answer names its rung and the version that produced it."""
        schema = self.catalog.schema(target.model, target.version)
        # One row (every /v1/predict): a (1, n) view; np.stack costs ~2 us of Python per call.
        rows = group[0].row[np.newaxis] if len(group) == 1 else np.stack([p.row for p in group])
        request_id = group[0].request.request_id
        ladder = self.fallback
        if ladder is None:
            try:
                resp, base = await self._infer_rows(schema, rows, request_id, deadline)
            except SwitchyardError as exc:
                self._count_failure(group, exc)
                raise
            return [self._prediction(p, resp, base + j) for j, p in enumerate(group)]

        route = group[0].route
        keys = [p.input_hash for p in group]
        # Off for most routes: then no coroutine is built and awaited only to answer None.
        hits = (
            await ladder.cached_responses(route, keys, deadline)
            if ladder.caches_responses(route)
            else None
        )
        if hits is not None:  # response cache (deterministic models only, per route)
            return [
                self._cached_prediction(p, hit, None) for p, hit in zip(group, hits, strict=True)
            ]
        reason = ladder.skip_reason(route, target, deadline)
        error: SwitchyardError | None = None  # built only when needed: the happy path raises none
        if reason is None:
            started = self.clock()
            try:
                primary_deadline = ladder.primary_deadline(route, deadline)
                resp, base = await self._infer_rows(schema, rows, request_id, primary_deadline)
            except SwitchyardError as exc:
                if isinstance(exc, DeadlineExceeded):
                    ladder.observe(target, self.clock() - started)
                reason = reason_for(exc)
                if reason is None:  # bad input or load shedding: the caller must see it
                    self._count_failure(group, exc)
                    raise
                error = exc
            else:
                ladder.observe(target, self.clock() - started)
                preds = [self._prediction(p, resp, base + j) for j, p in enumerate(group)]
                ladder.remember(route, keys, [_cacheable(pred) for pred in preds])
                return preds
        rescue = await ladder.rescue(route, rows, keys, request_id, deadline, reason)
        if rescue is None:
            if error is None:  # the primary was skipped (deadline or latency trigger)
                error = DeadlineExceeded("no time left for the primary")
            self._count_failure(group, error)
            raise error
        if rescue.response is not None:
            preds = [self._prediction(p, rescue.response, j) for j, p in enumerate(group)]
            for pred in preds:
                pred.fallback_used = rescue.rung
            return preds
        return [
            self._cached_prediction(p, answer, rung)
            for p, (rung, answer) in zip(group, rescue.answers, strict=True)
        ]

    def _count_failure(self, group: list[_Planned], exc: SwitchyardError) -> None:
        self.metrics.requests.labels(group[0].request.model_name, exc.code).inc(len(group))

    def _cached_prediction(
        self, p: _Planned, answer: Mapping[str, Any], rung: str | None
    ) -> Prediction:
        return Prediction(
            request_id=p.request.request_id,
            model_name=p.request.model_name,
            model_version=str(answer.get("version") or p.target.version),
            policy_version=p.route.policy_version,
            score=answer.get("score"),
            decision=answer.get("decision"),
            confidence=answer.get("confidence"),
            outputs=dict(answer.get("outputs") or {}),
            arm=p.arm,
            fallback_used=rung,
            served_by="default" if rung == "default" else p.target.model,
        )

    def _after_answer(self, planned: list[_Planned], preds: list[Prediction]) -> None:
        """Runs once the answers are final: metrics and the prediction log."""
        for p, pred in zip(planned, preds, strict=True):
            self._record(p, pred)
        if self.shadow is not None:
            self._dispatch_shadows(planned, preds)

    def _dispatch_shadows(self, planned: list[_Planned], preds: list[Prediction]) -> None:
        """Fire-and-forget copies to the route's shadow targets (answers already final)."""
        assert self.shadow is not None
        for p, pred in zip(planned, preds, strict=True):
            if p.route.shadows and pred.fallback_used is None:
                self.shadow.dispatch(p.route.shadows, Primary(
                    pred.request_id, pred.model_name, p.target, p.row, p.request.features,
                    pred.score, pred.decision))  # fmt: skip

    async def predict(self, req: PredictRequest) -> Prediction:
        return (await self.predict_batch([req]))[0]

    async def predict_batch(self, reqs: Sequence[PredictRequest]) -> list[Prediction]:
        """Validate everything first (bad input never reaches Triton), then one backend call
        per target with the rows stacked, so a batch costs one round trip."""
        started = self.clock()
        first_route = self.routes.current.get(reqs[0].model_name)
        deadline = self.deadline_for(reqs[0].context, first_route)
        planned = []
        for i, r in enumerate(reqs):
            try:
                planned.append(await self._plan(r, deadline))
            except SwitchyardError as exc:
                if len(reqs) > 1:
                    exc.details.setdefault("index", i)
                raise
        groups: dict[Target, list[int]] = {}
        for i, p in enumerate(planned):
            groups.setdefault(p.target, []).append(i)
        results: list[Prediction | None] = [None] * len(planned)
        for target, idx in groups.items():
            answers = await self._answer(target, [planned[i] for i in idx], deadline)
            for i, pred in zip(idx, answers, strict=True):
                results[i] = pred
        latency_ms = (self.clock() - started) * 1000.0
        preds = [p for p in results if p is not None]
        assert len(preds) == len(planned), "every planned request gets an answer"
        for pred in preds:
            pred.latency_ms = latency_ms
        self._after_answer(planned, preds)
        return preds

    async def _infer_rows(
        self, schema: ModelSchema, rows: np.ndarray, request_id: str, deadline: Deadline
    ) -> tuple[InferResponse, int]:
        """The response holding ``rows`` and the index of the first of them in it (not 0
        when the coalescer merged this call with others for the same target)."""
        if self.coalescer is not None:
            return await self.coalescer.infer_rows(schema, rows, request_id, deadline)
        return await self._call_rows(schema, rows, request_id, deadline), 0

    async def _call_rows(
        self, schema: ModelSchema, rows: np.ndarray, request_id: str, deadline: Deadline
    ) -> InferResponse:
        request = schema.infer_request(rows, request_id)
        return await self.backend.infer(request, deadline.check("backend call"))

    def _prediction(self, p: _Planned, resp: InferResponse, row: int) -> Prediction:
        values: dict[str, Any] = {}
        for name, t in resp.outputs.items():
            v = t.data[row]
            if t.datatype == "BYTES":
                values[name] = [x.decode() if isinstance(x, bytes) else str(x) for x in v.ravel()]
            else:
                values[name] = v.tolist()
        scalars = {k: _first(values.pop(k)) for k in _SCALAR_OUTPUTS if k in values}
        return Prediction(
            request_id=p.request.request_id,
            model_name=p.request.model_name,
            model_version=resp.version or p.target.version,
            policy_version=p.route.policy_version,
            score=scalars.get("score"),
            decision=scalars.get("decision"),
            confidence=scalars.get("confidence"),
            outputs=values,
            arm=p.arm,
            served_by=resp.model or p.target.model,
        )

    def _record(self, p: _Planned, pred: Prediction) -> None:
        key = (pred.model_name, pred.model_version, pred.arm)
        children = self._ok_metrics.get(key)
        if children is None:  # .labels() validates and locks on every call: once per key
            children = self._ok_metrics[key] = (
                self.metrics.latency.labels(*key),
                self.metrics.requests.labels(pred.model_name, "ok"),
            )
        children[0].observe(pred.latency_ms / 1000.0)
        children[1].inc()
        # Redaction and sampling happen here, before the entry leaves the process; record()
        # only enqueues, so the request never waits on the log.
        policy = self.log_policies.for_model(pred.model_name)
        entry: dict[str, Any] = {
            "request_id": pred.request_id,
            "entity_id": p.request.entity_id,
            "model": pred.model_name,
            "target": pred.served_by or p.target.model,
            "version": pred.model_version,
            "policy_version": pred.policy_version,
            "arm": pred.arm,
            "input_hash": p.input_hash,
            "output": {"score": pred.score, "decision": pred.decision,
                       "confidence": pred.confidence},
            "fallback_used": pred.fallback_used,
            "latency_ms": round(pred.latency_ms, 3),
            "ts": self.wall(),
        }  # fmt: skip
        if policy.sampled(self.log_policies.rand):
            names = self.catalog.schema(p.target.model, p.target.version).features
            entry["payload"] = {
                "features": dict(zip(names, p.row.tolist(), strict=True)),
                "context": dict(p.request.context),
            }
        self.predlog.record(policy.apply(entry))

    # -- /v2 tensors -----------------------------------------------------------------------
    def resolve_version(self, model: str, version: str) -> str:
        """An unversioned OIP call to a routed model goes to the route's champion, so OIP and
        /v1 clients see the same rollout; explicit versions are honoured as asked."""
        if version:
            return version
        route = self.routes.current.routes.get(model)
        if route is not None and route.champion.model == model:
            return route.champion.version
        return ""

    async def infer(self, request: InferRequest, deadline: Deadline) -> InferResponse:
        return await self.backend.infer(request, deadline.check("backend call"))

    # -- readiness -------------------------------------------------------------------------
    async def ready(self) -> dict[str, bool]:
        """Readiness of every champion target; raises NotReady naming those that are not."""
        states = {}
        for route in self.routes.current.routes.values():
            t = route.champion
            try:
                ok = await self.backend.model_ready(t.model, t.version, self.control_timeout_s)
            except SwitchyardError:
                ok = False
            states[str(t)] = ok
        not_ready = sorted(k for k, v in states.items() if not v)
        if not_ready:
            raise NotReady("targets not ready: " + ", ".join(not_ready), details=states)
        return states


def _cacheable(pred: Prediction) -> dict[str, Any]:
    """What the cache keeps of an answer: enough to answer again, naming its version."""
    return {
        "version": pred.model_version,
        "score": pred.score,
        "decision": pred.decision,
        "confidence": pred.confidence,
        "outputs": pred.outputs,
    }


def input_hash(target: Target, row: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(str(target).encode())
    h.update(np.ascontiguousarray(row, dtype=np.float32).tobytes())
    return h.hexdigest()


def _first(v: Any) -> Any:
    return v[0] if isinstance(v, list) and len(v) == 1 else v
