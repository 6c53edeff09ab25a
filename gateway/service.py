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
        body = {
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
    def _plan(self, req: PredictRequest) -> _Planned:
        route = self.routes.current.get(req.model_name)
        target, arm = route.champion, "champion"
        if req.feature_refs:
            raise ClientError(
                "feature_refs need the online feature store, which is not configured",
                code="feature_store_unavailable",
            )
        schema = self.catalog.schema(target.model, target.version)
        return _Planned(req, route, target, arm, schema.vectorize(req.features))

    async def predict(self, req: PredictRequest) -> Prediction:
        return (await self.predict_batch([req]))[0]

    async def predict_batch(self, reqs: Sequence[PredictRequest]) -> list[Prediction]:
        """Validate everything first (bad input never reaches Triton), then one backend call
        per target with the rows stacked, so a batch costs one round trip."""
        started = self.clock()
        planned = []
        for i, r in enumerate(reqs):
            try:
                planned.append(self._plan(r))
            except SwitchyardError as exc:
                if len(reqs) > 1:
                    exc.details.setdefault("index", i)
                raise
        context = reqs[0].context if reqs else {}
        deadline = self.deadline_for(context, planned[0].route if planned else None)
        groups: dict[Target, list[int]] = {}
        for i, p in enumerate(planned):
            groups.setdefault(p.target, []).append(i)
        results: list[Prediction | None] = [None] * len(planned)
        for target, idx in groups.items():
            schema = self.catalog.schema(target.model, target.version)
            rows = np.stack([planned[i].row for i in idx])
            try:
                resp = await self._infer_rows(schema, rows, reqs[idx[0]].request_id, deadline)
            except SwitchyardError as exc:
                self.metrics.requests.labels(target.model, exc.code).inc(len(idx))
                raise
            for j, i in enumerate(idx):
                results[i] = self._prediction(planned[i], resp, j)
        latency = self.clock() - started
        out = []
        for p, pred in zip(planned, results, strict=True):
            assert pred is not None
            pred.latency_ms = latency * 1000.0
            self._record(p, pred, latency)
            out.append(pred)
        return out

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

    def _record(self, p: _Planned, pred: Prediction, latency_s: float) -> None:
        self.metrics.latency.labels(pred.model_name, pred.model_version, pred.arm).observe(latency_s)
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
