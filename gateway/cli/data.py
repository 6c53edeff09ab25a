"""CLI subcommands over the Redis data: `labels join` and `features load FILE.csv`.

Registered by `gateway.__main__`; imported lazily there, like every other subcommand.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import orjson

from gateway.config import ConfigError, Settings, load_settings
from gateway.errors import SwitchyardError


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    labels = sub.add_parser("labels", help="feedback labels: join with the prediction log")
    lsub = labels.add_subparsers(dest="labels_command", required=True, metavar="ACTION")
    join = lsub.add_parser("join", help="accuracy per model version and canary delta (JSON)")
    _common(join)
    join.add_argument("--model", action="append", default=[], help="only these models")
    join.add_argument("--window-s", type=float, default=None, help="only the last N seconds")
    join.set_defaults(handler=cmd_labels_join)

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
            streams = [f"{prefix}:{m}" for m in args.model] or await model_streams(client, prefix)
            fb = settings.feedback
            labels = LabelStore(client, fb.label_prefix, fb.label_ttl_s)
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
