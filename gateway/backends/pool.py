"""BackendPool: several named Triton servers behind the one Backend interface.

InferenceService keeps talking to one Backend; the pool decides which server answers:
of two random ready servers serving the model (power of two choices), the less loaded
(gateway/backends/load.py: Triton's queue and timings, scraped about every 250 ms, with this
pool's in-flight count), whose breaker for (server, model) lets the call through;
``routing="least_in_flight"`` keeps the older rule (fewest calls in flight). A background
health check drops a server that stops answering ``server_ready`` and brings it back when it
does. Transient failures are retried (within budget and deadline) on another ready server
when the pool has one, every call holds an admission slot of its server, so overload is
shed instead of queued, and a route that opts in hedges late calls (resilience/hedge.py).

Members come and go at run time (`add_member`, `remove_member`; DNS discovery in
gateway/backends/discovery.py): a member that leaves drains, taking no new calls while
those in flight finish, and is closed after the last.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog

from gateway.backends.base import Backend, ModelControl
from gateway.backends.load import ServerLoad, load_score
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
from gateway.resilience.hedge import Hedger
from gateway.resilience.retry import Retrier, RetryBudget, RetryPolicy
from gateway.triton_metrics import parse_server_counters
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
    metrics_url: str = ""  # Triton's /metrics: load scraping (empty: in-flight only)
    load: ServerLoad = field(default_factory=ServerLoad)
    draining: bool = False  # left the pool: no new calls; closed after the last in flight
    source: str = ""  # the discovery source that added it ("": configuration)

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
        routing: str = "load_aware",
        rng: random.Random | None = None,
        hedger: Hedger | None = None,
        allow_empty: bool = False,  # members come from discovery later
    ) -> None:
        if routing not in ("load_aware", "least_in_flight"):
            raise ValueError(f"unknown routing {routing!r}: load_aware or least_in_flight")
        self.name = name
        self.routing = routing
        self.rng = rng or random.Random()
        self.hedger = hedger or Hedger(clock, on_outcome=self._on_hedge)
        self._closing: set[asyncio.Task[None]] = set()
        self.members = list(members)
        if not self.members and not allow_empty:
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

        spec = request.policy.hedge if request.policy is not None else None
        if spec is None:
            return await self.retrier.call(attempt, deadline)

        def hedge() -> Any:  # one attempt, on a replica the first call has not tried
            picked = self._pick_untried(request.model, tried)
            if picked is None:
                return None
            tried.add(picked[0].name)
            return self._call(*picked, request, deadline)

        assert request.policy is not None
        return await self.hedger.run(
            spec,
            request.policy.route,
            (request.model, request.version),
            lambda: self.retrier.call(attempt, deadline),
            hedge,
            deadline,
        )

    def _pick_untried(
        self, model: str, tried: set[str]
    ) -> tuple[PoolMember, CircuitBreaker, Permit] | None:
        """A ready server not in ``tried`` whose breaker admits the call, or None."""
        if not any(m.ready and not m.draining and m.name not in tried for m in self.members):
            return None
        try:
            member, breaker, permit = self._pick(model, tried)
        except (NoReadyServer, CircuitOpen):
            return None
        if member.name in tried:  # only tried servers would take it: no hedge
            breaker.abandon(permit)
            return None
        return member, breaker, permit

    def _order(self, ready: list[PoolMember], tried: set[str]) -> list[PoolMember]:
        """Candidates in the order their breakers are asked: untried first (a retry goes
        elsewhere); among those, the less loaded of two random picks, then the rest."""
        if self.routing == "least_in_flight":
            ready.sort(key=lambda m: (m.name in tried, m.in_flight))
            return ready
        fresh = [m for m in ready if m.name not in tried] or ready
        if len(fresh) > 2:
            fresh = self.rng.sample(fresh, 2)  # of two, a tie goes to the one listed first
        default_s = self._typical_service_s()
        fresh.sort(key=lambda m: load_score(m.load, m.in_flight, default_s))
        rest = sorted(
            (m for m in ready if m not in fresh),
            key=lambda m: (m.name in tried, load_score(m.load, m.in_flight, default_s)),
        )
        return fresh + rest

    def _typical_service_s(self) -> float:
        """What an unmeasured member is charged: half the measured ones' mean (load.py)."""
        known = [x for m in self.members if (x := m.load.service_s())]
        return 0.5 * sum(known) / len(known) if known else 1.0

    def _pick(self, model: str, tried: set[str]) -> tuple[PoolMember, CircuitBreaker, Permit]:
        serving = [m for m in self.members if m.serves(model) and not m.draining]
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
        if len(ready) > 1:
            ready = self._order(ready, tried)
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
                        member.load.observe(self.clock() - started, self.clock())
                    raise
                now = self.clock()
                elapsed = now - started
                breaker.record_success(permit, elapsed)
                member.load.observe(elapsed, now)
                outcome_recorded = True
                if request.policy is not None and request.policy.hedge is not None:
                    self.hedger.record((request.model, request.version), elapsed)
                return resp
            finally:
                admission.release(member.name)
        finally:
            member.in_flight -= 1
            if not outcome_recorded:
                breaker.abandon(permit)  # shed, or cancelled: says nothing of the server
            if member.draining and member.in_flight == 0:
                self._retire(member)

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

    def _on_hedge(self, outcome: str) -> None:
        log.debug("backend_hedge", outcome=outcome)
        if self.metrics is not None:
            self.metrics.hedges.labels(outcome).inc()

    # -- membership ------------------------------------------------------------------------
    def add_member(self, member: PoolMember) -> None:
        """Join the pool at once. A name already present is kept (its backend too): one that
        was draining takes calls again."""
        for present in self.members:
            if present.name == member.name:
                if present.draining:
                    log.info("server_undrained", server=member.name)
                    present.draining = False
                return
        log.info("server_added", server=member.name, source=member.source or "config")
        self.members.append(member)

    def remove_member(self, name: str) -> None:
        """Drain a member: no new calls; it is closed once its calls in flight finish."""
        for member in self.members:
            if member.name == name and not member.draining:
                log.info("server_draining", server=name, in_flight=member.in_flight)
                member.draining = True
                if member.in_flight == 0:
                    self._retire(member)

    def _retire(self, member: PoolMember) -> None:
        if member in self.members:
            self.members.remove(member)
            log.info("server_removed", server=member.name)
            task = asyncio.get_running_loop().create_task(member.backend.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    # -- load ------------------------------------------------------------------------------
    async def scrape_load(self, session: aiohttp.ClientSession, timeout_s: float) -> None:
        """Read every member's Triton /metrics once, at the same time."""
        timeout = aiohttp.ClientTimeout(total=timeout_s)

        async def scrape(member: PoolMember) -> None:
            try:
                async with session.get(member.metrics_url, timeout=timeout) as resp:
                    resp.raise_for_status()
                    text = await resp.text()
                member.load.update(parse_server_counters(text))
            except (aiohttp.ClientError, TimeoutError, ValueError):
                member.load.fail()

        await asyncio.gather(*(scrape(m) for m in list(self.members) if m.metrics_url))

    async def run_load_scrapes(self, interval_s: float, timeout_s: float) -> None:
        """Background task: `scrape_load` every ``interval_s`` until cancelled."""
        async with aiohttp.ClientSession() as session:
            while True:
                await self.scrape_load(session, timeout_s)
                await asyncio.sleep(interval_s)

    # -- health ----------------------------------------------------------------------------
    async def check_health(self, timeout_s: float) -> dict[str, bool]:
        """Ask every server ``server_ready`` at once; update which are in rotation."""

        async def probe(member: PoolMember) -> bool:
            try:
                return await member.backend.server_ready(timeout_s)
            except SwitchyardError:
                return False

        members = list(self.members)  # membership may change while the probes are out
        results = await asyncio.gather(*(probe(m) for m in members))
        for member, ok in zip(members, results, strict=True):
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
                "draining": m.draining,
                "load": load_score(m.load, m.in_flight, self._typical_service_s()),
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
        await asyncio.gather(*(m.backend.close() for m in self.members), *self._closing)


def _control(backend: Backend) -> ModelControl:
    if not isinstance(backend, ModelControl):
        raise BackendUnavailable(f"server {backend.name} has no model-control API")
    return backend
