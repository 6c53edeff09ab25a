"""One acting controller per model across replicas: a Redis lease with a fencing token.

`acquire` takes the lease when it is free (SET NX PX) and draws the next fencing token from a
counter that only grows (INCR), or renews it when this controller already holds it (same
token). Both happen in one script, so no other controller can slip in between. A controller
that paused past its lease (GC, a slow disk, a network partition) comes back with a token
that is no longer current: `check`, run right before every route write, then says no, and
the write is skipped. Keys: `<prefix>:lease:<model>` ("<holder> <token>", expires) and
`<prefix>:fence:<model>` (the last token handed out, never expires).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.errors import StreamUnavailable

_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local sep = string.find(cur, ' [^ ]*$')
  if sep and string.sub(cur, 1, sep - 1) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(string.sub(cur, sep + 1))
  end
  return false
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. token, 'NX', 'PX', ARGV[2])
return token
"""

# Current: the lease still names this holder and token, and no later token was handed out.
_CHECK = """
if redis.call('GET', KEYS[1]) == ARGV[1] .. ' ' .. ARGV[2]
   and redis.call('GET', KEYS[2]) == ARGV[2] then
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] .. ' ' .. ARGV[2] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Holder:
    holder: str
    token: int
    ttl_ms: int


class Lease:
    def __init__(
        self, client: aioredis.Redis, prefix: str, model: str, holder: str, ttl_s: float
    ) -> None:
        self.client = client
        self.holder = holder
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.key = f"{prefix}:lease:{model}"
        self.fence_key = f"{prefix}:fence:{model}"

    async def acquire(self) -> int | None:
        """This controller's fencing token (taken now or renewed), or None: another holds it."""
        token = await self._run(_ACQUIRE, self.holder, self.ttl_ms)
        return None if token is None else int(token)

    async def check(self, token: int) -> bool:
        """The lease is still ours under `token`: run right before each write."""
        return bool(await self._run(_CHECK, self.holder, token))

    async def release(self, token: int) -> None:
        await self._run(_RELEASE, self.holder, token)

    async def current(self) -> Holder | None:
        """Who holds the lease now (for `rollout status`), or None."""
        try:
            value, ttl = await self.client.get(self.key), await self.client.pttl(self.key)
        except (RedisError, OSError) as exc:
            raise StreamUnavailable(f"rollout lease read failed: {exc}") from exc
        if value is None:
            return None
        text = value.decode() if isinstance(value, bytes) else str(value)
        holder, _, token = text.rpartition(" ")
        return Holder(holder, int(token) if token.isdigit() else 0, int(ttl))

    async def _run(self, script: str, *args: str | int) -> Any:
        try:
            return await self.client.eval(script, 2, self.key, self.fence_key, *args)
        except (RedisError, OSError) as exc:
            raise StreamUnavailable(f"rollout lease failed: {exc}") from exc
