"""Rate limits against a real Redis: shared by separate clients and separate app instances
(the cross-replica property), key and tenant in one slot, and the per-process fallback when
Redis is unreachable. Keys live under a unique prefix (no flush: Redis may be shared)."""

from __future__ import annotations

import dataclasses
import io
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import structlog
from redis.crc import key_slot

from gateway.app import build_app
from gateway.config import AuthSettings
from gateway.errors import RateLimited
from gateway.security.authn import Principal
from gateway.security.keys import KeyFile, KeyRecord, TenantLimit, hash_key, new_key, write_key_file
from gateway.security.ratelimit import RateLimiter
from gateway.tritonserver import free_port
from tests.conftest import REDIS_URL, reachable_aioredis
from tests.unit.fakes import toy_backend, write_repo

SLOW = 0.2  # requests per second: one token every 5 s, so no refill during a test


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    client = await reachable_aioredis()
    name = f"test-rl-{uuid.uuid4().hex[:12]}"
    yield name
    keys = [k async for k in client.scan_iter(match=f"{name}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def limiter(prefix: str, url: str = REDIS_URL, **tenants: TenantLimit) -> RateLimiter:
    client = aioredis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    return RateLimiter(client, tenants=lambda: tenants, prefix=prefix)


async def admitted(lim: RateLimiter, who: Principal) -> bool:
    try:
        await lim.admit(who)
    except RateLimited:
        return False
    return True


async def test_two_limiters_with_their_own_clients_share_one_key_limit(prefix: str) -> None:
    a, b = limiter(prefix), limiter(prefix)
    who = Principal("k1", frozenset({"predict"}), rate=SLOW, burst=4)
    try:
        results = [await admitted(a if i % 2 else b, who) for i in range(10)]
        assert results == [True] * 4 + [False] * 6  # 4 in all, not 4 per limiter
        decision = await a.check(who)
        assert decision is not None and not decision.allowed
        assert 0 < decision.retry_after_s <= 1 / SLOW and decision.remaining == 0
        assert a._local_decisions._value.get() == 0  # Redis decided every time
    finally:
        await a.close()
        await b.close()


async def test_tenant_limit_is_shared_by_its_keys_in_one_slot(prefix: str) -> None:
    lim = limiter(prefix, acme=TenantLimit(SLOW, burst=3))
    k1 = Principal("k1", frozenset({"predict"}), tenant="acme", rate=SLOW, burst=2)
    k2 = Principal("k2", frozenset({"predict"}), tenant="acme")  # no own rate, tenant only
    try:
        key_limit, tenant_limit = lim.limits_for(k1)
        assert key_slot(key_limit.redis_key.encode()) == key_slot(tenant_limit.redis_key.encode())
        assert "{t:acme}" in key_limit.redis_key
        assert [await admitted(lim, k2) for _ in range(2)] == [True, True]
        assert await admitted(lim, k1)  # the tenant's third
        assert not await admitted(lim, k1)  # tenant exhausted, k1 still has one of its own
        with pytest.raises(RateLimited) as err:
            await lim.admit(k2)
        assert err.value.details == {"limit": "tenant"}
        assert err.value.headers()["X-RateLimit-Limit"] == "3"
        # The refusals consumed nothing: k1's bucket holds one request's worth (TTL about one
        # interval, 5 s), not two (10 s).
        assert lim.client is not None
        pttl = await lim.client.pttl(key_limit.redis_key)
        assert 0 < pttl <= 1000 / SLOW + 1
    finally:
        await lim.close()


async def test_redis_down_falls_back_to_a_local_bucket_and_says_so_once() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    lim = limiter("test-rl-dead", url=dead)
    who = Principal("k1", frozenset({"predict"}), rate=SLOW, burst=3)
    try:
        with structlog.testing.capture_logs() as logs:
            results = [await admitted(lim, who) for _ in range(6)]
        assert results == [True] * 3 + [False] * 3  # still limited, per process
        assert [e["event"] for e in logs].count("ratelimit_redis_down") == 1
        assert lim._local_decisions._value.get() == 6
    finally:
        await lim.close()


async def test_two_app_instances_share_the_limit_through_redis(
    tmp_path: Path, prefix: str, aiohttp_client
) -> None:
    """Two gateways (as two replicas would be), one key file, one Redis: one share."""
    keys_file = tmp_path / "keys.yaml"
    key = new_key()
    rec = KeyRecord("shared", hash_key(key), frozenset({"predict"}), rate=SLOW, burst=3)
    write_key_file(keys_file, KeyFile((rec,)))
    clients = []
    for n in range(2):
        base = write_repo(tmp_path / f"gw{n}")
        settings = dataclasses.replace(
            base,
            auth=AuthSettings(enabled=True, keys_file=keys_file, ratelimit_prefix=prefix),
            redis=dataclasses.replace(base.redis, url=REDIS_URL),
            predlog=dataclasses.replace(base.predlog, stream_prefix=f"{prefix}-predictions"),
        )
        clients.append(await aiohttp_client(build_app(settings, backend=toy_backend())))
    statuses = []
    for i in range(6):
        resp = await clients[i % 2].post(
            "/v1/predict",
            data=io.BytesIO(json.dumps({"model_name": "toy", "features": [0, 0, 0]}).encode()),
            headers={"Authorization": f"Bearer {key}"},
        )
        statuses.append(resp.status)
    assert statuses == [200, 200, 200, 429, 429, 429]
