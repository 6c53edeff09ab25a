"""`python -m gateway audit tail [-n N] [--follow]`: print the audit trail (gateway/audit.py).

Reads the Redis stream `audit.stream`; without Redis (`redis.url` empty), while it is down, or
with `--local`, the local file `audit.local_file` that records fall back to (records written
there during an outage stay there: they are not copied into the stream later). One line per
change: when, who (via what), the action, its target, old -> new; `--json` prints the records.
Exit codes: 0 printed (even nothing), 1 neither the stream nor the file could be read.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: How long one blocking read of --follow waits before it checks again (Ctrl-C ends it).
FOLLOW_BLOCK_MS = 1000


def add_audit_parser(sub: Any) -> None:
    audit = sub.add_parser("audit", help="the audit trail of route, weight and key changes")
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    tail = asub.add_parser("tail", help="the newest records, oldest first; --follow for more")
    tail.add_argument("-n", type=int, default=20, help="records to print (default 20)")
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing new records")
    tail.add_argument("--json", action="store_true", help="one JSON record per line")
    tail.add_argument(
        "--local", action="store_true", help="read audit.local_file (kept while Redis was down)"
    )
    tail.add_argument("--config", type=Path, default=Path("configs/gateway.yaml"))
    tail.add_argument("--redis-url", default=None, help="override redis.url")
    tail.set_defaults(handler=cmd_tail)


def cmd_tail(args: argparse.Namespace) -> int:
    import orjson
    from redis.exceptions import RedisError

    from gateway.audit import AuditRecord, describe, read_local
    from gateway.config import ConfigError, load_settings
    from gateway.redis_conn import sync_client

    try:
        settings = load_settings(
            args.config if args.config.exists() else None, redis_url=args.redis_url
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    a, r = settings.audit, settings.redis

    def show(rec: dict[str, Any]) -> None:
        print(orjson.dumps(rec).decode() if args.json else describe(rec), flush=True)

    if r.url and not args.local:
        client: Any = sync_client(  # redis-py's stubs type stream replies loosely
            r, socket_connect_timeout=r.connect_timeout_s, socket_timeout=None
        )
        try:
            # One more than shown: --follow goes on after the newest record even with -n 0
            # ("$" would miss one written between this read and the first XREAD).
            entries = list(reversed(client.xrevrange(a.stream, count=max(args.n, 0) + 1)))
            last = entries[-1][0] if entries else b"0-0"
            for _, fields in entries[-args.n :] if args.n > 0 else []:
                show(AuditRecord.from_stream(fields).to_dict())
            if args.follow:
                print(f"following {a.stream} (Ctrl-C ends)", file=sys.stderr, flush=True)
            while args.follow:
                for _, batch in client.xread({a.stream: last}, block=FOLLOW_BLOCK_MS) or []:
                    for entry_id, fields in batch:
                        last = entry_id
                        show(AuditRecord.from_stream(fields).to_dict())
            return 0
        except (RedisError, OSError) as exc:
            print(f"note: Redis unavailable ({exc}); reading {a.local_file}", file=sys.stderr)
        finally:
            client.close()
    try:
        records = read_local(a.local_file)
    except OSError as exc:
        print(f"error: {a.local_file}: {exc}", file=sys.stderr)
        return 1
    for rec in records[-args.n :] if args.n > 0 else []:
        show(rec)
    if args.follow:
        _follow_file(a.local_file, len(records), show, lambda: time.sleep(0.5))
    return 0


def _follow_file(
    path: Path, seen: int, show: Callable[[dict[str, Any]], None], wait: Callable[[], None]
) -> None:
    from gateway.audit import read_local

    while True:  # until Ctrl-C (main() turns it into exit 130)
        wait()
        records = read_local(path)
        for rec in records[seen:]:
            show(rec)
        seen = len(records)
