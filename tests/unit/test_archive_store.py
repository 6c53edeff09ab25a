"""The archive's pieces without Redis: file names from id ranges, rows that decode back to the
entries Redis gives, atomic writes that leave no temp files, and retention by partition age."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gateway.archive import rows as R
from gateway.archive.aggregates import apply_retention
from gateway.archive.store import AGGREGATES, PREDICTIONS, ArchiveStore
from gateway.errors import ArchiveUnavailable
from gateway.predlog.redis_stream import decode_fields, encode_fields


def test_part_names_round_trip_their_id_range() -> None:
    first, last = (1764547200000, 0), (1764547299999, 12)
    name = R.part_name(first, last)
    assert name == "part-1764547200000-0_1764547299999-12.parquet"
    assert R.part_range(name) == (first, last)
    for other in (
        "daily.parquet",
        ".part-1-0_2-0.parquet.tmp-9",
        "part-x_y.parquet",
        "part-1-0.parquet",
    ):
        assert R.part_range(other) is None, other
    assert R.parse_id(b"1764547200000-7") == (1764547200000, 7)


def test_partition_date_is_the_utc_day_of_the_stream_id() -> None:
    midnight = int(dt.datetime(2026, 12, 1, tzinfo=dt.UTC).timestamp() * 1000)
    assert R.day_of((midnight - 1, 0)) == "2026-11-30"
    assert R.day_of((midnight, 0)) == "2026-12-01"


def test_a_row_keeps_what_redis_gives_back_for_the_entry() -> None:
    entry = {
        "request_id": "r1", "entity_id": "h:ab", "model": "risk", "target": "risk",
        "version": "3", "policy_version": "routes@1", "arm": "champion", "input_hash": "00ff",
        "output": {"score": 0.91, "decision": "deny", "confidence": 0.8},
        "fallback_used": None, "latency_ms": 7.25, "ts": 1764547200.5, "protocol": "v1",
        "payload": {"features": {"f0": 1.5}, "context": {"segment": "eu"}}, "shadow_of": "x",
    }  # fmt: skip
    decoded = decode_fields(dict(zip(*[iter(encode_fields(entry))] * 2, strict=True)))
    table = R.to_table([((5, 1), decoded)])
    (row,) = table.to_pylist()
    assert (row["stream_id"], row["stream_ms"], row["stream_seq"]) == ("5-1", 5, 1)
    assert (row["score"], row["decision"], row["confidence"]) == (0.91, "deny", 0.8)
    assert orjson.loads(row["output"]) == decoded["output"]
    assert orjson.loads(row["payload"]) == decoded["payload"]
    assert orjson.loads(row["extra"]) == {"shadow_of": "x"}
    for key in ("request_id", "version", "arm", "policy_version", "latency_ms", "ts"):
        assert row[key] == decoded[key], key
    assert row["fallback_used"] is None


def test_writes_are_whole_files_and_leftover_temp_files_go(tmp_path: Path) -> None:
    store = ArchiveStore(tmp_path / "a")
    directory = store.partition(PREDICTIONS, "risk", "2026-12-01")
    table = pa.table({"x": [1, 2, 3]})
    path = store.write_table(directory, "part-1-0_3-0.parquet", table)
    assert pq.read_table(path).to_pylist() == table.to_pylist()
    stale = Path(directory) / ".part-4-0_5-0.parquet.tmp-123"  # a crashed run's temp file
    stale.write_bytes(b"half a file")
    assert store.files(directory) == ["part-1-0_3-0.parquet"]
    assert not stale.exists()
    assert store.partitions(PREDICTIONS) == [("risk", dt.date(2026, 12, 1), directory)]


def test_retention_deletes_partitions_whose_day_is_past_the_limit(tmp_path: Path) -> None:
    store = ArchiveStore(tmp_path)
    today = dt.date(2026, 12, 1)
    table = pa.table({"x": [1]})
    for dataset, ages in ((PREDICTIONS, (20, 15, 14, 13, 0)), (AGGREGATES, (31, 30, 29))):
        for age in ages:
            day = (today - dt.timedelta(days=age)).isoformat()
            store.write_table(store.partition(dataset, "risk", day), "f.parquet", table)
    gone = apply_retention(store, today, inputs_days=14, aggregates_days=30)
    ages = {(g["dataset"], (today - dt.date.fromisoformat(g["date"])).days) for g in gone}
    assert ages == {(PREDICTIONS, 20), (PREDICTIONS, 15), (AGGREGATES, 31)}
    left = {(d, (today - day).days) for d in (PREDICTIONS, AGGREGATES)
            for _, day, _ in store.partitions(d)}  # fmt: skip
    assert left == {(PREDICTIONS, 14), (PREDICTIONS, 13), (PREDICTIONS, 0),
                    (AGGREGATES, 30), (AGGREGATES, 29)}  # fmt: skip


def test_an_fsspec_url_without_its_package_is_a_clear_error() -> None:
    with pytest.raises(ArchiveUnavailable, match="nosuchproto"):
        ArchiveStore("nosuchproto://bucket/archive")
