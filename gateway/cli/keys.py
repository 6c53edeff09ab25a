"""`python -m gateway keys create|list|revoke`: manage the API key file (auth.keys_file).

`create` prints the new key alone on the last line of stdout (scripts take `tail -n 1`) and
stores only its SHA-256. The running gateways pick every change up within
`auth.reload_interval_s`: to rotate, create a second key with the same scopes, move the
clients over, then revoke the first. Each change is a read-modify-write under an exclusive
lock (two `create`s at once keep both keys), written atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.security.keys import (
    ID_PATTERN,
    KeyFile,
    KeyFileError,
    KeyRecord,
    hash_key,
    load_key_file,
    new_key,
    parse_key_file,
    parse_scopes,
    write_key_file,
)


def add_keys_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="API keys: create, list, revoke (auth.keys_file)")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    create = ksub.add_parser("create", help="new key; prints it once, on the last line")
    create.add_argument("--scopes", required=True, help="comma-separated: predict,feedback,...")
    create.add_argument("--rate", type=float, default=None, help="requests per second")
    create.add_argument("--burst", type=int, default=None, help="requests at once (default: rate)")
    create.add_argument("--name", default=None, help="key id (default: key-<random>)")
    create.add_argument("--tenant", default=None, help="tenant sharing a rate (auth.tenants)")
    _common(create)
    create.set_defaults(handler=cmd_create)

    ls = ksub.add_parser("list", help="id, scopes, rate, tenant, created")
    _common(ls)
    ls.set_defaults(handler=cmd_list)

    revoke = ksub.add_parser("revoke", help="remove a key; live gateways refuse it within ~1 s")
    revoke.add_argument("key_id")
    _common(revoke)
    revoke.set_defaults(handler=cmd_revoke)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=Path("configs/gateway.yaml"))
    parser.add_argument("--keys-file", type=Path, default=None, help="override auth.keys_file")


def _keys_file(args: argparse.Namespace) -> Path:
    if args.keys_file is not None:
        return Path(args.keys_file)
    from gateway.config import load_settings

    return load_settings(args.config if args.config.exists() else None).auth.keys_file


def _record(
    args: argparse.Namespace, action: str, key_id: str, old: KeyRecord | None, new: KeyRecord | None
) -> None:
    """The audit trail (gateway/audit.py): the key's settings, never the key or its hash."""
    from gateway.audit import AuditLog
    from gateway.config import load_settings

    audit = AuditLog.from_settings(load_settings(args.config if args.config.exists() else None))
    if audit is not None:
        audit.record(
            action, key_id, _public(old), _public(new), detail={"keys_file": str(_keys_file(args))}
        )
        audit.close()


def _public(record: KeyRecord | None) -> dict[str, Any] | None:
    if record is None:
        return None
    return {k: v for k, v in record.to_dict().items() if k != "sha256"}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[KeyFile]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield load_key_file(path)
    finally:
        os.close(fd)  # releases the lock


def cmd_create(args: argparse.Namespace) -> int:
    path = _keys_file(args)
    key = new_key()
    key_id = args.name or f"key-{hash_key(key)[:8]}"
    try:
        if not ID_PATTERN.match(key_id):
            raise KeyFileError(f"--name must match {ID_PATTERN.pattern}")
        record = KeyRecord(
            id=key_id,
            sha256=hash_key(key),
            scopes=parse_scopes(args.scopes, "--scopes"),
            rate=args.rate,
            burst=args.burst,
            tenant=args.tenant,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        with _locked(path) as current:
            if current.get(key_id) is not None:
                raise KeyFileError(f"a key with id {key_id!r} exists; revoke it or pick --name")
            updated = KeyFile((*current.keys, record), current.tenants)
            # Validate exactly as the gateway will before the file changes under it.
            parse_key_file(updated.to_dict(), str(path))
            write_key_file(path, updated)
            _record(args, "key.create", key_id, None, record)  # before the key: it stays last
    except KeyFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"created key {key_id!r} scopes={','.join(sorted(record.scopes))} in {path}")
    print("the key is shown once; only its hash is stored:")
    print(key, flush=True)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    path = _keys_file(args)
    try:
        keys = load_key_file(path)
    except KeyFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{'ID':<24} {'SCOPES':<28} {'RATE':>8} {'TENANT':<12} {'SHA256':<10} CREATED")
    for k in keys.keys:
        rate = "-" if k.rate is None else f"{k.rate:g}"
        print(
            f"{k.id:<24} {','.join(sorted(k.scopes)):<28} {rate:>8} {k.tenant or '-':<12} "
            f"{k.sha256[:8] + '..':<10} {k.created or '-'}"
        )
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    path = _keys_file(args)
    try:
        with _locked(path) as current:
            if current.get(args.key_id) is None:
                print(f"error: no key {args.key_id!r} in {path}", file=sys.stderr)
                return 1
            kept = tuple(k for k in current.keys if k.id != args.key_id)
            write_key_file(path, dataclasses.replace(current, keys=kept))
            _record(args, "key.revoke", args.key_id, current.get(args.key_id), None)
    except KeyFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"revoked {args.key_id!r} in {path}")
    return 0
