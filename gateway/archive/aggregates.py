"""Daily aggregates of the archive, and retention of both datasets.

One row per (model, date, version, arm): answers, errors (fallback answers: the arm's own
model did not answer, as the canary analysis counts them) and the answers of each fallback
rung, latency quantiles (nearest rank, as gateway.stats: DuckDB's quantile_disc), and the
label accuracy of the labels present when the day was last rebuilt (`labelled`, `correct`,
counted as `labels join` counts them). A day is rebuilt from its part files whenever a run
adds a file to it, and replaced whole, so rebuilding is idempotent.

Retention deletes a date partition once its whole day is older than the dataset's limit:
per-prediction rows (they hold the inputs: input_hash and sampled payloads) after
`inputs_retention_days` (14), aggregates after `aggregates_retention_days` (30).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson
import pyarrow as pa

from gateway.archive.query import ArchiveReader
from gateway.archive.store import AGGREGATES, PREDICTIONS, ArchiveStore
from gateway.predlog.feedback import LabelStore, is_correct

DAILY = "daily.parquet"

SCHEMA = pa.schema(
    [("model", pa.string()), ("date", pa.date32()), ("version", pa.string()), ("arm", pa.string())]
    + [(n, pa.int64()) for n in ("answers", "errors", "fallback_model", "fallback_cache",
                                 "fallback_default")]
    + [(n, pa.float64()) for n in ("p50_ms", "p90_ms", "p99_ms", "max_ms")]
    + [("labelled", pa.int64()), ("correct", pa.int64())]
)  # fmt: skip

_SQL = """
SELECT version, arm,
  count(*) AS answers,
  count(fallback_used) AS errors,
  count(*) FILTER (WHERE fallback_used = 'fallback_model') AS fallback_model,
  count(*) FILTER (WHERE fallback_used = 'cache') AS fallback_cache,
  count(*) FILTER (WHERE fallback_used = 'default') AS fallback_default,
  quantile_disc(latency_ms, 0.5) AS p50_ms,
  quantile_disc(latency_ms, 0.9) AS p90_ms,
  quantile_disc(latency_ms, 0.99) AS p99_ms,
  max(latency_ms) AS max_ms,
  count(l.request_id) AS labelled,
  coalesce(sum(CAST(l.correct AS BIGINT)), 0) AS correct
FROM read_parquet(?, hive_partitioning = false) AS p
LEFT JOIN labels AS l ON p.request_id = l.request_id
GROUP BY version, arm
ORDER BY version, arm
"""


async def rebuild_day(
    reader: ArchiveReader,
    model: str,
    day: dt.date,
    labels: LabelStore | None = None,
    chunk: int = 1000,
) -> int:
    """Recompute one (model, date) aggregate file from its part files; returns its rows."""
    files = reader.files([model], day=day)
    if not files:
        return 0
    con = reader.con
    ids: list[str] = []
    correct: list[bool] = []
    if labels is not None:
        cur = con.execute(
            "SELECT request_id, output FROM read_parquet(?, hive_partitioning = false)", [files]
        )
        while rows := cur.fetchmany(chunk):
            found = await labels.get_many([str(r[0]) for r in rows])
            for (rid, output), label in zip(rows, found, strict=True):
                if label is not None:
                    ids.append(str(rid))
                    correct.append(is_correct(orjson.loads(output) if output else None, label))
    table = pa.table(
        {"request_id": pa.array(ids, pa.string()), "correct": pa.array(correct, pa.bool_())}
    )
    con.register("labels", table)
    try:
        cur = con.execute(_SQL, [files])
        names = [d[0] for d in cur.description]
        found_rows = cur.fetchall()
    finally:
        con.unregister("labels")
    cols: dict[str, list[Any]] = {
        "model": [model] * len(found_rows),
        "date": [day] * len(found_rows),
    }
    for i, name in enumerate(names):
        cols[name] = [r[i] for r in found_rows]
    result = pa.table(cols, schema=SCHEMA)
    reader.store.write_table(
        reader.store.partition(AGGREGATES, model, day.isoformat()), DAILY, result
    )
    return result.num_rows


def apply_retention(
    store: ArchiveStore, today: dt.date, inputs_days: int, aggregates_days: int
) -> list[dict[str, Any]]:
    """Delete the date partitions past their dataset's age; returns what went."""
    gone = []
    for dataset, days in ((PREDICTIONS, inputs_days), (AGGREGATES, aggregates_days)):
        if days <= 0:
            continue  # 0: keep forever
        cutoff = today - dt.timedelta(days=days)
        for model, day, directory in store.partitions(dataset):
            if day < cutoff:
                store.delete_partition(directory)
                gone.append({"dataset": dataset, "model": model, "date": day.isoformat()})
    return gone
