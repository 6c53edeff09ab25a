"""The fallback ladder through the real app: rung order, truthful versions, triggers."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from gateway.api.keys import METRICS
from gateway.clock import FakeClock
from gateway.errors import BackendUnavailable, Overloaded
from gateway.resilience.breaker import BreakerPolicy
from gateway.resilience.fallback import LatencyTrigger, LatencyTriggerPolicy
from gateway.resilience.retry import RetryPolicy
from tests.unit.fake_backend import FakeBackend
from tests.unit.fakes import ListSink, ladder_client, small_backend, toy_backend

ROUTE = (
    'fallback: {target: toy_small, version: "1", cache_ttl_s: 60,'
    " default: {score: 0.5, decision: review}}\n"
)


@pytest.fixture
def primary() -> FakeBackend:
    return toy_backend()


@pytest.fixture
def small() -> FakeBackend:
    return small_backend()


async def make_client(
    tmp_path: Path,
    aiohttp_client: Any,
    primary: FakeBackend,
    small: FakeBackend,
    route: str,
    response_cache_ttl_s: float = 0.0,
) -> tuple[TestClient, ListSink]:
    if response_cache_ttl_s:  # per route, in the route file
        route += f"\ncache: {{ttl_s: {response_cache_ttl_s}}}\n"
    breaker = BreakerPolicy(consecutive_failures=3, open_s=60)
    retry = RetryPolicy(backoff_base_s=0.0, backoff_max_s=0.0)
    client, sink, _ = await ladder_client(
        tmp_path, aiohttp_client, primary, small, route, breaker, retry
    )
    return client, sink


async def predict(client: TestClient, features: list[float], **ctx: Any) -> tuple[int, Any]:
    body = {"model_name": "toy", "features": features, "context": ctx}
    resp = await client.post("/v1/predict", data=io.BytesIO(json.dumps(body).encode()))
    return resp.status, await resp.json()


def served(backend: FakeBackend) -> int:
    return sum(1 for c in backend.calls if c.request_id != "warm-probe")


def fallback_count(client: TestClient, rung: str, reason: str) -> float:
    metrics = client.app[METRICS]
    value = metrics.registry.get_sample_value("fallback_total", {"rung": rung, "reason": reason})
    return value or 0.0


async def test_ladder_order_model_then_cache_then_default(
    tmp_path: Path, aiohttp_client: Any, primary: FakeBackend, small: FakeBackend
) -> None:
    client, sink = await make_client(tmp_path, aiohttp_client, primary, small, ROUTE)
    status, ok = await predict(client, [1, 0.5, -0.25])
    assert status == 200 and ok["fallback_used"] is None and ok["model_version"] == "2"

    primary.fail_with = BackendUnavailable("connection refused")
    # (a) the distilled model, which names its own version
    status, body = await predict(client, [1, 0.5, -0.25])
    assert status == 200, body
    assert body["fallback_used"] == "fallback_model"
    assert body["model_version"] == "1" and body["score"] == pytest.approx(0.25)
    assert sink.entries[-1]["version"] == "1"
    assert sink.entries[-1]["fallback_used"] == "fallback_model"
    assert sink.entries[-1]["target"] == "toy_small"  # the log names the model that answered

    # (b) the fallback model down too: the last answer for the same input, with its version
    small.fail_with = BackendUnavailable("connection refused")
    status, body = await predict(client, [1, 0.5, -0.25])
    assert status == 200, body
    assert body["fallback_used"] == "cache"
    assert body["model_version"] == "2" and body["score"] == pytest.approx(ok["score"])
    assert sink.entries[-1]["target"] == "toy"

    # (c) an input never answered before: the route's static default
    status, body = await predict(client, [0, 0, 1])
    assert status == 200, body
    assert body["fallback_used"] == "default"
    assert body["score"] == 0.5 and body["decision"] == "review"
    assert body["model_version"] == "default"
    assert sink.entries[-1]["fallback_used"] == "default"
    assert sink.entries[-1]["target"] == "default"
    total = sum(
        fallback_count(client, rung, reason)
        for rung in ("fallback_model", "cache", "default")
        for reason in ("error", "breaker_open", "no_ready_server")
    )
    assert total == 3


async def test_breaker_open_fails_fast_into_the_fallback(
    tmp_path: Path, aiohttp_client: Any, primary: FakeBackend, small: FakeBackend
) -> None:
    client, _ = await make_client(tmp_path, aiohttp_client, primary, small, ROUTE)
    primary.fail_with = BackendUnavailable("connection refused")
    for _ in range(3):
        status, body = await predict(client, [0, 0, 0])
        assert status == 200 and body["fallback_used"] == "fallback_model"
    calls_when_open = served(primary)
    open_before = fallback_count(client, "fallback_model", "breaker_open")
    for _ in range(5):
        status, body = await predict(client, [0, 0, 0])
        assert status == 200 and body["fallback_used"] == "fallback_model"
    assert served(primary) == calls_when_open  # open: the primary is not called at all
    assert fallback_count(client, "fallback_model", "breaker_open") == open_before + 5
    metrics = client.app[METRICS]
    state = metrics.registry.get_sample_value(
        "breaker_state", {"server": "primary", "model": "toy"}
    )
    assert state == 2


async def test_no_rung_left_answers_with_the_primary_error(
    tmp_path: Path, aiohttp_client: Any, primary: FakeBackend, small: FakeBackend
) -> None:
    route = 'fallback: {target: toy_small, version: "1"}\n'
    client, _ = await make_client(tmp_path, aiohttp_client, primary, small, route)
    primary.fail_with = BackendUnavailable("connection refused")
    small.fail_with = BackendUnavailable("connection refused")
    status, body = await predict(client, [0, 0, 0])
    assert status == 503 and body["error"]["code"] == "backend_unavailable"


async def test_shedding_is_not_rescued(
    tmp_path: Path, aiohttp_client: Any, primary: FakeBackend, small: FakeBackend
) -> None:
    client, _ = await make_client(tmp_path, aiohttp_client, primary, small, ROUTE)
    primary.fail_with = Overloaded("shed", retry_after_s=1.0)
    resp = await client.post(
        "/v1/predict",
        data=io.BytesIO(json.dumps({"model_name": "toy", "features": [0, 0, 0]}).encode()),
    )
    assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    assert served(small) == 0


async def test_a_hanging_primary_is_answered_by_the_fallback_within_the_deadline(
    tmp_path: Path, aiohttp_client: Any, primary: FakeBackend, small: FakeBackend
) -> None:
    client, _ = await make_client(tmp_path, aiohttp_client, primary, small, ROUTE)
    primary.hang = True
    status, body = await predict(client, [0, 0, 0], deadline_ms=100)
    assert status == 200, body
    assert body["fallback_used"] == "fallback_model"
    assert fallback_count(client, "fallback_model", "deadline") == 1


async def test_response_cache_serves_deterministic_answers_without_a_call(
    tmp_path: Path, aiohttp_client: Any, primary: FakeBackend, small: FakeBackend
) -> None:
    client, _ = await make_client(
        tmp_path, aiohttp_client, primary, small, "", response_cache_ttl_s=60
    )
    first = await predict(client, [0.1, 0.2, 0.3])
    second = await predict(client, [0.1, 0.2, 0.3])
    assert first[0] == second[0] == 200
    assert second[1]["score"] == first[1]["score"]
    assert second[1]["fallback_used"] is None and second[1]["model_version"] == "2"
    assert served(primary) == 1
    await predict(client, [0.1, 0.2, 0.4])
    assert served(primary) == 2


async def test_response_cache_is_off_by_default(
    tmp_path: Path, aiohttp_client: Any, primary: FakeBackend, small: FakeBackend
) -> None:
    client, _ = await make_client(tmp_path, aiohttp_client, primary, small, ROUTE)
    await predict(client, [0.1, 0.2, 0.3])
    await predict(client, [0.1, 0.2, 0.3])
    assert served(primary) == 2


async def test_a_slow_primary_answers_when_no_rung_can(
    tmp_path: Path, aiohttp_client: Any, primary: FakeBackend, small: FakeBackend
) -> None:
    """The latency trigger skips a primary over its SLO for the ladder. When no rung
    answers (the distilled model down, no cache, no default), the slow primary still has
    the caller's deadline to spend: its answer, not a 504 with the deadline unused."""
    route = 'fallback: {target: toy_small, version: "1"}\nslo: {p99_ms: 20}\n'
    client, _ = await make_client(tmp_path, aiohttp_client, primary, small, route)
    primary.latency_s = 0.05  # over the 20 ms SLO, far inside the 2 s deadline
    small.fail_with = BackendUnavailable("distilled model down")
    with capture_logs() as logs:
        for _ in range(200):  # until the trigger trips and the ladder is tried first
            status, body = await predict(client, [1, 2, 3], deadline_ms=2000)
            assert status == 200, body
            assert body["fallback_used"] is None and body["model_version"] == "2"
            if any(e["event"] == "fallback_model_failed" for e in logs):
                break
    # The primary was skipped for its latency, the ladder tried, and the primary answered.
    assert any(e["event"] == "fallback_model_failed" for e in logs)


def test_latency_trigger_trips_on_p99_and_recovers_when_the_window_clears() -> None:
    clock = FakeClock()
    trigger = LatencyTrigger(
        LatencyTriggerPolicy(p99_ms=300, window_s=30, min_samples=20, probe_every_s=1.0), clock
    )
    for _ in range(50):
        trigger.observe(0.01)
    assert not trigger.tripped(300)
    for _ in range(10):
        trigger.observe(0.5)
    clock.advance(0.3)  # p99 is recomputed at most every 250 ms
    assert trigger.tripped(300)
    assert trigger.take_probe() and not trigger.take_probe()  # a trickle still probes
    clock.advance(1.0)
    assert trigger.take_probe()
    clock.advance(31)  # the slow samples age out; fresh fast ones
    for _ in range(30):
        trigger.observe(0.02)
    assert not trigger.tripped(300)


async def test_admin_routes_shows_breaker_state_per_server(
    tmp_path: Path, aiohttp_client: Any, primary: FakeBackend, small: FakeBackend
) -> None:
    client, _ = await make_client(tmp_path, aiohttp_client, primary, small, ROUTE)
    primary.fail_with = BackendUnavailable("connection refused")
    for _ in range(3):  # consecutive_failures=3 opens the breaker
        status, body = await predict(client, [1, 0.5, -0.25])
        assert status == 200 and body["fallback_used"] == "fallback_model"
    servers = (await (await client.get("/admin/routes")).json())["servers"]
    assert servers["primary"]["breakers"] == {"toy": "open"}
    assert servers["fallback"]["breakers"]["toy_small"] == "closed"
