"""Reading the archive with DuckDB: the label join and the canary stats, as on Redis.

`join_labels_archive` and `gather_stats_archive` are the archive twins of
`predlog.feedback.join_labels` and `rollout.analysis.gather_stats`: the same window (cut on the
stream id, as XRANGE cuts it), the same label lookups (`label:<request_id>` in Redis: labels
live there, 30 days), the same counting (`is_correct`, `summarise`), so on the same data they
give the same numbers. DuckDB reads only the date partitions the window reaches, and only the
columns the computation needs.
"""

from __future__ import annotations

import datetime as dt
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import duckdb
import orjson

from gateway.archive.store import PREDICTIONS, ArchiveStore
from gateway.predlog.feedback import (
    JoinReport,
    LabelStore,
    count_labelled,
    join_report,
)
from gateway.rollout.analysis import CanaryStats, summarise

#: What the join and the analysis read of an entry.
COLUMNS = ("request_id", "model", "version", "arm", "policy_version", "output",
           "fallback_used", "latency_ms")  # fmt: skip


class ArchiveReader:
    def __init__(self, store: ArchiveStore) -> None:
        self.store = store
        # Spills go to the temp dir (the pod's /tmp), not the working directory (read-only).
        self.con = duckdb.connect(config={"temp_directory": tempfile.gettempdir()})
        if not store.local:
            self.con.register_filesystem(store.fs)

    def close(self) -> None:
        self.con.close()

    def files(
        self, models: Sequence[str] | None = None, start_ms: int | None = None,
        dataset: str = PREDICTIONS, day: dt.date | None = None,
    ) -> list[str]:  # fmt: skip
        """Part files of the partitions a window can reach (by model and date)."""
        first = None if start_ms is None else _day(start_ms)
        out = []
        for model, d, directory in self.store.partitions(dataset):
            if models and model not in models:
                continue
            if (first is not None and d < first) or (day is not None and d != day):
                continue
            out += [
                self.store.url(f"{directory}/{name}")
                for name in self.store.files(directory)
                if name.endswith(".parquet")
            ]
        return out

    def entries(
        self,
        models: Sequence[str] | None = None,
        start_ms: int | None = None,
        stop_ms: int | None = None,
        chunk: int = 10_000,
    ) -> Iterator[list[dict[str, Any]]]:
        """Entries in stream-id order per model, as `decode_fields` gives them, in chunks."""
        files = self.files(models, start_ms)
        if not files:
            return
        cur = self.con.execute(
            f"SELECT {', '.join(COLUMNS)} FROM read_parquet(?, hive_partitioning = false) "
            "WHERE stream_ms >= ? AND stream_ms <= ? ORDER BY model, stream_ms, stream_seq",
            [files, start_ms if start_ms is not None else 0,
             stop_ms if stop_ms is not None else 2**62],
        )  # fmt: skip
        while rows := cur.fetchmany(chunk):
            yield [_entry(r) for r in rows]


def _entry(row: tuple[Any, ...]) -> dict[str, Any]:
    e = dict(zip(COLUMNS, row, strict=True))
    if e["output"] is not None:
        e["output"] = orjson.loads(e["output"])
    return e


def _day(ms: int) -> dt.date:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).date()


async def join_labels_archive(
    reader: ArchiveReader,
    labels: LabelStore,
    models: Sequence[str] | None = None,
    window_s: float | None = None,
    wall: Callable[[], float] = time.time,
    chunk: int = 1000,
) -> JoinReport:
    """`join_labels` over the archive: accuracy per (model, version, arm)."""
    start = None if window_s is None else int((wall() - window_s) * 1000)
    counts: dict[tuple[str, str, str], list[int]] = {}
    seen = 0
    for entries in reader.entries(models, start, chunk=chunk):
        seen += len(entries)
        await count_labelled(entries, labels, counts)
    return join_report(counts, seen)


async def gather_stats_archive(
    reader: ArchiveReader,
    labels: LabelStore,
    model: str,
    champion_arm: str,
    challenger_arm: str,
    policy_version: str,
    window_s: float,
    wall: Callable[[], float] = time.time,
    chunk: int = 1000,
) -> CanaryStats:
    """`gather_stats` over the archive: both arms of one model's canary in the window."""
    end = wall()
    start = end - window_s
    kept: list[dict[str, Any]] = []
    ignored = 0
    for entries in reader.entries([model], int(start * 1000), int(end * 1000), chunk):
        for e in entries:
            if e.get("policy_version") == policy_version:
                kept.append(e)
            else:
                ignored += 1
    found: list[Any] = []
    for i in range(0, len(kept), chunk):
        found += await labels.get_many([str(e.get("request_id")) for e in kept[i : i + chunk]])
    champ, chall = summarise(kept, found, champion_arm, challenger_arm)
    return CanaryStats(champ, chall, start, end, policy_version, ignored)
