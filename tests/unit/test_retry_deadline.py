"""Deadline arithmetic: where a request's budget comes from and how it is shared out."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from gateway.clock import FakeClock
from gateway.errors import DeadlineExceeded
from gateway.resilience.fallback import FallbackLadder, FallbackPolicy
from gateway.routing.table import Fallback, Route, Slo, Target
from gateway.service import InferenceService
from gateway.types import Deadline, InferRequest


def route(
    slo_deadline_ms: int | None = None,
    fallback: Fallback | None = None,
    p99_ms: float | None = None,
) -> Route:
    return Route(
        name="toy",
        champion=Target("toy", "2"),
        policy_version="routes@x",
        source="toy.yaml",
        fallback=fallback or Fallback(),
        slo=Slo(deadline_ms=slo_deadline_ms, p99_ms=p99_ms),
    )


def service(clock: FakeClock) -> InferenceService:
    stub: Any = SimpleNamespace()
    return InferenceService(
        routes=stub,
        stack=stub,
        backend=stub,
        predlog=stub,
        metrics=stub,
        default_deadline_ms=1000,
        max_deadline_ms=5000,
        clock=clock,
    )


def test_deadline_from_context_then_route_then_default_capped() -> None:
    clock = FakeClock()
    svc = service(clock)
    assert svc.deadline_for({"deadline_ms": 80}, route(300)).remaining() == pytest.approx(0.08)
    assert svc.deadline_for({}, route(300)).remaining() == pytest.approx(0.3)
    assert svc.deadline_for({}, route()).remaining() == pytest.approx(1.0)
    assert svc.deadline_for({"deadline_ms": 60_000}, None).remaining() == pytest.approx(5.0)


def test_a_routes_slo_p99_sets_its_default_deadline() -> None:
    """slo.p99_ms in the route file drives the default deadline (twice the p99, the specs'
    hard ceiling); an explicit slo.deadline_ms or the request's own deadline wins."""
    svc = service(FakeClock())
    assert svc.deadline_for({}, route(p99_ms=100)).remaining() == pytest.approx(0.2)
    assert svc.deadline_for({}, route(250, p99_ms=100)).remaining() == pytest.approx(0.25)
    assert svc.deadline_for({"deadline_ms": 40}, route(p99_ms=100)).remaining() == (
        pytest.approx(0.04)
    )


def test_every_step_spends_from_the_same_budget() -> None:
    clock = FakeClock()
    d = Deadline.after(0.1, clock)
    clock.advance(0.03)
    assert d.check("features") == pytest.approx(0.07)
    clock.advance(0.05)
    assert d.remaining() == pytest.approx(0.02)
    clock.advance(0.03)
    assert d.remaining() == 0.0 and d.expired()
    with pytest.raises(DeadlineExceeded) as err:
        d.check("backend call")
    assert err.value.details == {"step": "backend call"}


def ladder(clock: FakeClock, policy: FallbackPolicy) -> FallbackLadder:
    stub: Any = SimpleNamespace()
    return FallbackLadder(inner=stub, cache=stub, metrics=stub, policy=policy, clock=clock)


def test_primary_gets_the_budget_minus_the_ladders_reserve() -> None:
    clock = FakeClock()
    lad = ladder(clock, FallbackPolicy(reserve_s=0.1, reserve_fraction=0.3))
    with_ladder = route(fallback=Fallback(default={"score": 0.5}))
    # plenty of time: a fixed reserve
    assert lad._primary_deadline(with_ladder.policy, Deadline.after(1.0, clock)).remaining() == (
        pytest.approx(0.9)
    )
    # a tight budget: at most 30 % is held back, so an 80 ms deadline still tries the primary
    assert lad._primary_deadline(with_ladder.policy, Deadline.after(0.08, clock)).remaining() == (
        pytest.approx(0.056)
    )
    # no ladder on the route: the primary may spend everything
    assert lad._primary_deadline(route().policy, Deadline.after(1.0, clock)).remaining() == (
        pytest.approx(1.0)
    )


def test_nearly_spent_deadline_skips_the_primary() -> None:
    clock = FakeClock()
    lad = ladder(clock, FallbackPolicy(min_primary_s=0.005))
    r = route(fallback=Fallback(default={"score": 0.5}))
    request = InferRequest("toy", "2", ())
    assert lad._skip_reason(r.policy, request, Deadline.after(0.05, clock)) is None
    assert lad._skip_reason(r.policy, request, Deadline.after(0.004, clock)) == "deadline"
