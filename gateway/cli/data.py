"""CLI subcommands over the Redis data: `labels join`, `features load FILE.csv` and
`predlog archive` (the prediction streams as Parquet: gateway/archive, docs/archive.md).

Registered by `gateway.__main__`; imported lazily there, like every other subcommand.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from pathlib import Path

import orjson

from gateway.config import ConfigError, Settings, load_settings
from gateway.errors import SwitchyardError
from gateway.progress import Progress, add_flag


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    labels = sub.add_parser("labels", help="feedback labels: join with the prediction log")
    lsub = labels.add_subparsers(dest="labels_command", required=True, metavar="ACTION")
    join = lsub.add_parser("join", help="accuracy per model version and canary delta (JSON)")
    _common(join)
    join.add_argument("--model", action="append", default=[], help="only these models")
    join.add_argument("--window-s", type=float, default=None, help="only the last N seconds")
    join.add_argument(
        "--source",
        choices=("redis", "archive"),
        default="redis",
        help="read the predictions from the Redis streams or the Parquet archive (DuckDB); "
        "labels come from Redis either way",
    )
    join.add_argument(
        "--archive", default=None, help="archive dir or fsspec URL (--source archive)"
    )
    join.set_defaults(handler=cmd_labels_join)

    predlog = sub.add_parser("predlog", help="the prediction log: archive the streams as Parquet")
    psub = predlog.add_subparsers(dest="predlog_command", required=True, metavar="ACTION")
    arch = psub.add_parser(
        "archive", help="stream entries -> Parquet by model and date, exactly once; retention"
    )
    _common(arch)
    arch.add_argument("--once", action="store_true", help="one run, then exit (the CronJob)")
    arch.add_argument("--out", default=None, help="archive dir or fsspec URL (archive.url/dir)")
    arch.add_argument("--model", action="append", default=[], help="only these models")
    arch.add_argument("--batch-size", type=int, default=None, help="override archive.batch_size")
    arch.add_argument(
        "--retention", action="store_true", help="only apply retention (delete old partitions)"
    )
    arch.add_argument("--no-retention", action="store_true", help="archive, delete nothing")
    add_flag(arch)
    # Tests: stop (hang until killed) once N files are renamed into place, before their XACK.
    arch.add_argument("--hang-after-files", type=int, default=0, help=argparse.SUPPRESS)
    arch.set_defaults(handler=cmd_predlog_archive)

    features = sub.add_parser("features", help="online feature store")
    fsub = features.add_subparsers(dest="features_command", required=True, metavar="ACTION")
    load = fsub.add_parser("load", help="fill features:<set>:<entity> hashes from a CSV")
    _common(load)
    load.add_argument("file", type=Path, help="CSV: an entity column, one column per feature")
    load.add_argument("--set", required=True, dest="feature_set", help="e.g. risk_features:v3")
    load.add_argument("--entity-column", default="entity_id")
    load.set_defaults(handler=cmd_features_load)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=Path("configs/gateway.yaml"))
    p.add_argument("--redis-url", default=None, help="override redis.url")


def _settings(args: argparse.Namespace) -> Settings | None:
    try:
        settings = load_settings(args.config, redis_url=args.redis_url)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    if not settings.redis.url:
        print("error: redis.url is empty; labels and features live in Redis", file=sys.stderr)
        return None
    return settings


def cmd_labels_join(args: argparse.Namespace) -> int:
    from gateway.observability import redis_client
    from gateway.predlog.feedback import LabelStore, join_labels, model_streams

    settings = _settings(args)
    if settings is None:
        return 2

    async def run() -> dict[str, object]:
        client = redis_client(settings)
        assert client is not None
        try:
            prefix = settings.predlog.stream_prefix
            fb = settings.feedback
            labels = LabelStore(client, fb.label_prefix, fb.label_ttl_s)
            if args.source == "archive":
                from gateway.archive.query import ArchiveReader, join_labels_archive
                from gateway.archive.store import ArchiveStore

                reader = ArchiveReader(ArchiveStore(_archive_location(settings, args.archive)))
                try:
                    report = await join_labels_archive(reader, labels, args.model, args.window_s)
                finally:
                    reader.close()
                return report.to_dict()
            streams = [f"{prefix}:{m}" for m in args.model] or await model_streams(client, prefix)
            return (await join_labels(client, labels, streams, args.window_s)).to_dict()
        finally:
            await client.aclose()

    try:
        report = asyncio.run(run())
    except SwitchyardError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def cmd_features_load(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError

    from gateway.features import load_features, read_feature_csv
    from gateway.observability import redis_client

    settings = _settings(args)
    if settings is None:
        return 2

    async def run() -> int:
        client = redis_client(settings)
        assert client is not None
        try:
            rows = read_feature_csv(args.file, args.entity_column)
            return await load_features(client, args.feature_set, rows, settings.features.key_prefix)
        finally:
            await client.aclose()

    try:
        n = asyncio.run(run())
    except (ValueError, OSError, RedisError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"loaded {n} entities into {settings.features.key_prefix}:{args.feature_set}:*")
    return 0


def _archive_location(settings: Settings, out: str | None) -> str:
    return out or settings.archive.url or str(settings.archive.dir)


def cmd_predlog_archive(args: argparse.Namespace) -> int:
    import threading

    import structlog

    from gateway.archive.run import RunOptions, archive_run
    from gateway.archive.store import ArchiveStore
    from gateway.log import configure_logging
    from gateway.observability import redis_client
    from gateway.predlog.feedback import LabelStore

    settings = _settings(args)
    if settings is None:
        return 2
    a = settings.archive
    batch_size = args.batch_size or a.batch_size
    if batch_size < 1:
        print("error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    configure_logging(settings.log.level, settings.log.json)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout: report
    log = structlog.get_logger("gateway.archive")
    progress = Progress.for_stream(flag=args.progress)  # stderr, beside the logs
    options = RunOptions(
        prefix=settings.predlog.stream_prefix,
        models=tuple(args.model),
        group=a.group,
        consumer=a.consumer,
        batch_size=batch_size,
        trim_keep_s=a.trim_keep_s,
        retention=None
        if args.no_retention
        else (a.inputs_retention_days, a.aggregates_retention_days),
        archive=not args.retention,
    )

    def hang(files: int) -> None:
        if args.hang_after_files and files >= args.hang_after_files:
            print(f"hanging after {files} files (--hang-after-files)", file=sys.stderr, flush=True)
            threading.Event().wait()

    async def once() -> dict[str, object]:
        store = ArchiveStore(_archive_location(settings, args.out))
        r = dataclasses.replace(settings.redis, socket_timeout_s=a.socket_timeout_s)
        client = redis_client(dataclasses.replace(settings, redis=r))
        assert client is not None
        try:
            fb = settings.feedback
            labels = (
                LabelStore(client, fb.label_prefix, fb.label_ttl_s) if a.aggregate_labels else None
            )
            return await archive_run(
                client, store, options, labels, after_file=hang, progress=progress
            )
        finally:
            await client.aclose()

    async def forever() -> None:
        while True:
            try:
                report = await once()
                log.info("archive_run_done", rows=report["rows_written"])
            except SwitchyardError as exc:
                log.error("archive_run_failed", error=exc.message)
            await asyncio.sleep(a.interval_s)

    try:
        if not args.once:
            asyncio.run(forever())
            return 0
        report = asyncio.run(once())
    except SwitchyardError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0
