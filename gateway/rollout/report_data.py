"""The rollout report's data: prediction-log answers with their labels, per arm, in time buckets,
and the controller's decision records.

Every answer of `<stream_prefix>:<model>` is read (XRANGE in chunks) and placed on the time
axis by its own `ts`, not its stream id, so a replayed spool segment lands where it was served.
Errors and accuracy follow `analysis.summarise`: a fallback answer is an error of its arm and
says nothing about the arm's model, so it is never scored against a label.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.errors import StreamUnavailable
from gateway.predlog.feedback import LabelStore, is_correct
from gateway.predlog.redis_stream import decode_fields

#: Bucket widths the report picks from (seconds), for round tick labels.
_NICE_BUCKETS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400)


@dataclass(frozen=True, slots=True)
class Answer:
    ts: float
    arm: str
    version: str
    latency_ms: float | None
    error: bool  # a fallback answered for the arm
    correct: bool | None  # None: unlabelled (or a fallback's answer)


@dataclass(frozen=True, slots=True)
class Decision:
    ts: float
    action: str
    from_weight: float
    to_weight: float
    applied: bool
    dry_run: bool
    reason: str


@dataclass(frozen=True, slots=True)
class ArmSeries:
    """One arm's figures per bucket (None where the bucket has no data for that figure)."""

    arm: str
    versions: tuple[str, ...]
    count: tuple[int, ...]
    p50_ms: tuple[float | None, ...]
    p99_ms: tuple[float | None, ...]
    error_rate: tuple[float | None, ...]
    accuracy: tuple[float | None, ...]
    share: tuple[float | None, ...]  # of all answers in the bucket, 0-1


@dataclass(frozen=True, slots=True)
class ArmTotals:
    arm: str
    versions: tuple[str, ...]
    count: int
    p50_ms: float | None
    p99_ms: float | None
    error_rate: float | None
    labelled: int
    accuracy: float | None


@dataclass(frozen=True, slots=True)
class ReportData:
    model: str
    bucket_s: float
    starts: tuple[float, ...]  # bucket start times (epoch seconds)
    arms: tuple[ArmSeries, ...]  # champion first, then the others by name
    totals: tuple[ArmTotals, ...]
    decisions: tuple[Decision, ...] = field(default_factory=tuple)

    def accuracy_delta(self, arm: ArmSeries) -> tuple[float | None, ...]:
        """`arm`'s accuracy minus the champion's, per bucket."""
        champ = next((a for a in self.arms if a.arm == "champion"), None)
        if champ is None:
            return tuple(None for _ in self.starts)
        return tuple(
            None if a is None or c is None else a - c
            for a, c in zip(arm.accuracy, champ.accuracy, strict=True)
        )


async def read_answers(
    client: aioredis.Redis, labels: LabelStore, stream: str, chunk: int = 1000
) -> list[Answer]:
    """Every answer of `stream` with its label joined (segments' arms included)."""
    out: list[Answer] = []
    cursor = "-"
    try:
        while True:
            rows = await client.xrange(stream, min=cursor, max="+", count=chunk) or []
            entries = [decode_fields(fields or {}) for _, fields in rows]
            found = await labels.get_many([str(e.get("request_id")) for e in entries])
            for e, label in zip(entries, found, strict=True):
                if e.get("ts") is None or e.get("arm") is None:
                    continue  # not an answer the report can place
                error = bool(e.get("fallback_used"))
                correct = None if error or label is None else is_correct(e.get("output"), label)
                lat = e.get("latency_ms")
                out.append(Answer(float(e["ts"]), str(e["arm"]), str(e.get("version")),
                                  None if lat is None else float(lat), error, correct))  # fmt: skip
            if len(rows) < chunk:
                break
            last = rows[-1][0]
            cursor = "(" + (last.decode() if isinstance(last, bytes) else str(last))
    except (RedisError, OSError) as exc:
        raise StreamUnavailable(f"prediction log read failed: {exc}") from exc
    return out


def read_decisions(path: Path) -> list[Decision]:
    """The controller's records (`<record_dir>/<model>.jsonl`); [] when there is none yet."""
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r: dict[str, Any] = orjson.loads(line)
            reasons = r.get("reasons") or [""]
            out.append(Decision(float(r["ts"]), str(r["action"]), float(r["from_weight"]),
                                float(r["to_weight"]), bool(r.get("applied")),
                                bool(r.get("dry_run")), str(reasons[0])))  # fmt: skip
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{n}: not a decision record: {exc}") from exc
    return sorted(out, key=lambda d: d.ts)


def nice_bucket(span_s: float, target_buckets: int = 40) -> float:
    want = max(span_s, 1.0) / target_buckets
    return float(next((b for b in _NICE_BUCKETS if b >= want), _NICE_BUCKETS[-1]))


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest rank (an observed value), as the controller's p99."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def build(
    model: str,
    answers: Iterable[Answer],
    decisions: Sequence[Decision] = (),
    bucket_s: float | None = None,
    since: float | None = None,
) -> ReportData:
    """Bucket the answers (from `since`, epoch seconds) per arm; keep decisions in range."""
    rows = sorted((a for a in answers if since is None or a.ts >= since), key=lambda a: a.ts)
    if not rows:
        raise ValueError(f"no prediction-log answers for model {model!r}")
    t0, t1 = rows[0].ts, rows[-1].ts
    width = bucket_s or nice_bucket(t1 - t0)
    origin = math.floor(t0 / width) * width
    n = int((t1 - origin) // width) + 1
    starts = tuple(origin + i * width for i in range(n))
    names = sorted({a.arm for a in rows}, key=lambda arm: (arm != "champion", arm))
    cells: dict[str, list[list[Answer]]] = {arm: [[] for _ in range(n)] for arm in names}
    for a in rows:
        cells[a.arm][min(int((a.ts - origin) // width), n - 1)].append(a)
    totals_per_bucket = [sum(len(cells[arm][i]) for arm in names) for i in range(n)]
    series = tuple(_series(arm, cells[arm], totals_per_bucket) for arm in names)
    totals = tuple(_totals(arm, [a for a in rows if a.arm == arm]) for arm in names)
    kept = tuple(d for d in decisions if since is None or d.ts >= since)
    return ReportData(model, width, starts, series, totals, kept)


def _series(arm: str, buckets: list[list[Answer]], totals: list[int]) -> ArmSeries:
    p50, p99, err, acc, share = [], [], [], [], []
    for cell, total in zip(buckets, totals, strict=True):
        lat = [a.latency_ms for a in cell if a.latency_ms is not None]
        p50.append(percentile(lat, 0.50))
        p99.append(percentile(lat, 0.99))
        err.append(sum(a.error for a in cell) / len(cell) if cell else None)
        scored = [a.correct for a in cell if a.correct is not None]
        acc.append(sum(scored) / len(scored) if scored else None)
        share.append(len(cell) / total if total else None)
    versions = tuple(sorted({a.version for cell in buckets for a in cell}))
    return ArmSeries(arm, versions, tuple(len(c) for c in buckets), tuple(p50), tuple(p99),
                     tuple(err), tuple(acc), tuple(share))  # fmt: skip


def _totals(arm: str, rows: list[Answer]) -> ArmTotals:
    lat = [a.latency_ms for a in rows if a.latency_ms is not None]
    scored = [a.correct for a in rows if a.correct is not None]
    return ArmTotals(
        arm=arm,
        versions=tuple(sorted({a.version for a in rows})),
        count=len(rows),
        p50_ms=percentile(lat, 0.50),
        p99_ms=percentile(lat, 0.99),
        error_rate=sum(a.error for a in rows) / len(rows) if rows else None,
        labelled=len(scored),
        accuracy=sum(scored) / len(scored) if scored else None,
    )
