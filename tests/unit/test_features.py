"""Online feature lookup: merge, TTL cache, 422 for unknown entities, timeouts in budget."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.clock import FakeClock
from gateway.errors import ClientError, ServiceUnavailable, ValidationFailed
from gateway.features import FeatureStore
from gateway.metrics import Metrics
from gateway.types import Deadline


class HashClient:
    """The slice of redis.asyncio the store uses: a pipeline of HGETALLs."""

    def __init__(self, hashes: dict[str, dict[bytes, bytes]], hang: bool = False) -> None:
        self.hashes = hashes
        self.hang = hang
        self.calls = 0

    def pipeline(self, transaction: bool = False) -> HashClient._Pipe:
        return HashClient._Pipe(self)

    class _Pipe:
        def __init__(self, client: HashClient) -> None:
            self.client = client
            self.keys: list[str] = []

        async def __aenter__(self) -> HashClient._Pipe:
            return self

        async def __aexit__(self, *exc: Any) -> None:
            return None

        def hgetall(self, key: str) -> None:
            self.keys.append(key)

        async def execute(self) -> list[dict[bytes, bytes]]:
            self.client.calls += 1
            if self.client.hang:
                await asyncio.Event().wait()
            return [self.client.hashes.get(k, {}) for k in self.keys]


def store(client: HashClient, clock: FakeClock, **kw: Any) -> FeatureStore:
    return FeatureStore(client, Metrics(), clock=clock, **kw)  # type: ignore[arg-type]


HASHES = {
    "features:base:v1:u1": {b"a": b"1.5", b"b": b"2"},
    "features:extra:v2:u1": {b"b": b"3", b"c": b"-1"},
}


async def test_refs_merge_in_order_and_are_cached_for_the_ttl() -> None:
    clock = FakeClock()
    client = HashClient(HASHES)
    s = store(client, clock, cache_ttl_s=1.0)
    deadline = Deadline.after(10, clock)
    got = await s.resolve(["base:v1", "extra:v2"], "u1", deadline)
    assert got == {"a": 1.5, "b": 3.0, "c": -1.0}
    await s.resolve(["base:v1", "extra:v2"], "u1", deadline)
    assert client.calls == 1  # served from the cache
    clock.advance(1.5)
    await s.resolve(["base:v1"], "u1", Deadline.after(10, clock))
    assert client.calls == 2  # expired
    assert s.metrics is not None
    assert (
        s.metrics.registry.get_sample_value(
            "feature_lookups_total", {"feature_set": "extra:v2", "result": "cache"}
        )
        == 1
    )


async def test_unknown_entity_is_a_clear_422() -> None:
    s = store(HashClient(HASHES), FakeClock())
    with pytest.raises(ValidationFailed) as info:
        await s.resolve(["base:v1"], "nobody", Deadline.after(10, s.clock))
    assert info.value.status == 422 and info.value.code == "features_not_found"
    assert info.value.details == {"feature_ref": "base:v1", "entity_id": "nobody"}


async def test_refs_need_an_entity() -> None:
    s = store(HashClient(HASHES), FakeClock())
    with pytest.raises(ClientError) as info:
        await s.resolve(["base:v1"], None, Deadline.after(10, s.clock))
    assert info.value.status == 400


async def test_a_hanging_store_fails_within_its_timeout() -> None:
    s = FeatureStore(HashClient(HASHES, hang=True), timeout_ms=1)  # type: ignore[arg-type]
    with pytest.raises(ServiceUnavailable) as info:
        await s.resolve(["base:v1"], "u1", Deadline.after(10))
    assert info.value.code == "feature_store_unavailable"
