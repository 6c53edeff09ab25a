"""Stream entries as Parquet rows, and the stream-id ranges that name the files.

One row per prediction-log entry, in the entry schema of gateway/service.py (`_record`):
identity and routing as strings, `score`/`decision`/`confidence` pulled out of `output` for
queries, and `output`, `payload` (the sampled, redacted inputs) and any other field (`extra`)
as JSON text, so an entry comes back exactly as `decode_fields` gives it from Redis.
`stream_ms`/`stream_seq` are the stream id: windows are cut on them, as XRANGE cuts them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import pyarrow as pa

StreamId = tuple[int, int]

SCHEMA = pa.schema(
    [
        ("stream_id", pa.string()),
        ("stream_ms", pa.int64()),
        ("stream_seq", pa.int64()),
        ("request_id", pa.string()),
        ("entity_id", pa.string()),
        ("model", pa.string()),
        ("target", pa.string()),
        ("version", pa.string()),
        ("policy_version", pa.string()),
        ("arm", pa.string()),
        ("input_hash", pa.string()),
        ("score", pa.float64()),
        ("decision", pa.string()),
        ("confidence", pa.float64()),
        ("output", pa.string()),
        ("fallback_used", pa.string()),
        ("latency_ms", pa.float64()),
        ("ts", pa.float64()),
        ("protocol", pa.string()),
        ("payload", pa.string()),
        ("extra", pa.string()),
    ]
)
_STRINGS = ("request_id", "entity_id", "model", "target", "version", "policy_version", "arm",
            "input_hash", "fallback_used", "protocol")  # fmt: skip
_KNOWN = frozenset(_STRINGS) | {"output", "payload", "latency_ms", "ts"}


def parse_id(raw: bytes | str) -> StreamId:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


def day_of(sid: StreamId) -> str:
    """The UTC date of a stream id: partitions follow the time Redis took the entry."""
    return dt.datetime.fromtimestamp(sid[0] / 1000, dt.UTC).date().isoformat()


def part_name(first: StreamId, last: StreamId) -> str:
    return f"part-{format_id(first)}_{format_id(last)}.parquet"


def part_range(name: str) -> tuple[StreamId, StreamId] | None:
    """The id range a part file's name covers; None for any other file."""
    if not (name.startswith("part-") and name.endswith(".parquet")):
        return None
    first, sep, last = name[len("part-") : -len(".parquet")].partition("_")
    try:
        return (parse_id(first), parse_id(last)) if sep else None
    except ValueError:
        return None


def to_table(rows: Sequence[tuple[StreamId, Mapping[str, Any]]]) -> pa.Table:
    """(stream id, decoded entry) pairs, in id order, as one Arrow table of SCHEMA."""
    cols: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
    for sid, e in rows:
        cols["stream_id"].append(format_id(sid))
        cols["stream_ms"].append(sid[0])
        cols["stream_seq"].append(sid[1])
        for key in _STRINGS:
            v = e.get(key)
            cols[key].append(None if v is None else str(v))
        output = e.get("output")
        out = output if isinstance(output, Mapping) else {}
        cols["score"].append(_number(out.get("score")))
        d = out.get("decision")
        cols["decision"].append(None if d is None else str(d))
        cols["confidence"].append(_number(out.get("confidence")))
        cols["output"].append(None if output is None else _json(output))
        cols["latency_ms"].append(_number(e.get("latency_ms")))
        cols["ts"].append(_number(e.get("ts")))
        payload = e.get("payload")
        cols["payload"].append(None if payload is None else _json(payload))
        extra = {k: v for k, v in e.items() if k not in _KNOWN}
        cols["extra"].append(_json(extra) if extra else None)
    return pa.table(cols, schema=SCHEMA)


def _number(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _json(v: Any) -> str:
    return orjson.dumps(v, option=orjson.OPT_SERIALIZE_NUMPY).decode()
