"""BackendPool: several named Triton servers behind the one Backend interface.

InferenceService keeps talking to one Backend; the pool decides which server answers:
the ready server serving the model with the fewest calls in flight, whose breaker for
(server, model) lets the call through. A background health check drops a server that stops
answering ``server_ready`` and brings it back when it does. Transient failures are retried
(within budget and deadline) on another ready server when the pool has one, and every call
holds an admission slot of its server, so overload is shed instead of queued.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from gateway.backends.base import Backend, ModelControl
from gateway.clock import Clock, monotonic
from gateway.errors import (
    BackendUnavailable,
    CircuitOpen,
    DeadlineExceeded,
    NoReadyServer,
    SwitchyardError,
)
from gateway.metrics import Metrics
from gateway.resilience.admission import Admission, AdmissionLimits
from gateway.resilience.breaker import BreakerPolicy, BreakerState, CircuitBreaker, Permit
from gateway.resilience.retry import Retrier, RetryBudget, RetryPolicy
from gateway.types import Deadline, InferRequest, InferResponse

log = structlog.get_logger(__name__)

__all__ = ["BackendPool", "NoReadyServer", "PoolMember"]


@dataclass(eq=False)
class PoolMember:
    name: str
    backend: Backend
    models: frozenset[str] = frozenset()  # empty: every model
    ready: bool = True  # until the first health check says otherwise
    in_flight: int = 0
    breakers: dict[str, CircuitBreaker] = field(default_factory=dict)

    def serves(self, model: str) -> bool:
        return not self.models or model in self.models


class BackendPool:
    def __init__(
        self,
        members: Iterable[PoolMember],
        *,
        breaker_policy: BreakerPolicy | None = None,
        retry_policy: RetryPolicy | None = None,
        admission: AdmissionLimits | None = None,
        metrics: Metrics | None = None,
        clock: Clock = monotonic,
        retrier: Retrier | None = None,
        name: str = "pool",
    ) -> None:
        self.name = name
        self.members = list(members)
        if not self.members:
            raise ValueError("a BackendPool needs at least one server")
        self.breaker_policy = breaker_policy or BreakerPolicy()
        self.metrics = metrics
        self.clock = clock
        retry_policy = retry_policy or RetryPolicy()
        self.retrier = retrier or Retrier(
            retry_policy,
            RetryBudget(
                retry_policy.budget_ratio,
                retry_policy.budget_window_s,
                clock,
                min_per_s=retry_policy.budget_min_retries_per_s,
            ),
            on_retry=self._on_retry,
        )
        self.admission = Admission(admission or AdmissionLimits(), on_shed=self._on_shed)

    # -- inference -------------------------------------------------------------------------
    async def infer(self, request: InferRequest, deadline: Deadline) -> InferResponse:
        tried: set[str] = set()

        async def attempt(_: int) -> InferResponse:
            member, breaker, permit = self._pick(request.model, tried)
            tried.add(member.name)
            return await self._call(member, breaker, permit, request, deadline)

        return await self.retrier.call(attempt, deadline)

    def _pick(self, model: str, tried: set[str]) -> tuple[PoolMember, CircuitBreaker, Permit]:
        serving = [m for m in self.members if m.serves(model)]
        ready = [m for m in serving if m.ready]
        if not ready:
            raise NoReadyServer(
                f"no ready server for model {model!r}",
                details={
                    "model": model,
                    "servers": [m.name for m in serving],
                    "reason": "no_ready_server",
                },
            )
        if len(ready) > 1:  # untried servers first (a retry goes elsewhere), then least busy
            ready.sort(key=lambda m: (m.name in tried, m.in_flight))
        for member in ready:
            breaker = self.breaker(member, model)
            permit = breaker.acquire()
            if permit is not None:
                return member, breaker, permit
        raise CircuitOpen(
            f"circuit open for model {model!r} on every ready server",
            details={"model": model, "servers": [m.name for m in ready]},
        )

    def _timeout_floor_s(self, request: InferRequest) -> float:
        """The least time an attempt must have had for its timeout to blame the server."""
        p99_ms = request.policy.p99_ms if request.policy is not None else None
        return max(self.breaker_policy.min_timeout_floor_s, (p99_ms or 0.0) / 1000.0)

    async def _call(
        self,
        member: PoolMember,
        breaker: CircuitBreaker,
        permit: Permit,
        request: InferRequest,
        deadline: Deadline,
    ) -> InferResponse:
        member.in_flight += 1
        outcome_recorded = False
        admission = self.admission
        try:
            # Admission without an async context manager: a free slot costs no await.
            if not admission.try_acquire(member.name):
                await admission.acquire(member.name, deadline)
            try:
                started = self.clock()
                budget_s = deadline.check("backend call")
                try:
                    resp = await member.backend.infer(request, deadline)
                except SwitchyardError as exc:
                    # A hung server must trip its breaker, but a timeout of an attempt given
                    # less than the floor is the client's short deadline: it says nothing.
                    # Errors caused by the input (INVALID_ARGUMENT, not found) say nothing
                    # either; neither counts as a success.
                    if exc.server_failure and (
                        not isinstance(exc, DeadlineExceeded)
                        or budget_s >= self._timeout_floor_s(request)
                    ):
                        breaker.record_failure(permit)
                        outcome_recorded = True
                    raise
                breaker.record_success(permit, self.clock() - started)
                outcome_recorded = True
                return resp
            finally:
                admission.release(member.name)
        finally:
            member.in_flight -= 1
            if not outcome_recorded:
                breaker.abandon(permit)  # shed, or cancelled: says nothing of the server

    def breaker(self, member: PoolMember, model: str) -> CircuitBreaker:
        b = member.breakers.get(model)
        if b is None:
            b = member.breakers[model] = CircuitBreaker(
                self.breaker_policy, self.clock, on_change=self._gauge(member.name, model)
            )
            if self.metrics is not None:
                self.metrics.breaker_state.labels(member.name, model).set(BreakerState.CLOSED)
        return b

    def _gauge(self, server: str, model: str) -> Any:
        def on_change(state: BreakerState) -> None:
            log.warning("breaker_state", server=server, model=model, state=state.name.lower())
            if self.metrics is not None:
                self.metrics.breaker_state.labels(server, model).set(int(state))

        return on_change

    def _on_retry(self, exc: BaseException) -> None:
        log.info("backend_retry", error=getattr(exc, "code", type(exc).__name__))

    def _on_shed(self, backend: str) -> None:
        if self.metrics is not None:
            self.metrics.shed.labels(backend).inc()

    # -- health ----------------------------------------------------------------------------
    async def check_health(self, timeout_s: float) -> dict[str, bool]:
        """Ask every server ``server_ready`` at once; update which are in rotation."""

        async def probe(member: PoolMember) -> bool:
            try:
                return await member.backend.server_ready(timeout_s)
            except SwitchyardError:
                return False

        results = await asyncio.gather(*(probe(m) for m in self.members))
        for member, ok in zip(self.members, results, strict=True):
            if ok != member.ready:
                log.warning("server_" + ("ready" if ok else "unready"), server=member.name)
                member.ready = ok
                if not ok:  # its breakers agree with the health check; probes reopen them
                    for breaker in member.breakers.values():
                        breaker.force_open()
        return {m.name: m.ready for m in self.members}

    async def run_health_checks(self, interval_s: float, timeout_s: float) -> None:
        """Background task: `check_health` every ``interval_s`` until cancelled."""
        while True:
            await self.check_health(timeout_s)
            await asyncio.sleep(interval_s)

    def states(self) -> dict[str, Any]:
        """Per server: readiness, calls in flight, breaker state per model (for admin APIs)."""
        return {
            m.name: {
                "ready": m.ready,
                "in_flight": m.in_flight,
                "breakers": {model: b.state.name.lower() for model, b in m.breakers.items()},
            }
            for m in self.members
        }

    # -- control plane: first ready server that answers --------------------------------------
    async def _first(self, model: str, call: Any) -> Any:
        members = [m for m in self.members if not model or m.serves(model)]
        members.sort(key=lambda m: not m.ready)
        error: SwitchyardError | None = None
        for member in members:
            try:
                return await call(member.backend)
            except (BackendUnavailable, DeadlineExceeded) as exc:
                error = exc
        raise error or NoReadyServer(f"no server for model {model!r}")

    async def server_live(self, timeout_s: float) -> bool:
        return any(await asyncio.gather(*(self._safe_live(m, timeout_s) for m in self.members)))

    async def _safe_live(self, member: PoolMember, timeout_s: float) -> bool:
        try:
            return await member.backend.server_live(timeout_s)
        except SwitchyardError:
            return False

    async def server_ready(self, timeout_s: float) -> bool:
        return any((await self.check_health(timeout_s)).values())

    async def model_ready(self, model: str, version: str, timeout_s: float) -> bool:
        for member in self.members:
            if not member.serves(model) or not member.ready:
                continue
            try:
                if await member.backend.model_ready(model, version, timeout_s):
                    return True
            except (BackendUnavailable, DeadlineExceeded):
                continue
        return False

    async def server_metadata(self, timeout_s: float) -> dict[str, Any]:
        return await self._first("", lambda b: b.server_metadata(timeout_s))

    async def model_metadata(self, model: str, version: str, timeout_s: float) -> dict[str, Any]:
        return await self._first(model, lambda b: b.model_metadata(model, version, timeout_s))

    async def model_config(self, model: str, version: str, timeout_s: float) -> dict[str, Any]:
        return await self._first(model, lambda b: b.model_config(model, version, timeout_s))

    # -- model control: on every server that serves the model ------------------------------
    async def repository_index(self, timeout_s: float) -> list[dict[str, Any]]:
        return await self._first("", lambda b: _control(b).repository_index(timeout_s))

    async def load_model(
        self, model: str, timeout_s: float, config: Mapping[str, Any] | None = None
    ) -> None:
        for member in self.members:
            if member.serves(model) and isinstance(member.backend, ModelControl):
                await member.backend.load_model(model, timeout_s, config)

    async def unload_model(self, model: str, timeout_s: float) -> None:
        for member in self.members:
            if member.serves(model) and isinstance(member.backend, ModelControl):
                await member.backend.unload_model(model, timeout_s)

    async def close(self) -> None:
        await asyncio.gather(*(m.backend.close() for m in self.members))


def _control(backend: Backend) -> ModelControl:
    if not isinstance(backend, ModelControl):
        raise BackendUnavailable(f"server {backend.name} has no model-control API")
    return backend
