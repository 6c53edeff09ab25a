"""The prediction cache's in-process side: per-entry TTLs on an injected clock, and repeated
answers not written to Redis again while fresh."""

from __future__ import annotations

from gateway.clock import FakeClock
from gateway.resilience.cache import PredictionCache

ANSWER = {"version": "2", "outputs": {"score": ["FP32", [1], [0.25]]}, "complete": True}


async def test_entries_expire_on_their_own_ttl() -> None:
    clock = FakeClock()
    cache = PredictionCache(max_entries=10, clock=clock)
    cache.put("short", ANSWER, 1.0)
    cache.put("long", ANSWER, 10.0)
    clock.advance(2.0)
    assert await cache.get("short", 0.0) is None
    assert await cache.get("long", 0.0) == ANSWER


async def test_a_fresh_repeated_answer_is_not_queued_for_redis_again() -> None:
    clock = FakeClock()
    # A Redis URL nobody listens on: writes only queue (flush is not called here).
    cache = PredictionCache(max_entries=10, clock=clock, redis_url="redis://127.0.0.1:1/0")
    cache.put("k", ANSWER, 60.0)
    assert len(cache._pending) == 1
    cache._pending.clear()
    cache.put("k", ANSWER, 60.0)  # the same answer, fresh: nothing to write
    assert cache._pending == {}
    cache.put("k", {**ANSWER, "version": "3"}, 60.0)  # a new answer is written
    assert len(cache._pending) == 1
    cache._pending.clear()
    clock.advance(31.0)  # past half its TTL: refreshed, so Redis keeps it alive
    cache.put("k", {**ANSWER, "version": "3"}, 60.0)
    assert len(cache._pending) == 1
    await cache.close()


def test_fresh_names_the_version_that_answered() -> None:
    clock = FakeClock()
    cache = PredictionCache(max_entries=10, clock=clock)
    cache.put("k", {"model": "risk", **ANSWER}, 60.0)
    assert cache.fresh("k", "risk", "2", 60.0)
    assert not cache.fresh("k", "risk", "3", 60.0)  # another version: store its answer
    assert not cache.fresh("other", "risk", "2", 60.0)
    clock.advance(31.0)
    assert not cache.fresh("k", "risk", "2", 60.0)  # half spent: refresh it


def test_fresh_asks_for_the_outputs_a_call_names() -> None:
    cache = PredictionCache(max_entries=10, clock=FakeClock())
    cache.put("k", {"model": "risk", **ANSWER, "complete": False}, 60.0)  # score only
    assert cache.fresh("k", "risk", "2", 60.0, ("score",))
    assert not cache.fresh("k", "risk", "2", 60.0, ("score", "decision"))
    assert not cache.fresh("k", "risk", "2", 60.0)  # a call that named none wants them all
