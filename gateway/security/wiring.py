"""Settings -> the app's security pieces: key store, guard, middleware, their lifetime.

`build_security` is what the composition root calls. With `auth.enabled` off it adds no
middleware at all (no cost per request) and every caller is "anonymous".
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry

from gateway.config import ConfigError, Settings
from gateway.redis_conn import async_client
from gateway.security.authn import Authenticator
from gateway.security.guard import Guard
from gateway.security.keys import KeyFile, KeyFileError, TenantLimit, tenant_limit
from gateway.security.ratelimit import RateLimiter
from gateway.security.reload import KeyStore
from gateway.security.rest import auth_middleware

log = structlog.get_logger(__name__)


@dataclass
class Security:
    guard: Guard
    store: KeyStore | None = None
    limiter: RateLimiter | None = None
    middlewares: list[Middleware] = field(default_factory=list)

    async def ctx(self, _: web.Application) -> AsyncIterator[None]:
        """cleanup_ctx: the key file poll runs while the app does."""
        if self.store is not None:
            await self.store.start()
        yield
        if self.store is not None:
            await self.store.stop()
        if self.limiter is not None:
            await self.limiter.close()


def build_security(settings: Settings, registry: CollectorRegistry | None = None) -> Security:
    a = settings.auth
    if not a.enabled:
        return Security(Guard(Authenticator(KeyFile, enabled=False)))
    store = KeyStore(a.keys_file, a.reload_interval_s, registry)
    try:
        store.load()  # an invalid key file stops the start; a missing one holds no keys
        configured = {
            str(name): tenant_limit(spec, f"auth.tenants.{name}")
            for name, spec in a.tenants.items()
        }
    except KeyFileError as exc:
        raise ConfigError(str(exc)) from exc
    if not store.current.keys:
        log.warning("auth_no_keys", keys_file=str(a.keys_file), effect="every request gets 401")
    client = None
    if settings.redis.url:
        client = async_client(
            settings.redis,
            socket_connect_timeout=a.ratelimit_timeout_s,
            socket_timeout=a.ratelimit_timeout_s,
        )
    limiter = RateLimiter(
        client,
        tenants=_merged_tenants(store, configured),
        prefix=a.ratelimit_prefix,
        retry_interval_s=a.ratelimit_retry_interval_s,
        registry=registry,
    )
    guard = Guard(
        Authenticator(lambda: store.current),
        limiter,
        protect_metrics=a.protect_metrics,
        protect_metadata=a.protect_metadata,
    )
    return Security(guard, store, limiter, [auth_middleware(guard)])


def _merged_tenants(
    store: KeyStore, configured: Mapping[str, TenantLimit]
) -> Callable[[], Mapping[str, TenantLimit]]:
    """Tenant limits of the settings, overridden by the key file's; merged once per reload."""
    cache: dict[str, object] = {"file": None, "merged": configured}

    def tenants() -> Mapping[str, TenantLimit]:
        current = store.current
        if cache["file"] is not current:
            cache["file"] = current
            cache["merged"] = {**configured, **current.tenants}
        merged = cache["merged"]
        assert isinstance(merged, Mapping)
        return merged

    return tenants
