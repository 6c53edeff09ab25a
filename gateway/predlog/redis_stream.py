"""Prediction log entries -> one Redis Stream per model, exactly once per request_id.

Every entry goes through one Lua script that, atomically, sets a dedupe key
(`<prefix>:seen:<model>:<request_id>`, with a TTL) and XADDs only if the key was new. A batch
is one pipelined round trip (one script call per model). Because the check and the append are
one atomic step, writing the same entry twice (a batch whose reply was lost and which was then
spooled, or a spool segment replayed again after a crash) leaves exactly one stream entry.

With `answered_prefix` set, the same script also sets `<answered_prefix>:<request_id>` (the
model, with `answered_ttl_s`) for each new entry: the proof that this deployment answered
that request id, which `POST /v1/feedback` requires before it takes a label. One more command
per entry inside a call already made; spooled entries get theirs when they are replayed.

Stream fields are flat strings: strings as they are, None as "", anything else as JSON, so
`redis-cli XRANGE predictions:risk - +` is readable; `decode_fields` reverses it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.errors import StreamUnavailable

# KEYS[1] stream, then per entry its dedupe key and, when ARGV[3] > 0, its answered marker.
# ARGV: dedupe ttl, maxlen, marker ttl (0: no markers), model, then per entry: n, n fields.
_APPEND_ONCE = """
local ttl, maxlen, mark_ttl, model = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local step = 1
if mark_ttl > 0 then step = 2 end
local i, added = 5, 0
for k = 2, #KEYS, step do
  local n = tonumber(ARGV[i])
  if redis.call('SET', KEYS[k], '1', 'NX', 'EX', ttl) then
    local fields = {}
    for j = i + 1, i + n do fields[#fields + 1] = ARGV[j] end
    if maxlen == '0' then
      redis.call('XADD', KEYS[1], '*', unpack(fields))
    else
      redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', unpack(fields))
    end
    if mark_ttl > 0 then redis.call('SET', KEYS[k + 1], model, 'EX', mark_ttl) end
    added = added + 1
  end
  i = i + n + 1
end
return added
"""

#: Fields whose values are JSON in the stream (the rest are plain strings or numbers).
_JSON_FIELDS = frozenset({"output", "payload"})
_NUMBER_FIELDS = frozenset({"latency_ms", "ts"})


class StreamWriter:
    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str = "predictions",
        maxlen: int = 1_000_000,
        dedupe_ttl_s: int = 86_400,
        answered_prefix: str | None = None,
        answered_ttl_s: int = 86_400,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.maxlen = maxlen
        self.dedupe_ttl_s = dedupe_ttl_s
        self.answered_prefix = answered_prefix
        self.answered_ttl_s = answered_ttl_s if answered_prefix else 0
        self._script = client.register_script(_APPEND_ONCE)

    def stream(self, model: str) -> str:
        return f"{self.prefix}:{model}"

    def dedupe_key(self, model: str, request_id: str) -> str:
        return f"{self.prefix}:seen:{model}:{request_id}"

    def answered_key(self, request_id: str) -> str:
        return answered_key(self.answered_prefix or "answered", request_id)

    async def ping(self) -> None:
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            raise StreamUnavailable(f"redis unreachable: {exc}") from exc

    async def write(self, entries: Sequence[Mapping[str, Any]]) -> int:
        """Append entries not yet in their stream; returns how many were new."""
        groups: dict[str, list[Mapping[str, Any]]] = {}
        for e in entries:
            groups.setdefault(str(e.get("model") or "unknown"), []).append(e)
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for model, group in groups.items():
                    keys = [self.stream(model)]
                    args: list[Any] = [self.dedupe_ttl_s, self.maxlen, self.answered_ttl_s, model]
                    for e in group:
                        rid = str(e["request_id"])
                        keys.append(self.dedupe_key(model, rid))
                        if self.answered_ttl_s:
                            keys.append(self.answered_key(rid))
                        fields = encode_fields(e)
                        args.append(len(fields))
                        args.extend(fields)
                    await self._script(keys=keys, args=args, client=pipe)
                results = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StreamUnavailable(f"prediction log write failed: {exc}") from exc
        return sum(int(r) for r in results)


def answered_key(prefix: str, request_id: str) -> str:
    """The marker that a request id was answered (and logged) by this deployment."""
    return f"{prefix}:{request_id}"


def encode_fields(entry: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in entry.items():
        out.append(key)
        if value is None:
            out.append("")
        elif isinstance(value, str):
            out.append(value)
        else:
            out.append(orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode())
    return out


def decode_fields(fields: Mapping[bytes | str, bytes | str]) -> dict[str, Any]:
    """A stream entry's fields back into an entry dict (the inverse of `encode_fields`)."""
    entry: dict[str, Any] = {}
    for k, v in fields.items():
        key = k.decode() if isinstance(k, bytes) else k
        text = v.decode() if isinstance(v, bytes) else v
        if text == "":
            entry[key] = None
        elif key in _JSON_FIELDS or key in _NUMBER_FIELDS:
            entry[key] = orjson.loads(text)
        else:
            entry[key] = text
    return entry
