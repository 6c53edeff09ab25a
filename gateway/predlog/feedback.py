"""Label feedback: store labels by request_id, join them with the prediction log.

`POST /v1/feedback` puts `label:<request_id>` (with a TTL), write-once: one Lua script checks
that the request id was answered (the prediction log's `answered:<request_id>` marker, see
redis_stream) and sets the label only if none is there, else returns the one that is. On a
Redis Cluster the marker lives in another slot, so it is checked just before the script (a
marker is never deleted, only expires, so the split check answers the same). The
same label again is idempotent; a different one is a conflict, so nobody can rewrite ground
truth after the fact. The stored value records who wrote it:
`{"label": ..., "by": <key id or "anonymous">, "ts": <unix s>}`. The join reads each model's stream
over a window, looks the labels up, and counts, per (model, version, arm), how many answers
were right: a string label is compared with the answer's `decision`, a numeric or boolean one
with `score >= 0.5`. The accuracy delta of every challenger arm against the champion is the
input of the rollout controller (`canary_accuracy_delta`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from redis.exceptions import RedisError

from gateway.errors import FeedbackUnavailable, LabelConflict, UnknownRequestId
from gateway.predlog.redis_stream import answered_key, decode_fields
from gateway.redis_kind import Client, is_cluster

Label = str | int | float | bool

# KEYS[1] label, KEYS[2] answered marker (absent: no check). ARGV: value, ttl.
# Returns {0}: unknown request id, {1}: stored, {2, existing value}.
_PUT_ONCE = """
if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 0 then return {0} end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return {1} end
return {2, redis.call('GET', KEYS[1])}
"""


class LabelStore:
    """``answered_prefix`` set: only request ids with an answered marker take a label."""

    def __init__(
        self,
        client: Client,
        prefix: str = "label",
        ttl_s: int = 30 * 86_400,
        answered_prefix: str | None = None,
        wall: Callable[[], float] = time.time,
    ):
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.answered_prefix = answered_prefix
        self.wall = wall
        self._put_once = client.register_script(_PUT_ONCE)

    def key(self, request_id: str) -> str:
        return f"{self.prefix}:{request_id}"

    async def put(self, request_id: str, label: Label, by: str = "anonymous") -> bool:
        """Store the label once; True if stored now, False if the same label was there.
        Raises UnknownRequestId (404) or LabelConflict (409)."""
        keys = [self.key(request_id)]
        marker = answered_key(self.answered_prefix, request_id) if self.answered_prefix else None
        value = orjson.dumps({"label": label, "by": by, "ts": round(self.wall(), 3)})
        try:
            if marker is not None and is_cluster(self.client):  # another slot: check first
                if await self.client.exists(marker):
                    reply = await self._put_once(keys=keys, args=[value, self.ttl_s])
                else:
                    reply = [0]
            else:
                if marker is not None:
                    keys.append(marker)
                reply = await self._put_once(keys=keys, args=[value, self.ttl_s])
        except (RedisError, OSError) as exc:
            raise FeedbackUnavailable(f"label store unreachable: {exc}") from exc
        if reply[0] == 0:
            raise UnknownRequestId(
                f"no answer with request_id {request_id!r} is known here (labels are taken "
                "for answered requests only, once their log entry reached Redis)"
            )
        if reply[0] == 1:
            return True
        existing = decode_label(reply[1])
        if not same_label(existing, label):
            raise LabelConflict(
                f"request_id {request_id!r} already has a different label",
                details={"label": existing},
            )
        return False

    async def get_many(self, request_ids: list[str]) -> list[Label | None]:
        if not request_ids:
            return []
        try:
            keys = [self.key(r) for r in request_ids]
            if is_cluster(self.client):  # keys of many slots: one MGET per slot
                raw = await self.client.mget_nonatomic(keys)
            else:
                raw = await self.client.mget(keys)
        except (RedisError, OSError) as exc:
            raise FeedbackUnavailable(f"label store unreachable: {exc}") from exc
        return [None if v is None else decode_label(v) for v in raw]


def decode_label(raw: bytes | str) -> Label:
    """A stored label: ``{"label", "by", "ts"}``, or a bare JSON label (older writers)."""
    value = orjson.loads(raw)
    if isinstance(value, dict) and "label" in value:
        return value["label"]
    return value


def same_label(a: Label, b: Label) -> bool:
    """Equal as labels: True is not 1 (a boolean and a number are different labels)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return float(a) == float(b)


def is_correct(output: Mapping[str, Any] | None, label: Label) -> bool:
    output = output or {}
    if isinstance(label, str):
        return str(output.get("decision")) == label
    score = output.get("score")
    return score is not None and (float(score) >= 0.5) == bool(label)


@dataclass(frozen=True, slots=True)
class ArmAccuracy:
    model: str
    version: str
    arm: str
    labelled: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.labelled if self.labelled else 0.0


@dataclass(frozen=True, slots=True)
class JoinReport:
    arms: tuple[ArmAccuracy, ...]
    entries: int

    def deltas(self) -> dict[tuple[str, str], float]:
        """(model, challenger version) -> challenger accuracy - champion accuracy."""
        out = {}
        for champ in (a for a in self.arms if a.arm == "champion" and a.labelled):
            for a in self.arms:
                if a.model == champ.model and a.arm != "champion" and a.labelled:
                    out[(a.model, a.version)] = a.accuracy - champ.accuracy
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "entries": self.entries,
            "arms": [
                {"model": a.model, "version": a.version, "arm": a.arm, "labelled": a.labelled,
                 "correct": a.correct, "accuracy": round(a.accuracy, 6)}
                for a in self.arms
            ],
            "canary_accuracy_delta": [
                {"model": m, "version": v, "delta": round(d, 6)}
                for (m, v), d in sorted(self.deltas().items())
            ],
        }  # fmt: skip


async def join_labels(
    client: Client,
    labels: LabelStore,
    streams: Iterable[str],
    window_s: float | None = None,
    wall: Callable[[], float] = time.time,
    chunk: int = 1000,
) -> JoinReport:
    """Accuracy per (model, version, arm) over the last `window_s` of each stream (all if None)."""
    counts: dict[tuple[str, str, str], list[int]] = {}
    seen = 0
    start = "-" if window_s is None else str(int((wall() - window_s) * 1000))
    try:
        for stream in streams:
            cursor = start
            while True:
                rows = await client.xrange(stream, min=cursor, max="+", count=chunk)
                if not rows:
                    break
                entries = [decode_fields(fields or {}) for _, fields in rows]
                seen += len(entries)
                await count_labelled(entries, labels, counts)
                last = rows[-1][0]
                cursor = "(" + (last.decode() if isinstance(last, bytes) else str(last))
                if len(rows) < chunk:
                    break
    except (RedisError, OSError) as exc:
        raise FeedbackUnavailable(f"label join failed: {exc}") from exc
    return join_report(counts, seen)


async def count_labelled(
    entries: list[dict[str, Any]], labels: LabelStore, counts: dict[tuple[str, str, str], list[int]]
) -> None:
    """Add one chunk of decoded entries to ``counts``: (model, version, arm) -> [labelled,
    correct]. Shared by the Redis join and the archive's (the same numbers from either)."""
    found = await labels.get_many([str(e.get("request_id")) for e in entries])
    for e, label in zip(entries, found, strict=True):
        if label is None:
            continue
        key = (str(e.get("model")), str(e.get("version")), str(e.get("arm")))
        c = counts.setdefault(key, [0, 0])
        c[0] += 1
        c[1] += is_correct(e.get("output"), label)


def join_report(counts: dict[tuple[str, str, str], list[int]], seen: int) -> JoinReport:
    arms = tuple(ArmAccuracy(m, v, a, n, ok) for (m, v, a), (n, ok) in sorted(counts.items()))
    return JoinReport(arms, seen)


async def model_streams(client: Client, prefix: str) -> list[str]:
    """The prediction streams present (one per model), excluding dedupe keys."""
    out = []
    try:
        async for key in client.scan_iter(match=f"{prefix}:*", _type="stream"):
            out.append(key.decode() if isinstance(key, bytes) else key)
    except (RedisError, OSError) as exc:
        raise FeedbackUnavailable(f"cannot list streams: {exc}") from exc
    return sorted(out)
