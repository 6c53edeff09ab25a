"""One factory for every Redis client of the gateway: a standalone pool or a Redis Cluster.

With `redis.cluster: true` every user (prediction log, feedback labels, features, rate limits,
response cache) gets a `RedisCluster`, which routes each command by its key's slot. The keys
that one script touches share a hash tag (`{...}`), so every script stays on one slot; nothing
else here needs to know which kind of client it holds, except `is_cluster` for the few
multi-key reads (MGET) a cluster splits by slot.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

#: Either kind; both offer the same commands, pipelines and scripts.
Client = Any


def redis_client(
    url: str,
    *,
    cluster: bool = False,
    connect_timeout_s: float = 0.5,
    socket_timeout_s: float = 1.0,
    health_check_interval: int = 0,
    **options: Any,
) -> Client:
    """A client that connects lazily: a pooled `Redis`, or a `RedisCluster` seeded by `url`."""
    if cluster:
        return RedisCluster.from_url(
            url,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=socket_timeout_s,
            health_check_interval=health_check_interval,
            **options,
        )
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=socket_timeout_s,
        health_check_interval=health_check_interval,
        **options,
    )


def is_cluster(client: object) -> bool:
    return isinstance(client, RedisCluster)
