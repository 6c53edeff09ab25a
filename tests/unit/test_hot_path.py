"""The hot-path shortcuts (issue 7, item 3) answer exactly as the general paths they bypass."""

from __future__ import annotations

import enum
import random

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from aiohttp.web_urldispatcher import DynamicResource

import gateway.resilience.retry as retry_mod
from gateway.api import oip
from gateway.catalog import ModelSchema
from gateway.clock import FakeClock
from gateway.errors import BackendUnavailable, ValidationFailed
from gateway.resilience.admission import Admission, AdmissionLimits
from gateway.resilience.retry import Retrier, RetryBudget, RetryPolicy
from gateway.types import Deadline

SCHEMA = ModelSchema("m", "1", "x", "FP32", ("a", "b", "c"), ("score",))
F32_MAX = float(np.finfo(np.float32).max)


def _reference_row(values: list[float]) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.asarray(values, dtype=np.float64).astype(np.float32)


def test_vectorize_matches_the_general_cast_on_random_rows() -> None:
    rng = random.Random(3)
    for _ in range(200):
        values = [rng.uniform(-1e6, 1e6), rng.randint(-(2**40), 2**40), rng.random()]
        row = SCHEMA.vectorize(dict(zip(SCHEMA.features, values, strict=True)))
        assert row.dtype == np.float32 and row.tobytes() == _reference_row(values).tobytes()


@pytest.mark.parametrize(
    ("values", "bad"),
    [
        ([0.0, float("nan"), 1.0], "b"),  # NaN not first: min/max skip it, the sum does not
        ([0.0, 1.0, float("inf")], "c"),
        ([0.0, F32_MAX * 1.0001, 1.0], "b"),  # finite float64, overflows float32
        ([-1e300, 0.0, 1.0], "a"),
    ],
)
def test_vectorize_still_rejects_non_finite_float32(values: list[float], bad: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        SCHEMA.vectorize(values)
    assert info.value.code == "non_finite_feature" and info.value.details == {"feature": bad}


def test_vectorize_edges_of_the_fast_path() -> None:
    assert SCHEMA.vectorize([F32_MAX, -F32_MAX, 0]).tolist() == [F32_MAX, -F32_MAX, 0.0]

    class Level(enum.IntEnum):
        HIGH = 2

    assert SCHEMA.vectorize({"a": Level.HIGH, "b": 1, "c": 0.5}).tolist() == [2.0, 1.0, 0.5]
    with pytest.raises(ValidationFailed) as info:
        SCHEMA.vectorize([1.0, True, 0.0])
    assert info.value.code == "invalid_feature_type" and info.value.details == {"feature": "b"}
    with pytest.raises(ValidationFailed) as info:
        SCHEMA.vectorize({"a": 1.0, "c": 0.0})
    assert info.value.code == "missing_feature" and info.value.details == {"missing": ["b"]}


async def test_first_attempt_success_builds_no_retrying_object(monkeypatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tenacity on the fast path")

    monkeypatch.setattr(retry_mod, "AsyncRetrying", refuse)
    clock = FakeClock()
    budget = RetryBudget(0.5, 10.0, clock)
    calls: list[int] = []

    async def ok(n: int) -> str:
        calls.append(n)
        return "ok"

    assert await Retrier(RetryPolicy(), budget).call(ok, Deadline.after(1, clock)) == "ok"
    assert calls == [1] and budget.counts() == (1, 0)


async def test_a_retry_after_the_bare_first_attempt_numbers_and_reports_it() -> None:
    clock = FakeClock()
    budget = RetryBudget(1.0, 10.0, clock)
    budget.record_request()  # room for one retry
    seen: list[BaseException] = []
    policy = RetryPolicy(max_attempts=3, backoff_base_s=0.0, backoff_max_s=0.0)
    calls: list[int] = []

    async def flaky(n: int) -> int:
        calls.append(n)
        if n < 3:
            raise BackendUnavailable(f"down {n}")
        return n

    retrier = Retrier(policy, budget, on_retry=seen.append)
    assert await retrier.call(flaky, Deadline.after(1, clock)) == 3
    assert calls == [1, 2, 3]
    assert [str(e) for e in seen] == ["down 1", "down 2"]
    assert budget.counts() == (2, 2)


async def test_try_acquire_takes_free_slots_only() -> None:
    adm = Admission(AdmissionLimits(max_in_flight_per_backend=2))
    assert adm.try_acquire("a") and adm.try_acquire("a")
    assert not adm.try_acquire("a") and adm.in_flight("a") == 2
    adm.release("a")
    assert adm.in_flight("a") == 1 and adm.try_acquire("a")


async def test_v2_infer_resolves_on_the_first_candidate_of_its_prefix(monkeypatch) -> None:
    """aiohttp tries the resources under "/v2/models" in registration order, one regex and one
    coroutine each: infer, the hot route, must be tried first, and the others still resolve."""
    app = web.Application()
    app.add_routes(oip.routes)
    tried: list[str] = []
    real = DynamicResource.resolve

    async def counting(self: DynamicResource, request: web.Request) -> object:
        tried.append(self.canonical)
        return await real(self, request)

    monkeypatch.setattr(DynamicResource, "resolve", counting)
    expected = {
        ("POST", "/v2/models/risk/versions/2/infer"): oip.infer,
        ("POST", "/v2/models/risk/infer"): oip.infer,
        ("GET", "/v2/models/risk/versions/2/ready"): oip.model_ready,
        ("GET", "/v2/models/risk/config"): oip.model_config,
        ("GET", "/v2/models/risk"): oip.model_metadata,
    }
    for (method, path), handler in expected.items():
        tried.clear()
        match = await app.router.resolve(make_mocked_request(method, path, app=app))
        assert match.handler is handler, (method, path)
        if handler is oip.infer:  # no other resource's regex tried first
            assert all(c.endswith("/infer") for c in tried), tried
