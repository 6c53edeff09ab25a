"""One archiver run, as `predlog archive` and the CronJob do it: archive every stream, rebuild
the aggregates of the days that got files, then apply retention."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from gateway.archive.aggregates import apply_retention, rebuild_day
from gateway.archive.archiver import Archiver
from gateway.archive.query import ArchiveReader
from gateway.archive.store import ArchiveStore
from gateway.predlog.feedback import LabelStore, model_streams
from gateway.progress import QUIET, Progress


@dataclass(frozen=True)
class RunOptions:
    prefix: str = "predictions"
    models: tuple[str, ...] = ()
    group: str = "archiver"
    consumer: str = "archiver"
    batch_size: int = 10_000
    trim_keep_s: float = 86_400.0
    #: (inputs days, aggregates days); None: no retention this run.
    retention: tuple[int, int] | None = (14, 30)
    archive: bool = True


async def archive_run(
    client: aioredis.Redis,
    store: ArchiveStore,
    options: RunOptions,
    labels: LabelStore | None = None,
    wall: Callable[[], float] = time.time,
    after_file: Callable[[int], None] | None = None,
    progress: Progress = QUIET,
) -> dict[str, Any]:
    """Returns a report (JSON-ready): per stream counts, aggregates rebuilt, partitions deleted."""
    o = options
    reports = []
    rebuilt: list[dict[str, Any]] = []
    if o.archive:
        streams: Sequence[str] = [f"{o.prefix}:{m}" for m in o.models] or await model_streams(
            client, o.prefix
        )
        archiver = Archiver(
            client, store, o.prefix, o.group, o.consumer, o.batch_size, o.trim_keep_s, wall,
            after_file, progress,
        )  # fmt: skip
        reports = await archiver.run(streams)
        reader = ArchiveReader(store)
        try:
            touched = sorted({t for r in reports for t in r.touched})
            days = progress.track(touched, "aggregates", "day", note=lambda t: f"{t[0]} {t[1]}")
            for model, day in days:
                rows = await rebuild_day(reader, model, dt.date.fromisoformat(day), labels)
                rebuilt.append({"model": model, "date": day, "rows": rows})
        finally:
            reader.close()
    deleted: list[dict[str, Any]] = []
    if o.retention is not None:
        today = dt.datetime.fromtimestamp(wall(), dt.UTC).date()
        deleted = apply_retention(store, today, *o.retention)
    return {
        "archive": store.url(store.root),
        "streams": [r.to_dict() for r in reports],
        "rows_written": sum(r.written for r in reports),
        "aggregates_rebuilt": rebuilt,
        "deleted": deleted,
    }
