"""Redis connection options from settings: the password and TLS, never from the YAML.

Every Redis client of the gateway (prediction log, feedback, features, cache, rate limiter,
CLI) is built here, so one place decides how the gateway authenticates and whether it talks
to one Redis or to a Redis Cluster (`redis.cluster`: a `RedisCluster`, which routes each
command by its key's slot; the keys one script touches share a hash tag, and the few multi-key
reads ask `is_cluster`). The password comes from
the environment (`SWITCHYARD_REDIS_PASSWORD`: a compose or Kubernetes secret) or from the
file `redis.password_file` names; a password inside `redis.url` is refused when the settings
load (gateway/config.py), because settings files are committed and logged. `rediss://` urls
speak TLS; `redis.tls_ca_file` names a private CA to check the server against.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from gateway.config import RedisSettings
from gateway.redis_kind import Client, is_cluster
from gateway.security.secrets import read_secret

PASSWORD_ENV = "SWITCHYARD_REDIS_PASSWORD"
__all__ = ["Client", "async_client", "client_from_url", "is_cluster", "sync_client"]


def redis_password(r: RedisSettings, env: Mapping[str, str] | None = None) -> str | None:
    """The password from the environment, else from ``r.password_file``; None: no AUTH."""
    value = (os.environ if env is None else env).get(PASSWORD_ENV, "")
    return read_secret(value, r.password_file, "redis.password") or None


def redis_options(r: RedisSettings, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``Redis.from_url(r.url, ...)`` beyond the timeouts."""
    options: dict[str, Any] = {}
    password = redis_password(r, env)
    if password is not None:
        options["password"] = password
    if r.tls_ca_file is not None and r.url.startswith("rediss://"):
        options["ssl_ca_certs"] = str(r.tls_ca_file)
    return options


def async_client(r: RedisSettings, **kwargs: Any) -> Client:
    """A pooled asyncio client (connects lazily) with the password and TLS options: a
    `RedisCluster` seeded by `r.url` when `r.cluster`."""
    return client_from_url(r.url, cluster=r.cluster, **redis_options(r), **kwargs)


def client_from_url(url: str, *, cluster: bool = False, **kwargs: Any) -> Client:
    if cluster:
        return RedisCluster.from_url(url, **kwargs)
    return aioredis.Redis.from_url(url, **kwargs)


def sync_client(r: RedisSettings, **kwargs: Any) -> redis.Redis:
    """The same for synchronous callers (the CLI)."""
    return redis.Redis.from_url(r.url, **redis_options(r), **kwargs)
