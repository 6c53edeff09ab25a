"""InferenceService: the protocol-independent predict pipeline (ARCHITECTURE section 2).

`/v1` (JSON predictions) and `/v2` (Open Inference Protocol) are thin adapters over it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import structlog

from gateway.backends.base import Backend, InferRequest, InferResponse
from gateway.catalog import ModelCatalog, ModelSchema
from gateway.clock import Clock, monotonic
from gateway.errors import ClientError, NotReady, SwitchyardError
from gateway.metrics import Metrics
from gateway.resilience.deadline import Deadline
from gateway.routing.table import Route, RouteTableRef, Target
from gateway.tensors import Tensor

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
        """Inline features, or feature_refs resolved from the online store."""
        if req.feature_refs:
            raise ClientError(
                "feature_refs need the online feature store, which is not configured",
                code="feature_store_unavailable",
            )
        return req.features

    def _choose(self, route: Route, req: PredictRequest) -> tuple[Target, str]:
        """The target and arm name that answer this request."""
        return route.champion, "champion"

    async def _plan(self, req: PredictRequest, deadline: Deadline) -> _Planned:
        route = self.routes.current.get(req.model_name)
        target, arm = self._choose(route, req)
        schema = self.catalog.schema(target.model, target.version)
        features = await self._features(req, deadline)
        return _Planned(req, route, target, arm, schema.vectorize(features))

    async def _answer(
        self, target: Target, group: list[_Planned], deadline: Deadline
    ) -> list[Prediction]:
        """One backend call for every request bound to this target."""
        schema = self.catalog.schema(target.model, target.version)
        rows = np.stack([p.row for p in group])
        try:
            resp = await self._infer_rows(schema, rows, group[0].request.request_id, deadline)
        except SwitchyardError as exc:
            self.metrics.requests.labels(group[0].request.model_name, exc.code).inc(len(group))
            raise
        return [self._prediction(p, resp, j) for j, p in enumerate(group)]

    def _after_answer(self, planned: list[_Planned], preds: list[Prediction]) -> None:
        """Runs once the answers are final: metrics and the prediction log."""
        for p, pred in zip(planned, preds, strict=True):
            self._record(p, pred)

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
    ) -> InferResponse:
        request = InferRequest(
            model=schema.model,
            version=schema.version,
            inputs=(Tensor(schema.tensor, schema.datatype, rows),),
            outputs=schema.outputs,
            request_id=request_id,
        )
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
        )

    def _record(self, p: _Planned, pred: Prediction) -> None:
        self.metrics.latency.labels(pred.model_name, pred.model_version, pred.arm).observe(
            pred.latency_ms / 1000.0
        )
        self.metrics.requests.labels(pred.model_name, "ok").inc()
        self.predlog.record(
            {
                "request_id": pred.request_id,
                "entity_id": p.request.entity_id,
                "model": pred.model_name,
                "target": p.target.model,
                "version": pred.model_version,
                "policy_version": pred.policy_version,
                "arm": pred.arm,
                "input_hash": input_hash(p.target, p.row),
                "output": {"score": pred.score, "decision": pred.decision,
                           "confidence": pred.confidence},
                "fallback_used": pred.fallback_used,
                "latency_ms": round(pred.latency_ms, 3),
                "ts": time.time(),
            }
        )  # fmt: skip

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


def input_hash(target: Target, row: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(str(target).encode())
    h.update(np.ascontiguousarray(row, dtype=np.float32).tobytes())
    return h.hexdigest()


def _first(v: Any) -> Any:
    return v[0] if isinstance(v, list) and len(v) == 1 else v
