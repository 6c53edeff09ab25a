"""One core for every protocol (issue 11): /v2 tensor requests take the route, the ladder and
the prediction log like /v1; a client's choices never trip shared breakers nor create state per
name; cancellation reaches the backend; batch items keep their own deadlines.

Through the real aiohttp app, on FakeBackends behind a real BackendPool.
"""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient

from gateway.api.keys import METRICS, SERVICE
from gateway.app import build_app
from gateway.backends.pool import BackendPool, PoolMember
from gateway.errors import BackendOverloaded, ClientError
from gateway.resilience.breaker import BreakerPolicy, BreakerState
from gateway.resilience.retry import RetryPolicy
from gateway.types import Target
from tests.unit.fake_backend import FakeBackend
from tests.unit.fakes import (
    ListSink,
    ladder_client,
    small_backend,
    toy_backend,
    write_repo,
    write_small_model,
)

SPLIT = (
    'challengers:\n  - {target: toy, version: "1", weight: 50, sticky: entity_id}\n'
    'fallback: {target: toy_small, version: "1", default: {score: 0.5, decision: review}}\n'
    "slo: {p99_ms: 100}\n"
)


@pytest.fixture
def primary() -> FakeBackend:
    return toy_backend()


@pytest.fixture
def small() -> FakeBackend:
    return small_backend()


async def make(
    tmp_path: Path,
    aiohttp_client: Any,
    primary: FakeBackend,
    small: FakeBackend,
    route: str = SPLIT,
    breaker: BreakerPolicy | None = None,
) -> tuple[TestClient, ListSink, BackendPool]:
    breaker = breaker or BreakerPolicy(consecutive_failures=5, open_s=60)
    return await ladder_client(
        tmp_path, aiohttp_client, primary, small, route, breaker, RetryPolicy(max_attempts=1)
    )


def v2_body(rows: list[list[float]], **parameters: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [len(rows), 3],
                    "data": [x for r in rows for x in r]}],
    }  # fmt: skip
    if parameters:
        body["parameters"] = parameters
    return body


async def v2(
    client: TestClient, body: Any, path: str = "/v2/models/toy/infer", **headers: str
) -> tuple[int, Any]:
    # A generous deadline unless the test sets one: a loaded machine must not turn a routing
    # test into a fallback test (the route's own default is 2 x its 100 ms p99).
    headers = {"X-Deadline-Ms": "10000", **headers}
    resp = await client.post(path, data=io.BytesIO(json.dumps(body).encode()), headers=headers)
    return resp.status, await resp.json()


def entries(sink: ListSink) -> list[dict[str, Any]]:
    return [e for e in sink.entries if e["request_id"] != "warm-probe"]


async def test_v2_takes_the_split_sticky_on_the_entity_and_is_logged_once(
    tmp_path: Path, aiohttp_client: Any, primary: FakeBackend, small: FakeBackend
) -> None:
    client, sink, _ = await make(tmp_path, aiohttp_client, primary, small)
    route = client.app[SERVICE].routes.current.get("toy")
    seen: dict[str, str] = {}
    for i in range(40):
        entity = f"user-{i}"
        want, _ = route.choose(entity, {}, np.random.default_rng())  # type: ignore[arg-type]
        for _ in range(2):  # sticky: the same entity, the same version, every time
            status, body = await v2(client, v2_body([[i, 0.5, -1]], entity_id=entity))
            assert status == 200, body
            assert body["model_version"] == want.version
            seen.setdefault(entity, body["model_version"])
            assert body["model_version"] == seen[entity]
        assert body["parameters"]["policy_version"] == route.policy_version
        assert "fallback_used" not in body["parameters"]  # null values are left out
    assert set(seen.values()) == {"1", "2"}  # a 50 % split sends entities both ways
    # the header names the entity as well as parameters.entity_id does
    entity = next(e for e, v in seen.items() if v == "1")
    status, body = await v2(client, v2_body([[0, 0, 0]]), **{"X-Entity-ID": entity})
    assert status == 200 and body["model_version"] == "1"
    logged = entries(sink)
    assert len(logged) == 81  # one entry per request, never per retry or per row
    assert len({e["request_id"] for e in logged}) == 81
    last = logged[-1]
    assert last["protocol"] == "v2" and last["version"] == "1" and last["arm"].startswith("chall")
    assert last["policy_version"] == route.policy_version
    assert last["entity_id"].startswith("h:") and entity not in last["entity_id"]  # keyed hash
    assert last["output"]["decision"] in ("approve", "deny")
    metrics = client.app[METRICS].registry
    ok = metrics.get_sample_value("inference_requests_total", {"model": "toy", "status": "ok"})
    assert ok == 81


async def test_v2_explicit_version_skips_the_split(
    tmp_path: Path, aiohttp_client: Any, primary: FakeBackend, small: FakeBackend
) -> None:
    client, sink, _ = await make(tmp_path, aiohttp_client, primary, small)
    for i in range(10):
        status, body = await v2(
            client, v2_body([[i, 0, 0]], entity_id=f"e{i}"), "/v2/models/toy/versions/1/infer"
        )
        assert status == 200 and body["model_version"] == "1"
    assert {e["arm"] for e in entries(sink)} == {"explicit"}


async def test_v2_falls_back_to_the_distilled_model_then_the_default(
    tmp_path: Path, aiohttp_client: Any, primary: FakeBackend, small: FakeBackend
) -> None:
    client, sink, _ = await make(tmp_path, aiohttp_client, primary, small)
    primary.hang = True
    status, body = await v2(client, v2_body([[1, 2, 3], [4, 5, 6]]), **{"X-Deadline-Ms": "200"})
    assert status == 200, body
    assert body["parameters"]["fallback_used"] == "fallback_model"
    assert body["model_version"] == "1"  # the distilled model's version, not the primary's
    score = next(o for o in body["outputs"] if o["name"] == "score")
    assert score["data"] == [0.25, 0.25] and score["shape"] == [2, 1]
    assert entries(sink)[-1]["fallback_used"] == "fallback_model"
    assert entries(sink)[-1]["target"] == "toy_small"
    small.fail_with = BackendOverloaded("queue full")
    status, body = await v2(client, v2_body([[9, 9, 9]]), **{"X-Deadline-Ms": "200"})
    assert status == 200, body
    assert body["parameters"]["fallback_used"] == "default"
    outputs = {o["name"]: o["data"] for o in body["outputs"]}
    assert outputs == {"score": [0.5], "decision": ["review"]}


async def test_unknown_models_get_404_before_any_per_model_state(
    tmp_path: Path, aiohttp_client: Any, primary: FakeBackend, small: FakeBackend
) -> None:
    client, _, pool = await make(tmp_path, aiohttp_client, primary, small)
    status, _ = await v2(client, v2_body([[0, 0, 0]]))  # one real call creates toy's breaker
    assert status == 200
    before = client.app[METRICS].render()
    for _ in range(300):
        name = uuid.uuid4().hex
        status, body = await v2(client, v2_body([[0, 0, 0]]), f"/v2/models/{name}/infer")
        assert status == 404 and body["code"] == "model_not_found"
    status, body = await v2(client, v2_body([[0, 0, 0]]), "/v2/models/toy/versions/9/infer")
    assert status == 404 and body["code"] == "version_not_found"
    breakers = {model for m in pool.members for model in m.breakers}
    assert breakers == {"toy", "toy_small"}  # the configured ones; none per made-up name
    after = client.app[METRICS].render()
    assert len(after.splitlines()) == len(before.splitlines())  # and no metric series either
    assert len(primary.calls) == 1


async def test_short_client_deadlines_do_not_open_the_shared_breaker(
    tmp_path: Path, aiohttp_client: Any, primary: FakeBackend, small: FakeBackend
) -> None:
    """5 requests with deadline_ms 12 against a model that takes 20 ms: each times out for its
    own client, but the breaker stays closed and everyone else still gets the primary."""
    client, _, pool = await make(tmp_path, aiohttp_client, primary, small, route="")
    primary.latency_s = 0.02
    for _ in range(5):
        body = {"model_name": "toy", "features": [1, 2, 3], "context": {"deadline_ms": 12}}
        resp = await client.post("/v1/predict", data=io.BytesIO(json.dumps(body).encode()))
        assert resp.status == 504
    breaker = pool.breaker(pool.members[0], "toy")
    assert breaker.state is BreakerState.CLOSED and breaker.stats().failures == 0
    body = {"model_name": "toy", "features": [1, 2, 3]}
    resp = await client.post("/v1/predict", data=io.BytesIO(json.dumps(body).encode()))
    assert resp.status == 200 and (await resp.json())["fallback_used"] is None


async def test_a_hung_server_given_the_floor_still_opens_the_breaker(
    tmp_path: Path, aiohttp_client: Any, primary: FakeBackend, small: FakeBackend
) -> None:
    client, _, pool = await make(tmp_path, aiohttp_client, primary, small, route="")
    primary.hang = True
    for _ in range(5):  # 200 ms each, over the 50 ms floor: the server's fault
        body = {"model_name": "toy", "features": [1, 2, 3], "context": {"deadline_ms": 200}}
        resp = await client.post("/v1/predict", data=io.BytesIO(json.dumps(body).encode()))
        assert resp.status == 504
    assert pool.breaker(pool.members[0], "toy").state is BreakerState.OPEN


@pytest.mark.parametrize(
    ("error", "failures"),
    [(BackendOverloaded("queue full"), 1), (ClientError("bad tensor", code="invalid_tensor"), 0)],
)
async def test_overload_counts_against_the_server_and_bad_input_does_not(
    tmp_path: Path,
    aiohttp_client: Any,
    primary: FakeBackend,
    small: FakeBackend,
    error: Exception,
    failures: int,
) -> None:
    client, _, pool = await make(tmp_path, aiohttp_client, primary, small, route="")
    primary.fail_with = error  # type: ignore[assignment]
    body = {"model_name": "toy", "features": [1, 2, 3]}
    resp = await client.post("/v1/predict", data=io.BytesIO(json.dumps(body).encode()))
    assert resp.status in (400, 503)
    stats = pool.breaker(pool.members[0], "toy").stats()
    assert (stats.calls, stats.failures) == (failures, failures)  # bad input: no outcome at all


async def test_a_client_that_disconnects_cancels_the_backend_call_and_frees_its_slot(
    tmp_path: Path, aiohttp_client: Any, primary: FakeBackend, small: FakeBackend
) -> None:
    client, _, pool = await make(tmp_path, aiohttp_client, primary, small, route="")
    primary.hang = True
    for path, body in [
        ("/v1/predict", {"model_name": "toy", "features": [1, 2, 3]}),
        ("/v2/models/toy/infer", v2_body([[1, 2, 3]])),
    ]:
        cancelled = primary.cancelled
        task = asyncio.create_task(client.post(path, data=io.BytesIO(json.dumps(body).encode())))
        for _ in range(10_000):  # until the call holds its admission slot in the backend
            if pool.admission.in_flight("primary") == 1 and primary.in_flight == 1:
                break
            await asyncio.sleep(0.001)
        else:
            raise AssertionError("the call never reached the backend")
        in_flight = client.app[METRICS].registry.get_sample_value
        assert in_flight("gateway_in_flight_requests") == 1  # what the HPA scales on
        task.cancel()  # the client goes away: its connection closes
        for _ in range(10_000):
            if primary.cancelled == cancelled + 1 and pool.admission.in_flight("primary") == 0:
                break
            await asyncio.sleep(0.001)
        else:
            raise AssertionError("the backend call outlived its client")
        assert primary.in_flight == 0
        assert pool.members[0].in_flight == 0
        assert in_flight("gateway_in_flight_requests") == 0


async def test_batch_items_keep_their_own_deadlines(
    tmp_path: Path, aiohttp_client: Any, primary: FakeBackend, small: FakeBackend
) -> None:
    """Item 0's short deadline no longer governs the batch: it fails alone, the rest stand."""
    client, sink, _ = await make(tmp_path, aiohttp_client, primary, small, route="")
    primary.latency_s = 0.05
    reqs = [
        {"request_id": "short", "model_name": "toy", "features": [1, 2, 3],
         "context": {"deadline_ms": 20}},
        {"request_id": "long", "model_name": "toy", "features": [3, 2, 1],
         "context": {"deadline_ms": 2000}},
    ]  # fmt: skip
    resp = await client.post("/v1/predict:batch", data=io.BytesIO(json.dumps(reqs).encode()))
    assert resp.status == 200
    short, long = (await resp.json())["predictions"]
    assert short["request_id"] == "short" and short["error"]["code"] == "deadline_exceeded"
    assert long["request_id"] == "long" and long["fallback_used"] is None and long["score"]
    assert [e["request_id"] for e in entries(sink)] == ["long"]  # only answers are logged
    assert len(primary.calls) == 1  # still one backend call for the batch


def test_route_policy_is_what_the_layers_below_read(tmp_path: Path) -> None:
    settings = write_repo(tmp_path, SPLIT + "cache: {ttl_s: 30}\n")
    write_small_model(settings.routing.model_repository)
    app = build_app(settings, backend=toy_backend())
    route = app[SERVICE].routes.current.get("toy")
    policy = route.policy
    assert policy.fallback == Target("toy_small", "1") and policy.p99_ms == 100
    assert policy.response_cache_ttl_s == 30 and policy.default == {
        "score": 0.5,
        "decision": "review",
    }
    assert route.deadline_ms(2.0) == 200  # the SLO's p99 drives the default deadline


async def test_priority_reaches_the_backend_only_where_the_model_has_levels(
    tmp_path: Path, aiohttp_client: Any, primary: FakeBackend, small: FakeBackend
) -> None:
    """A request's priority (else its route's) is sent where the model's config defines
    priority levels, capped at the highest level; elsewhere none is sent."""
    settings = write_repo(tmp_path, "priority: 2\n")
    repo = settings.routing.model_repository
    (repo / "toy" / "config.pbtxt").write_text(
        'name: "toy"\ndynamic_batching { priority_levels: 3 default_priority_level: 3 }\n'
    )
    write_small_model(repo)
    pool = BackendPool(
        [
            PoolMember("primary", primary, frozenset({"toy"})),
            PoolMember("fallback", small, frozenset({"toy_small"})),
        ]
    )
    app = build_app(settings, backend=pool)
    client = await aiohttp_client(app)
    for params, want in [({}, 2), ({"priority": 1}, 1), ({"priority": 9}, 3)]:
        status, body = await v2(client, v2_body([[1, 2, 3]], **params))
        assert status == 200, body
        assert primary.calls[-1].priority == want
    status, body = await v2(
        client, v2_body([[1, 2, 3]], priority=1), "/v2/models/toy_small/versions/1/infer"
    )
    assert status == 200 and small.calls[-1].priority == 0  # no levels: nothing sent
    status, body = await v2(client, v2_body([[1, 2, 3]], priority="high"))
    assert status == 400 and body["code"] == "invalid_parameter"
