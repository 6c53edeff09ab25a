"""Predictions by input hash: a small in-process LRU in front of Redis, both with a TTL.

Serves two purposes: the ladder's cache rung (the last answer for the same input) and the
per-route response cache for deterministic models. Redis is optional and never required:
every Redis error is caught here (the boundary), the rung falls back to the LRU alone, and
writes to Redis happen in batches off the request path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping
from typing import Any

import orjson
import structlog
from cachetools import TLRUCache
from redis.exceptions import RedisError

from gateway.clock import Clock, monotonic

log = structlog.get_logger(__name__)

#: {"model", "version", "outputs": {name: [datatype, ...]}, "complete": every output or some}
CachedAnswer = dict[str, Any]


def serves(answer: CachedAnswer, outputs: Collection[str]) -> bool:
    """Whether a cached answer holds what a call asks for: each of ``outputs``, or, for a
    call that named none (every output of the model), an answer stored as complete."""
    held = answer.get("outputs")
    if not isinstance(held, dict):
        return False
    if outputs:
        return all(name in held for name in outputs)
    return answer.get("complete") is True


class PredictionCache:
    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        redis_url: str = "",
        redis_timeout_s: float = 0.02,
        redis_options: Mapping[str, Any] | None = None,  # gateway.redis_conn: password, TLS
        redis_cluster: bool = False,
        key_prefix: str = "switchyard:pred:",
        clock: Clock = monotonic,
        max_pending_writes: int = 10_000,
    ) -> None:
        self.max_entries = max_entries
        self.redis_timeout_s = redis_timeout_s
        self.key_prefix = key_prefix
        self.clock = clock
        self.max_pending_writes = max_pending_writes
        # Least recently used first out, each entry with its own TTL (cachetools: the
        # (ttl, answer) value's ttl sets its expiry at insertion, on the injected clock).
        # Entries: (ttl, answer, expires_at).
        self._lru: TLRUCache[str, tuple[float, CachedAnswer, float]] = TLRUCache(
            maxsize=max_entries, ttu=lambda _key, entry, now: now + entry[0], timer=clock
        )
        self._pending: dict[str, tuple[float, CachedAnswer]] = {}
        self._redis: Any = None
        self._redis_down_logged = False
        if redis_url:
            from gateway.redis_conn import client_from_url

            self._redis = client_from_url(
                redis_url,
                cluster=redis_cluster,
                socket_connect_timeout=redis_timeout_s,
                socket_timeout=redis_timeout_s,
                # No retry: a slow Redis must not stall the rung (a cluster client has no
                # such option; its retries follow MOVED/ASK, bounded by the socket timeout).
                **({} if redis_cluster else {"retry_on_timeout": False}),
                **(redis_options or {}),
            )

    # -- reads -----------------------------------------------------------------------------
    async def get(self, key: str, timeout_s: float) -> CachedAnswer | None:
        """The cached answer, or None on a miss, an expired entry or an unreachable Redis."""
        hit = self._lru.get(key)  # an expired entry reads as a miss
        if hit is not None:
            return hit[1]
        if self._redis is None or timeout_s <= 0:
            return None
        try:
            async with asyncio.timeout(min(timeout_s, self.redis_timeout_s)):
                raw = await self._redis.get(self.key_prefix + key)
        except (TimeoutError, OSError, RedisError) as exc:
            self._redis_failed("get", exc)
            return None
        if raw is None:
            return None
        value = orjson.loads(raw)
        return value if isinstance(value, dict) else None

    def fresh(
        self, key: str, model: str, version: str, ttl_s: float, outputs: Collection[str] = ()
    ) -> bool:
        """Whether this model version's answer for ``key`` is held with over half of a
        ``ttl_s`` still to run and with every one of ``outputs`` (then storing it again would
        only cost a Redis write); ``outputs`` empty: an answer with every output."""
        hit = self._lru.get(key)
        return (
            hit is not None
            and hit[2] - self.clock() > ttl_s / 2
            and hit[1].get("version") == version
            and hit[1].get("model") == model
            and serves(hit[1], outputs)
        )

    # -- writes ----------------------------------------------------------------------------
    def put(self, key: str, value: Mapping[str, Any], ttl_s: float) -> None:
        """Store in the LRU now; queue for Redis (written by `flush`)."""
        if ttl_s <= 0:
            return
        now = self.clock()
        hit = self._lru.get(key)
        if hit is not None and hit[2] - now > ttl_s / 2 and hit[1] == value:
            # The same answer, still fresh for over half its TTL (a deterministic model's
            # hot input): neither the LRU nor Redis needs it again. Saves a Redis SET per
            # repeated answer; the entry is refreshed once its TTL is half spent.
            return
        value = dict(value)
        self._lru[key] = (ttl_s, value, now + ttl_s)
        entry = (now + ttl_s, value)
        if self._redis is not None and len(self._pending) < self.max_pending_writes:
            self._pending[key] = entry

    async def flush(self) -> int:
        """Write the queued entries to Redis in one pipeline; drops them if Redis is down."""
        if self._redis is None or not self._pending:
            return 0
        batch, self._pending = self._pending, {}
        now = self.clock()
        try:
            async with asyncio.timeout(max(1.0, self.redis_timeout_s * 10)):
                pipe = self._redis.pipeline(transaction=False)
                for key, (expires, value) in batch.items():
                    ttl_ms = int((expires - now) * 1000)
                    if ttl_ms > 0:
                        pipe.set(self.key_prefix + key, orjson.dumps(value), px=ttl_ms)
                await pipe.execute()
        except (TimeoutError, OSError, RedisError) as exc:
            self._redis_failed("flush", exc)
            return 0
        self._redis_down_logged = False
        return len(batch)

    async def run_flusher(self, interval_s: float = 0.1) -> None:
        """Background task: flush every ``interval_s`` until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            await self.flush()

    async def close(self) -> None:
        if self._redis is not None:
            await self.flush()
            try:
                await self._redis.aclose()
            except (OSError, RedisError) as exc:
                log.debug("cache_redis_close_failed", error=str(exc))

    def _redis_failed(self, op: str, exc: BaseException) -> None:
        if not self._redis_down_logged:  # once per outage, not once per request
            log.warning("cache_redis_unavailable", op=op, error=repr(exc))
            self._redis_down_logged = True
