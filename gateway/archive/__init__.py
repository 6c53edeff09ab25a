"""The prediction archive: the Redis prediction streams kept as Parquet for 14 days.

    archiver.py    streams -> part files, exactly once (consumer group, id-range names)
    store.py       a local directory or an fsspec URL; atomic, durable writes
    rows.py        the row schema; stream ids and file names
    aggregates.py  daily per (model, version, arm) aggregates; retention
    query.py       DuckDB over the archive: the label join and canary stats, as on Redis
    run.py         one archiver run: archive, rebuild touched days, apply retention

`python -m gateway predlog archive` runs it (gateway/cli/data.py); docs/archive.md says what
is stored, for how long, and how to query it.
"""
