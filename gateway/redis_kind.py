"""Which kind of Redis client a component holds (one Redis or a Cluster), without importing
settings: the prediction log, feedback and features need only this, and gateway.redis_conn
(which builds the clients from Settings) sits above them."""

from __future__ import annotations

from typing import Any

from redis.asyncio.cluster import RedisCluster

#: An asyncio client of either kind; both offer the same commands, pipelines and scripts.
Client = Any


def is_cluster(client: object) -> bool:
    return isinstance(client, RedisCluster)
