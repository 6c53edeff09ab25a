"""InferenceService: the top layer of the request path, one core for every protocol.

`/v1` (JSON predictions), `/v2` (Open Inference Protocol over REST) and the OIP gRPC server
are thin adapters over it. It plans each request (route table snapshot -> target and arm,
features, the route's CallPolicy) and records what was answered (prediction log, metrics,
shadow copies); everything in between is the stack below, one call shape all the way down:

    Service -> FallbackLadder -> Coalescer -> Pool (admission, breaker, retry) -> Triton
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import structlog

from gateway.backends.base import Backend
from gateway.batching import InferLayer
from gateway.catalog import ModelCatalog, ModelSchema
from gateway.clock import Clock, monotonic
from gateway.errors import (
    ClientError,
    DeadlineExceeded,
    ModelNotFound,
    NotReady,
    SwitchyardError,
    VersionNotFound,
)
from gateway.features import FeatureStore
from gateway.metrics import Metrics
from gateway.predlog.redaction import LogPolicies, LogPolicy
from gateway.resilience.fallback import input_digests
from gateway.routing.shadow import Primary, ShadowDispatcher
from gateway.routing.table import Route, RouteTable, RouteTableRef
from gateway.tensors import backend_parameters
from gateway.tracing import NOOP, Tracing, span
from gateway.types import CallPolicy, Deadline, InferRequest, InferResponse, Target, Tensor

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
    """One validated /v1 request, bound to the target that will answer it."""

    request: PredictRequest
    route: Route
    target: Target
    arm: str
    row: np.ndarray
    input_hash: str  # field of the prediction log
    deadline: Deadline  # the request's own (a batch's items each keep theirs)
    #: The row's feature names, from the table it was planned on: a reload meanwhile may
    #: retire the version, and the sampled payload must not turn an answer into a 404.
    features: tuple[str, ...] = ()


class InferenceService:
    tracing: Tracing | None = None  # set by the composition root: spans route, features, log
    #: Live-input drift (gateway.drift.tracker.DriftTracker), set by the app; None: off.
    drift: Any = None

    def __init__(
        self,
        *,
        routes: RouteTableRef,
        stack: InferLayer,
        backend: Backend,
        predlog: PredictionSink,
        metrics: Metrics,
        default_deadline_ms: int = 1000,
        max_deadline_ms: int = 30_000,
        slo_deadline_factor: float = 2.0,
        control_timeout_s: float = 2.0,
        clock: Clock = monotonic,
        features: FeatureStore | None = None,
        log_policies: LogPolicies | None = None,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        shadow: ShadowDispatcher | None = None,
    ) -> None:
        self.routes = routes  # the live snapshot: route table and catalog, swapped as one
        self.stack = stack  # the layer below: fallback ladder -> coalescer -> pool
        self.backend = backend  # the pool, for the control plane (readiness, metadata)
        self.predlog = predlog
        self.metrics = metrics
        self.default_deadline_ms = default_deadline_ms
        self.max_deadline_ms = max_deadline_ms
        self.slo_deadline_factor = slo_deadline_factor
        self.control_timeout_s = control_timeout_s
        self.clock = clock
        self.features = features  # online feature store; None: feature_refs answer 400
        self.log_policies = log_policies or LogPolicies(LogPolicy(), {})
        self.wall = wall  # prediction log timestamps
        self.rng = rng or random.Random()  # random splits; tests inject a seeded one
        self.shadow = shadow
        #: Requests per (model, arm) since start, for GET /admin/routes.
        self.arm_counts: Counter[tuple[str, str]] = Counter()
        #: Metric children of successful answers per (model, version, arm), built once.
        self._ok_metrics: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        #: The CallPolicy per (route file, target) of the current table, built once.
        self._policies: dict[tuple[str, Target], CallPolicy] = {}
        self._policies_of: RouteTable | None = None

    @property
    def catalog(self) -> ModelCatalog:
        return self.routes.current.catalog

    # -- deadlines -------------------------------------------------------------------------
    def deadline_for(self, context: Mapping[str, Any], route: Route | None = None) -> Deadline:
        """The request's own deadline_ms, else the route's default (its SLO), else the
        global default; never more than max_deadline_ms."""
        ms = context.get("deadline_ms")
        if ms is None and route is not None:
            ms = route.deadline_ms(self.slo_deadline_factor)
        if ms is None:
            ms = self.default_deadline_ms
        return Deadline.after(min(float(ms), self.max_deadline_ms) / 1000.0, self.clock)

    # -- planning --------------------------------------------------------------------------
    def _policy(self, table: RouteTable, route: Route, target: Target) -> CallPolicy:
        """The route's policy as it applies to this target: the default rung only where
        its outputs are scalars, the fallback model only where its schema fits."""
        if self._policies_of is not table:
            self._policies, self._policies_of = {}, table
        key = (route.policy_version, target)
        found = self._policies.get(key)
        if found is None:
            found = route.policy
            schema = table.catalog.find(target.model, target.version)
            if found.default is not None and (schema is None or not schema.scalar_outputs):
                found = dataclasses.replace(found, default=None)
            fb = found.fallback
            fb_schema = table.catalog.find(fb.model, fb.version) if fb is not None else None
            if fb is not None and (
                schema is None or fb_schema is None or fb_schema.features != schema.features
            ):
                found = dataclasses.replace(found, fallback=None)
            self._policies[key] = found
        return found

    def _priority(
        self, schema: ModelSchema | None, parameters: Mapping[str, Any], route: Route | None
    ) -> int:
        """The request's priority (else its route's) where the model's scheduler has levels
        (else 0: none is sent, and Triton uses the model's default)."""
        value = parameters.get("priority")
        if value is None and route is not None:
            value = route.priority
        if value is None or schema is None or not schema.priority_levels:
            return 0
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ClientError(
                "parameters.priority must be a non-negative integer",
                code="invalid_parameter",
                details={"parameter": "priority"},
            )
        return min(value, schema.priority_levels)

    def _choose(
        self, route: Route, entity_id: str | None, context: Mapping[str, Any]
    ) -> tuple[Target, str]:
        """The target and arm name that answer this request: segment, then split."""
        with span(self.tracing, "route", model=route.name, policy_version=route.policy_version):
            target, arm = route.choose(entity_id, context, self.rng)
            if self.tracing is not None:
                self.tracing.annotate(target=target.model, version=target.version, arm=arm)
        self.arm_counts[(route.name, arm)] += 1
        return target, arm

    # -- /v1 predictions -------------------------------------------------------------------
    async def _features(self, req: PredictRequest, deadline: Deadline) -> Any:
        """Inline features, or feature_refs resolved from the online store (inline wins)."""
        if not req.feature_refs:
            return req.features
        if self.features is None:
            raise ClientError(
                "feature_refs need the online feature store, which is not configured",
                code="feature_store_unavailable",
            )
        with span(self.tracing, "features", refs=len(req.feature_refs)):
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

    async def _plan(self, table: RouteTable, req: PredictRequest) -> _Planned:
        route = table.get(req.model_name)
        deadline = self.deadline_for(req.context, route)
        target, arm = self._choose(route, req.entity_id, req.context)
        schema = table.catalog.schema(target.model, target.version)
        # Inline features need no await: a coroutine per request costs more than the step.
        features = await self._features(req, deadline) if req.feature_refs else req.features
        row = schema.vectorize(features)
        return _Planned(
            req, route, target, arm, row, input_hash(target, row), deadline, schema.features
        )

    async def predict(self, req: PredictRequest) -> Prediction:
        answer = (await self.predict_batch([req]))[0]
        if isinstance(answer, SwitchyardError):
            raise answer
        return answer

    async def predict_batch(
        self, reqs: Sequence[PredictRequest]
    ) -> list[Prediction | SwitchyardError]:
        """Validate everything first (bad input never reaches Triton), then one call down
        the stack per target with the rows stacked, so a batch costs one round trip. The
        call runs until the latest deadline of its items; an item whose own deadline passed
        gets its DeadlineExceeded in its place (in a batch: next to the others' answers)."""
        self.metrics.in_flight.inc()
        try:
            return await self._predict_batch(reqs)
        finally:
            self.metrics.in_flight.dec()

    async def _predict_batch(
        self, reqs: Sequence[PredictRequest]
    ) -> list[Prediction | SwitchyardError]:
        started = self.clock()
        table = self.routes.current
        planned = []
        for i, r in enumerate(reqs):
            try:
                planned.append(await self._plan(table, r))
            except SwitchyardError as exc:
                if len(reqs) > 1:
                    exc.details.setdefault("index", i)
                raise
        groups: dict[Target, list[int]] = {}
        for i, p in enumerate(planned):
            groups.setdefault(p.target, []).append(i)
        results: list[Prediction | SwitchyardError | None] = [None] * len(planned)

        async def answer(target: Target, idx: list[int]) -> None:
            group = [planned[i] for i in idx]
            for i, pred in zip(idx, await self._answer(table, target, group), strict=True):
                results[i] = pred

        if len(groups) == 1:  # the common case: no task per group
            await answer(*next(iter(groups.items())))
        else:
            await asyncio.gather(*(answer(t, idx) for t, idx in groups.items()))
        latency_ms = (self.clock() - started) * 1000.0
        answers = [r for r in results if r is not None]
        assert len(answers) == len(planned), "every planned request gets an answer"
        for p, a in zip(planned, answers, strict=True):
            if isinstance(a, Prediction):
                a.latency_ms = latency_ms
                self._record(p, a)
                self._dispatch_shadow(p, a)
            else:
                self._count_failure(p.request.model_name, a, 1)
        return answers

    async def _answer(
        self, table: RouteTable, target: Target, group: list[_Planned]
    ) -> list[Prediction | SwitchyardError]:
        schema = table.catalog.schema(target.model, target.version)
        # One row (every /v1/predict): a (1, n) view; np.stack costs ~2 us of Python per call.
        rows = group[0].row[np.newaxis] if len(group) == 1 else np.stack([p.row for p in group])
        first = group[0]
        deadline = max((p.deadline for p in group), key=lambda d: d.expires_at)
        request = schema.infer_request(
            rows,
            first.request.request_id,
            policy=self._policy(table, first.route, target),
            priority=self._priority(schema, first.request.context, first.route),
            cache_keys=tuple(p.input_hash for p in group),  # the ladder hashes nothing again
        )
        try:
            resp = await self.stack.infer(request, deadline)
        except SwitchyardError as exc:
            self._count_failure(first.request.model_name, exc, len(group))
            raise
        out: list[Prediction | SwitchyardError] = []
        for j, p in enumerate(group):
            if len(group) > 1 and p.deadline.expired():
                out.append(DeadlineExceeded(
                    "deadline exceeded before the batch's answer",
                    details={"request_id": p.request.request_id}))  # fmt: skip
            else:
                out.append(self._prediction(p, resp, j))
        return out

    def _count_failure(self, model: str, exc: SwitchyardError, n: int) -> None:
        self.metrics.requests.labels(model, exc.code).inc(n)

    def _dispatch_shadow(self, p: _Planned, pred: Prediction) -> None:
        """Fire-and-forget copies to the route's shadow targets (answers already final)."""
        if self.shadow is not None and p.route.shadows and pred.fallback_used is None:
            self.shadow.dispatch(p.route.shadows, Primary(
                pred.request_id, pred.model_name, p.target, p.row, p.request.features,
                pred.score, pred.decision))  # fmt: skip

    def _prediction(self, p: _Planned, resp: InferResponse, row: int) -> Prediction:
        values: dict[str, Any] = {}
        for name, t in resp.outputs.items():
            v = t.data[row]
            if t.datatype == "BYTES":
                values[name] = [x.decode() if isinstance(x, bytes) else str(x) for x in v.ravel()]
            else:
                values[name] = v.tolist()
        scalars = {k: _first(values.pop(k)) for k in _SCALAR_OUTPUTS if k in values}
        rung = resp.fallback_used
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
            fallback_used=rung,
            served_by=resp.model or p.target.model,
        )

    def _record(self, p: _Planned, pred: Prediction) -> None:
        self._count_ok(pred.model_name, pred.model_version, pred.arm, pred.latency_ms)
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
            "protocol": "v1",
        }  # fmt: skip
        if policy.sampled(self.log_policies.rand):
            entry["payload"] = {
                "features": dict(zip(p.features, p.row.tolist(), strict=True)),
                "context": dict(p.request.context),
            }
        with self._record_span(entry):
            self.predlog.record(policy.apply(entry))
        if self.drift is not None:  # the input against the target's training histograms
            score = None if pred.fallback_used else pred.score
            self.drift.observe(p.target.model, p.target.version, p.row, score)

    def _record_span(self, entry: Mapping[str, Any]) -> Any:
        """The prediction-log record's span; the answer's attributes go on the request's
        (adapter) span too, so a trace search by model, arm or rung finds the request."""
        if self.tracing is None:
            return NOOP
        attrs = {k: entry.get(k) for k in ("model", "version", "arm", "policy_version",
                                           "fallback_used")}  # fmt: skip
        self.tracing.annotate(**attrs)
        return self.tracing.span("predlog.record", attrs)

    def _count_ok(self, model: str, version: str, arm: str, latency_ms: float) -> None:
        key = (model, version, arm)
        children = self._ok_metrics.get(key)
        if children is None:  # .labels() validates and locks on every call: once per key
            children = self._ok_metrics[key] = (
                self.metrics.latency.labels(*key),
                self.metrics.requests.labels(model, "ok"),
            )
        exemplar = None if self.tracing is None else self.tracing.exemplar()
        children[0].observe(latency_ms / 1000.0, exemplar)  # OpenMetrics: links the trace
        children[1].inc()

    # -- tensors (/v2 REST and gRPC) -------------------------------------------------------
    async def infer(self, request: InferRequest, deadline: Deadline) -> InferResponse:
        """An OIP tensor request through the same core as /v1: an unversioned call to a
        routed model takes the route (split sticky on parameters.entity_id, segment from
        parameters.segment, shadow copies, the fallback ladder); an explicit version skips
        the split; a model without a route goes straight down the stack. Every answer is
        logged once and counted. An unknown model or version is a 404 here, before any
        per-model state (breakers, metric series) exists for it."""
        self.metrics.in_flight.inc()
        try:
            return await self._infer(request, deadline)
        finally:
            self.metrics.in_flight.dec()

    async def _infer(self, request: InferRequest, deadline: Deadline) -> InferResponse:
        started = self.clock()
        table = self.routes.current
        params = request.parameters
        entity = params.get("entity_id")
        entity_id = None if entity is None else str(entity)
        route = table.routes.get(request.model)
        if route is not None and not request.version:
            context = {"segment": params["segment"]} if "segment" in params else {}
            target, arm = self._choose(route, entity_id, context)
        else:
            target = self._known(table, route, request)
            arm = "explicit" if route is not None else "direct"
        schema = table.catalog.find(target.model, target.version) if target.version else None
        policy = self._policy(table, route, target) if route is not None else None
        # Rows are independent unless the client's parameters say otherwise: a sequence's
        # rows (sequence_id, ...) or a custom parameter the model reads must neither share
        # a merged call (it goes under one member's parameters) nor be answered per row
        # from the cache.
        fits = schema is not None and schema.fits(request)
        if schema is not None and fits:
            schema.check_finite(request)
        batchable = fits and not backend_parameters(params)
        planned = InferRequest(
            target.model,
            target.version,
            request.inputs,
            request.outputs,
            request.request_id,
            params,
            self._priority(schema, params, route),
            batchable,
            policy,
            input_digests(target.model, target.version, request.inputs, batchable),
        )
        name = route.name if route is not None else request.model
        try:
            resp = await self.stack.infer(planned, deadline)
        except SwitchyardError as exc:
            self._count_failure(name, exc, 1)
            raise
        latency_ms = (self.clock() - started) * 1000.0
        version = resp.version or target.version
        policy_version = route.policy_version if route is not None else ""
        self._count_ok(name, version, arm, latency_ms)
        self._record_tensors(
            planned, resp, name, version, arm, policy_version, entity_id, latency_ms
        )
        if route is not None and route.shadows and resp.fallback_used is None:
            self._shadow_tensors(route, planned, resp, name, target)
        parameters = {"request_id": request.request_id, "policy_version": policy_version or None,
                      "fallback_used": resp.fallback_used}  # fmt: skip
        return InferResponse(
            request.model if route is not None else resp.model,
            version,
            resp.outputs,
            request.request_id,
            {k: v for k, v in parameters.items() if v is not None},
        )

    def _known(self, table: RouteTable, route: Route | None, request: InferRequest) -> Target:
        """The target of a call that names its model (and maybe version) outright."""
        model = request.model
        if route is not None and model not in table.catalog.models():
            model = route.champion.model  # a route name over a differently named model
        if model not in table.catalog.models():
            raise ModelNotFound(
                f"unknown model {request.model!r}", details={"model": request.model}
            )
        if request.version and table.catalog.find(model, request.version) is None:
            raise VersionNotFound(
                f"model {request.model!r} has no version {request.version!r}",
                details={"model": request.model, "version": request.version,
                         "available": table.catalog.versions(model)},
            )  # fmt: skip
        return Target(model, request.version)

    def _record_tensors(
        self,
        request: InferRequest,
        resp: InferResponse,
        name: str,
        version: str,
        arm: str,
        policy_version: str,
        entity_id: str | None,
        latency_ms: float,
    ) -> None:
        """One prediction-log entry per tensor request, in the /v1 schema (+ protocol)."""
        output = {k: _scalar(resp.outputs.get(k)) for k in _SCALAR_OUTPUTS}
        entry: dict[str, Any] = {
            "request_id": request.request_id,
            "entity_id": entity_id,
            "model": name,
            "target": resp.model or request.model,
            "version": version,
            "policy_version": policy_version,
            "arm": arm,
            "input_hash": _one_digest(request.cache_keys),
            "output": output,
            "fallback_used": resp.fallback_used,
            "latency_ms": round(latency_ms, 3),
            "ts": self.wall(),
            "protocol": "v2",
        }
        with self._record_span(entry):
            self.predlog.record(self.log_policies.for_model(name).apply(entry))
        if self.drift is not None and request.batchable:  # rows of the catalog's schema
            scores = resp.outputs.get("score") if resp.fallback_used is None else None
            self.drift.observe_rows(request.model, request.version, request.inputs[0].data,
                                    None if scores is None else scores.data.ravel())  # fmt: skip

    def _shadow_tensors(
        self, route: Route, request: InferRequest, resp: InferResponse, name: str, target: Target
    ) -> None:
        """Shadow copies of a tensor request: per request of one row of the catalog's schema
        (what the shadow dispatcher compares); other shapes are not shadowed."""
        if self.shadow is None or not request.batchable or len(request.inputs[0].data) != 1:
            return
        score, decision = _scalar(resp.outputs.get("score")), _scalar(resp.outputs.get("decision"))
        row = request.inputs[0].data[0]
        self.shadow.dispatch(route.shadows, Primary(
            request.request_id, name, target, row, row.tolist(),
            None if score is None else float(score),
            None if decision is None else str(decision)))  # fmt: skip

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


def input_hash(target: Target, row: np.ndarray) -> str:
    """A /v1 row's digest: the same as the ladder's cache key for that row."""
    row = np.ascontiguousarray(row, dtype=np.float32)[np.newaxis]
    return input_digests(target.model, target.version, (Tensor("", "FP32", row),), True)[0]


def _one_digest(keys: Sequence[str]) -> str:
    """The log's input_hash of a tensor request: its digest, or one over its rows'."""
    if len(keys) == 1:
        return keys[0]
    return hashlib.blake2b("".join(keys).encode(), digest_size=16).hexdigest()


def _first(v: Any) -> Any:
    return v[0] if isinstance(v, list) and len(v) == 1 else v


def _scalar(t: Any) -> Any:
    """The first value of a scalar output (the log's summary of a tensor answer)."""
    if t is None or t.data.size == 0:
        return None
    v = t.data.item(0)  # a Python scalar (the object itself for BYTES), no view made
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    return v if not isinstance(v, float) or math.isfinite(v) else None
