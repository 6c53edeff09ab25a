"""Rate limits per key and per tenant, shared by every worker and replica through Redis.

GCRA (the generic cell rate algorithm: a token bucket that stores one number, the
"theoretical arrival time" of the next request) in one Lua script per request: the key's and
its tenant's limits are checked, and only if both admit the request both advance, in one
atomic step on Redis's clock (no skew between replicas). Both keys carry the same Redis
Cluster hash tag, so the one script call touches one slot:

    <prefix>:{t:<tenant>}:key:<key id>     <prefix>:{t:<tenant>}:tenant
    <prefix>:{k:<key id>}:key              (a key without a tenant)

If Redis is unreachable (or slower than the client's socket timeouts, which the wiring sets
to `auth.ratelimit_timeout_s`), a local GCRA per process decides
instead: limits then hold per process, not per deployment, which degrades to "N workers x the
rate" rather than to "no limit" or "no service". Redis is tried again every
`retry_interval_s`; the switch is logged once each way and counted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog
from prometheus_client import CollectorRegistry, Counter
from redis.exceptions import RedisError

from gateway.errors import RateLimited
from gateway.security.authn import Principal
from gateway.security.keys import TenantLimit, burst_of

log = structlog.get_logger(__name__)

# KEYS: 1-2 TAT keys. ARGV: interval_us, tolerance_us per key. Returns {denied index (0:
# admitted), retry_after_us, then remaining and reset_us per key}.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local denied, retry = 0, 0
local cur, nxt = {}, {}
for i = 1, #KEYS do
  local interval, tolerance = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  cur[i], nxt[i] = tat, tat + interval
  local wait = nxt[i] - tolerance - now
  if wait > 0 then
    if denied == 0 then denied = i end
    if wait > retry then retry = wait end
  end
end
if denied == 0 then
  for i = 1, #KEYS do
    local ttl_ms = math.ceil((nxt[i] - now) / 1000) + 1
    redis.call('SET', KEYS[i], string.format('%.0f', nxt[i]), 'PX', ttl_ms)
    cur[i] = nxt[i]
  end
end
local out = {denied, string.format('%.0f', retry)}
for i = 1, #KEYS do
  local interval, tolerance = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local remaining = math.floor((tolerance - (cur[i] - now)) / interval)
  if remaining < 0 then remaining = 0 end
  out[#out + 1] = remaining
  out[#out + 1] = string.format('%.0f', cur[i] - now)
end
return out
"""


@dataclass(frozen=True, slots=True)
class Limit:
    scope: str  # "key" or "tenant"
    redis_key: str
    rate: float
    burst: int

    @property
    def interval_us(self) -> int:
        # Whole microseconds: the script's sums stay exact (doubles hold integers exactly).
        return max(1, round(1e6 / self.rate))


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: Limit  # the binding one: the one that refused, else the one closest to refusing
    remaining: int
    reset_s: float  # until the binding bucket is full again
    retry_after_s: float = 0.0

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit.burst),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(math.ceil(self.reset_s)),
        }

    def raise_if_denied(self) -> None:
        if self.allowed:
            return
        exc = RateLimited(
            f"rate limit exceeded ({self.limit.scope}: {self.limit.rate:g}/s)",
            details={"limit": self.limit.scope},
            retry_after_s=self.retry_after_s,
        )
        exc.extra_headers = self.headers()
        raise exc


class RateLimiter:
    def __init__(
        self,
        client: aioredis.Redis | None,
        tenants: Callable[[], Mapping[str, TenantLimit]] = dict,
        prefix: str = "rl",
        retry_interval_s: float = 1.0,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("the rate-limit prefix cannot hold braces (they form the hash tag)")
        self.client = client
        self.tenants = tenants
        self.prefix = prefix
        self.retry_interval_s = retry_interval_s
        self.clock = clock
        self._script = client.register_script(_GCRA) if client is not None else None
        self._down_until = 0.0
        self._down = False
        self._local: dict[str, float] = {}  # redis key -> theoretical arrival time (s)
        self._cached_tenants: Mapping[str, TenantLimit] | None = None
        self._limits: dict[Principal, list[Limit]] = {}
        self._rejected = Counter(
            "ratelimit_rejected_total", "Requests refused with 429", ["limit"], registry=registry
        )
        self._local_decisions = Counter(
            "ratelimit_local_decisions_total",
            "Rate-limit decisions taken by the per-process fallback (Redis unreachable)",
            registry=registry,
        )

    def limits_for(self, principal: Principal) -> list[Limit]:
        """The limits that apply to ``principal``; cached per principal until the tenant
        limits change (a key file reload), so a request builds no strings."""
        tenants = self.tenants()
        if tenants is not self._cached_tenants:
            self._cached_tenants, self._limits = tenants, {}
        limits = self._limits.get(principal)
        if limits is None:
            if len(self._limits) > 100_000:  # keys come from the key file; a bound anyway
                self._limits.clear()
            limits = self._limits[principal] = self._build_limits(principal, tenants)
        return limits

    def _build_limits(
        self, principal: Principal, tenants: Mapping[str, TenantLimit]
    ) -> list[Limit]:
        tag = f"t:{principal.tenant}" if principal.tenant else f"k:{principal.key_id}"
        out = []
        if principal.rate is not None:
            key = f"{self.prefix}:{{{tag}}}:key" + (
                f":{principal.key_id}" if principal.tenant else ""
            )
            out.append(Limit("key", key, principal.rate, burst_of(principal.rate, principal.burst)))
        tenant = tenants.get(principal.tenant) if principal.tenant else None
        if tenant is not None:
            out.append(
                Limit(
                    "tenant",
                    f"{self.prefix}:{{{tag}}}:tenant",
                    tenant.rate,
                    burst_of(tenant.rate, tenant.burst),
                )
            )
        return out

    async def admit(self, principal: Principal) -> Decision | None:
        """Count one request; raises RateLimited (429) over a limit. None: nothing limits it."""
        decision = await self.check(principal)
        if decision is not None and not decision.allowed:
            self._rejected.labels(limit=decision.limit.scope).inc()
            decision.raise_if_denied()
        return decision

    async def check(self, principal: Principal) -> Decision | None:
        limits = self.limits_for(principal)
        if not limits:
            return None
        if self._script is not None and self.clock() >= self._down_until:
            try:
                return await self._remote(limits)
            except (TimeoutError, RedisError, OSError) as exc:
                self._down_until = self.clock() + self.retry_interval_s
                if not self._down:
                    self._down = True
                    log.warning("ratelimit_redis_down", error=str(exc), fallback="local")
        self._local_decisions.inc()
        return self._local_check(limits)

    async def _remote(self, limits: list[Limit]) -> Decision:
        assert self._script is not None
        args: list[int] = []
        for lim in limits:
            args += [lim.interval_us, lim.interval_us * lim.burst]
        # The client's socket timeouts bound the call; no wait_for (a task per request).
        reply = await self._script(keys=[lim.redis_key for lim in limits], args=args)
        if self._down:
            self._down = False
            log.info("ratelimit_redis_back")
        denied, retry_us = int(reply[0]), float(reply[1])
        states = [
            (int(reply[2 + 2 * i]), float(reply[3 + 2 * i]) / 1e6) for i in range(len(limits))
        ]
        return _decide(limits, states, denied, retry_us / 1e6)

    def _local_check(self, limits: list[Limit]) -> Decision:
        """The same GCRA as the script, on this process's clock and memory."""
        now = self.clock()
        tats = [max(self._local.get(lim.redis_key, now), now) for lim in limits]
        denied, retry = 0, 0.0
        for i, (lim, tat) in enumerate(zip(limits, tats, strict=True), start=1):
            wait = tat + 1 / lim.rate - lim.burst / lim.rate - now
            if wait > 1e-9:
                denied = denied or i
                retry = max(retry, wait)
        if not denied:
            tats = [tat + 1 / lim.rate for lim, tat in zip(limits, tats, strict=True)]
            for lim, tat in zip(limits, tats, strict=True):
                self._local[lim.redis_key] = tat
        states = [
            (max(0, math.floor((lim.burst / lim.rate - (tat - now)) * lim.rate + 1e-9)), tat - now)
            for lim, tat in zip(limits, tats, strict=True)
        ]
        return _decide(limits, states, denied, retry)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()


def _decide(
    limits: list[Limit], states: list[tuple[int, float]], denied: int, retry_s: float
) -> Decision:
    """The binding limit: the one that refused, else the one with the fewest requests left."""
    i = denied - 1 if denied else min(range(len(limits)), key=lambda j: states[j][0])
    remaining, reset_s = states[i]
    return Decision(not denied, limits[i], remaining, max(0.0, reset_s), retry_s)
