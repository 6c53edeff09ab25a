"""Prediction log entries -> one Redis Stream per model, exactly once per spooled entry.

Every entry the gateway logs has a position: its spool segment (a name unique to one writer
process) and its line number there. One Lua script per model and batch, atomically, checks each
entry against the segment's high-water mark and XADDs only the entries past it:

    {<stream>}:hw   hash   <segment> -> highest line number already in <stream>

A segment's entries reach the script in line order (the writer stops the fast path of a segment
at its first failure and replays it whole), so "line <= mark" means "already written": a batch
whose reply was lost and was then replayed, or a replay cut short by a crash and run again,
leaves exactly one stream entry per line. The marks cost one hash field per live segment
(seconds of traffic), not one key per request id for a day: `forget` drops a segment's field
once the segment is deleted. The mark hash is tagged with the stream's name, so both keys of
the script share one Redis Cluster slot. Entries written without a position (tools, tests)
are appended unconditionally.

With `answered_prefix` set, each new entry also sets `<answered_prefix>:<request_id>` (the
model, with `answered_ttl_s`): the proof that this deployment answered that request id, which
`POST /v1/feedback` requires before it takes a label. On one Redis the script sets it with the
entry; on a cluster (other slots) the writer sets the markers just before the script, in the
same pipeline, so a crash in between leaves a marker whose entry the replay still adds.

Stream fields are flat strings: strings as they are, None as "", anything else as JSON, so
`redis-cli XRANGE predictions:risk - +` is readable; `decode_fields` reverses it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgpack  # type: ignore[import-untyped]
import orjson
from redis.exceptions import RedisError

from gateway.errors import StreamUnavailable
from gateway.redis_kind import Client, is_cluster

#: Where an entry sits in the spool: (segment id, line number from 1); ("", 0): nowhere.
Position = tuple[str, int]
NO_POSITION: Position = ("", 0)

# KEYS[1] stream, KEYS[2] its high-water marks, then (markers in the script) one answered
# marker per entry. ARGV: maxlen, marker ttl, model, and the batch as one MessagePack array of
# [segment, line, [field, value, ...]]: one argument, not ~25 per entry, because packing a
# command of thousands of small arguments dominated the writer's time (redis-py, client side);
# MessagePack, not JSON: cmsgpack.unpack costs the server half what cjson.decode does.
_APPEND_ONCE = """
local maxlen, mark_ttl, model = ARGV[1], ARGV[2], ARGV[3]
local batch = cmsgpack.unpack(ARGV[4])
local marked = #KEYS > 2
local seen, dirty = {}, {}
local added = 0
for k, item in ipairs(batch) do
  local seg, line, fields = item[1], item[2], item[3]
  local new = true
  if seg ~= '' then
    local last = seen[seg]
    if last == nil then last = tonumber(redis.call('HGET', KEYS[2], seg) or '0') end
    if line <= last then
      new = false
      seen[seg] = last
    else
      seen[seg] = line
      dirty[seg] = true
    end
  end
  if new then
    if maxlen == '0' then
      redis.call('XADD', KEYS[1], '*', unpack(fields))
    else
      redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', unpack(fields))
    end
    if marked then redis.call('SET', KEYS[2 + k], model, 'EX', mark_ttl) end
    added = added + 1
  end
end
for seg in pairs(dirty) do redis.call('HSET', KEYS[2], seg, string.format('%d', seen[seg])) end
return added
"""

#: Fields whose values are JSON in the stream (the rest are plain strings or numbers).
_JSON_FIELDS = frozenset({"output", "payload"})
_NUMBER_FIELDS = frozenset({"latency_ms", "ts"})


class StreamWriter:
    def __init__(
        self,
        client: Client,
        prefix: str = "predictions",
        maxlen: int = 1_000_000,
        answered_prefix: str | None = None,
        answered_ttl_s: int = 86_400,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.maxlen = maxlen
        self.answered_prefix = answered_prefix
        self.answered_ttl_s = answered_ttl_s if answered_prefix else 0
        self._cluster = is_cluster(client)

    def stream(self, model: str) -> str:
        return f"{self.prefix}:{model}"

    def marks_key(self, model: str) -> str:
        """The stream's high-water marks, hash-tagged with the stream's name (one slot)."""
        return f"{{{self.stream(model)}}}:hw"

    def answered_key(self, request_id: str) -> str:
        return answered_key(self.answered_prefix or "answered", request_id)

    async def ping(self) -> None:
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            raise StreamUnavailable(f"redis unreachable: {exc}") from exc

    async def write(
        self, entries: Sequence[Mapping[str, Any]], positions: Sequence[Position] | None = None
    ) -> int:
        """Append the entries past their segment's mark; returns how many were new."""
        groups: dict[str, list[tuple[Mapping[str, Any], Position]]] = {}
        for n, e in enumerate(entries):
            pos = positions[n] if positions is not None else NO_POSITION
            groups.setdefault(str(e.get("model") or "unknown"), []).append((e, pos))
        markers_in_script = bool(self.answered_ttl_s) and not self._cluster
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                scripts: list[int] = []  # where the script replies are among the replies
                queued = 0
                for model, group in groups.items():
                    keys = [self.stream(model), self.marks_key(model)]
                    for e, _ in group:
                        rid = str(e["request_id"])
                        if markers_in_script:
                            keys.append(self.answered_key(rid))
                        elif self.answered_ttl_s:  # a cluster: other slots, set just before
                            pipe.set(self.answered_key(rid), model, ex=self.answered_ttl_s)
                            queued += 1
                    batch = msgpack.packb(
                        [[seg, line, encode_fields(e)] for e, (seg, line) in group]
                    )
                    # EVAL, not EVALSHA: a cluster pipeline cannot load a missing script.
                    pipe.eval(
                        _APPEND_ONCE,
                        len(keys),
                        *keys,
                        self.maxlen,
                        self.answered_ttl_s,
                        model,
                        batch,
                    )
                    scripts.append(queued)
                    queued += 1
                results = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StreamUnavailable(f"prediction log write failed: {exc}") from exc
        return sum(int(results[i]) for i in scripts)

    async def marks(self, segment: str, models: Iterable[str]) -> dict[str, int]:
        """The segment's high-water mark in each model's stream (0: none)."""
        models = list(models)
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for model in models:
                    pipe.hget(self.marks_key(model), segment)
                raw = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StreamUnavailable(f"prediction log mark lookup failed: {exc}") from exc
        return {m: int(v or 0) for m, v in zip(models, raw, strict=True)}

    async def forget(self, segment: str, models: Iterable[str]) -> None:
        """Drop a deleted segment's marks (nothing can replay it any more)."""
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for model in models:
                    pipe.hdel(self.marks_key(model), segment)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StreamUnavailable(f"prediction log mark cleanup failed: {exc}") from exc


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
