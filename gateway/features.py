"""Online features: `feature_refs` such as "risk_features:v3" resolved from Redis hashes.

One hash per (feature set, entity): `features:<set>:<entity_id>`, field = feature name. The
lookup spends at most `timeout_ms`, and never more than the request's deadline leaves; a tiny
TTL cache absorbs hot entities. An entity the store has nothing for is the caller's problem
(422 `features_not_found`); a slow or unreachable store is ours (504 / 503).
"""

from __future__ import annotations

import asyncio
import csv
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from cachetools import TTLCache
from redis.exceptions import RedisError

from gateway.clock import Clock, monotonic
from gateway.errors import ClientError, DeadlineExceeded, FeatureStoreUnavailable, ValidationFailed
from gateway.metrics import Metrics
from gateway.redis_kind import Client, is_cluster
from gateway.types import Deadline

Features = dict[str, float]


class FeatureStore:
    def __init__(
        self,
        client: Client,
        metrics: Metrics | None = None,
        key_prefix: str = "features",
        timeout_ms: float = 20.0,
        cache_ttl_s: float = 1.0,
        cache_size: int = 10_000,
        clock: Clock = monotonic,
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.key_prefix = key_prefix
        self.timeout_s = timeout_ms / 1000.0
        self.cache_ttl_s = cache_ttl_s
        self.cache_size = cache_size
        self.clock = clock
        # LRU with one TTL for every entry, on the injected clock (cachetools).
        self._cache: TTLCache[str, Features] = TTLCache(
            maxsize=max(1, cache_size), ttl=max(cache_ttl_s, 1e-9), timer=clock
        )

    def key(self, feature_set: str, entity_id: str) -> str:
        return f"{self.key_prefix}:{feature_set}:{entity_id}"

    async def resolve(
        self, refs: Sequence[str], entity_id: str | None, deadline: Deadline
    ) -> Features:
        """Every referenced set for one entity, merged in order (later sets win)."""
        if not entity_id:
            raise ClientError(
                "feature_refs need an entity_id",
                code="missing_field",
                details={"field": "entity_id"},
            )
        keys = [self.key(ref, entity_id) for ref in refs]
        found: dict[str, Features] = {}
        misses = []
        for ref, key in zip(refs, keys, strict=True):
            cached = self._cached(key)
            if cached is None:
                misses.append((ref, key))
            else:
                found[key] = cached
                self._count(ref, "cache")
        if misses:
            fetched = await self._fetch([k for _, k in misses], deadline)
            for (ref, key), values in zip(misses, fetched, strict=True):
                if not values:
                    self._count(ref, "missing")
                    raise ValidationFailed(
                        f"no features {ref!r} for entity {entity_id!r}",
                        code="features_not_found",
                        details={"feature_ref": ref, "entity_id": entity_id},
                    )
                self._count(ref, "hit")
                found[key] = values
                self._remember(key, values)
        merged: Features = {}
        for key in keys:
            merged.update(found[key])
        return merged

    async def _fetch(self, keys: list[str], deadline: Deadline) -> list[Features]:
        budget = min(self.timeout_s, deadline.check("feature lookup"))
        try:
            async with asyncio.timeout(budget):
                async with self.client.pipeline(transaction=False) as pipe:
                    for k in keys:
                        pipe.hgetall(k)
                    raw = await pipe.execute()
        except TimeoutError:
            if deadline.expired():
                raise DeadlineExceeded(
                    "deadline exceeded during feature lookup", details={"step": "features"}
                ) from None
            raise FeatureStoreUnavailable(
                f"feature store did not answer within {budget * 1000:.0f} ms"
            ) from None
        except (RedisError, OSError) as exc:
            raise FeatureStoreUnavailable(f"feature store unreachable: {exc}") from exc
        return [_decode(h, k) for h, k in zip(raw, keys, strict=True)]

    def _cached(self, key: str) -> Features | None:
        return self._cache.get(key)  # an expired entry reads as a miss

    def _remember(self, key: str, values: Features) -> None:
        if self.cache_ttl_s > 0 and self.cache_size > 0:
            self._cache[key] = values

    def _count(self, ref: str, result: str) -> None:
        if self.metrics is not None:
            self.metrics.feature_lookups.labels(ref, result).inc()


def _decode(raw: Mapping[bytes, bytes], key: str) -> Features:
    try:
        return {k.decode(): float(v) for k, v in raw.items()}
    except ValueError as exc:
        raise FeatureStoreUnavailable(f"{key} holds a non-numeric feature: {exc}") from exc


def read_feature_csv(
    path: Path, entity_column: str = "entity_id"
) -> Iterable[tuple[str, Features]]:
    """Rows of a CSV with an entity column and one column per feature."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or entity_column not in reader.fieldnames:
            raise ValueError(f"{path}: no {entity_column!r} column")
        for n, row in enumerate(reader, 2):
            entity = row.pop(entity_column)
            try:
                yield entity, {k: float(v) for k, v in row.items()}
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{n}: {exc}") from exc


async def load_features(
    client: Client,
    feature_set: str,
    rows: Iterable[tuple[str, Features]],
    key_prefix: str = "features",
    chunk: int = 500,
) -> int:
    """Write rows into `features:<set>:<entity>` hashes (replacing each entity's hash)."""
    count = 0
    pending: list[tuple[str, Features]] = []

    async def flush() -> None:
        # One transaction on one Redis; a cluster spreads entities over slots (no transaction).
        async with client.pipeline(transaction=not is_cluster(client)) as pipe:
            for entity, values in pending:
                key = f"{key_prefix}:{feature_set}:{entity}"
                pipe.delete(key)
                pipe.hset(key, mapping={k: repr(v) for k, v in values.items()})
            await pipe.execute()
        pending.clear()

    for row in rows:
        pending.append(row)
        count += 1
        if len(pending) >= chunk:
            await flush()
    if pending:
        await flush()
    return count
