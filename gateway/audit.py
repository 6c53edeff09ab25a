"""Who changed what, and when: every route, weight and key change, with the old and new value.

A change is recorded three ways so none goes unrecorded:
- the log, always (structlog event `audit`);
- the Redis stream `audit.stream` (XADD MAXLEN ~ `audit.maxlen`), which `python -m gateway
  audit tail` and the status page read;
- when there is no Redis, or the write fails, the JSON lines file `audit.local_file` instead
  (and a warning saying so), so an outage never loses a record silently.

The writers are `routes set-weight` and `keys create|revoke` (who: the OS user) and the
rollout controller (who: the OS user it runs as, `via` the controller). There is no mutating
admin API; one would pass ``who="key:<id>"``. Recording is synchronous (one XADD, bounded by
the client's timeouts): every caller is a one-shot CLI or the controller's loop, which edits
its file synchronously too.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import redis
import structlog
from redis.exceptions import RedisError

from gateway.config import AuditSettings, Settings

log = structlog.get_logger("gateway.audit")


def os_user() -> str:
    """``user:<login>`` of the process (``uid:<n>`` when the uid has no name)."""
    try:
        return f"user:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


@dataclass(frozen=True)
class AuditRecord:
    at: str  # ISO 8601, UTC
    who: str  # "user:<login>" or "key:<id>"
    via: str  # "cli", "rollout-controller", ...
    action: str  # "route.set_weight", "key.create", "key.revoke"
    target: str
    old: Any
    new: Any
    host: str = ""
    detail: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def stream_fields(self) -> dict[str, str]:
        """Stream fields are strings: values JSON-encoded, so None and numbers round-trip."""
        return {k: orjson.dumps(v).decode() for k, v in self.to_dict().items()}

    @classmethod
    def from_stream(cls, fields: Mapping[bytes | str, bytes | str]) -> AuditRecord:
        def text(v: bytes | str) -> str:
            return v.decode() if isinstance(v, bytes) else v

        data = {text(k): orjson.loads(text(v)) for k, v in fields.items()}
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


class AuditLog:
    """Records changes; ``client`` None: the log and the local file only."""

    def __init__(
        self,
        settings: AuditSettings,
        client: redis.Redis | None,
        via: str = "cli",
        who: str | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.client: Any = client  # redis-py's stubs type stream replies loosely
        self.via = via
        self.who = who or os_user()
        self.wall = wall

    @classmethod
    def from_settings(cls, settings: Settings, via: str = "cli") -> AuditLog | None:
        """None when `audit.enabled` is off; no client when `redis.url` is empty."""
        if not settings.audit.enabled:
            return None
        from gateway.redis_conn import sync_client

        r = settings.redis
        client = (
            sync_client(
                r, socket_connect_timeout=r.connect_timeout_s, socket_timeout=r.socket_timeout_s
            )
            if r.url
            else None
        )
        return cls(settings.audit, client, via=via)

    def record(
        self,
        action: str,
        target: str,
        old: Any,
        new: Any,
        who: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> AuditRecord:
        rec = AuditRecord(
            at=datetime.fromtimestamp(self.wall(), UTC).isoformat(timespec="milliseconds"),
            who=who or self.who,
            via=self.via,
            action=action,
            target=target,
            old=old,
            new=new,
            host=socket.gethostname(),
            detail=dict(detail or {}),
        )
        log.info("audit", **rec.to_dict())
        if self.client is not None:
            try:
                self.client.xadd(
                    self.settings.stream,
                    rec.stream_fields(),
                    maxlen=self.settings.maxlen or None,
                    approximate=True,
                )
                return rec
            except (RedisError, OSError) as exc:
                log.warning(
                    "audit_redis_unavailable",
                    error=repr(exc),
                    kept_in=str(self.settings.local_file),
                )
        self._append_local(rec)
        return rec

    def _append_local(self, rec: AuditRecord) -> None:
        path = self.settings.local_file
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("ab") as fh:  # one write per line: concurrent appends stay whole
                fh.write(orjson.dumps(rec.to_dict()) + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:  # the log line above is then the only copy: say so loudly
            log.error("audit_local_write_failed", path=str(path), error=repr(exc))

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` records, newest first: the stream, else the local file."""
        if self.client is not None:
            entries = self.client.xrevrange(self.settings.stream, count=limit)
            return [AuditRecord.from_stream(f).to_dict() for _, f in entries]
        return list(reversed(read_local(self.settings.local_file, 64 * 1024)[-limit:]))

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def read_local(path: Path, max_bytes: int | None = None) -> list[dict[str, Any]]:
    """The whole records of the local file (its last ``max_bytes``), oldest first; a torn
    line (a partial write, or cut by ``max_bytes``) is skipped."""
    if not path.exists():
        return []
    with path.open("rb") as fh:
        if max_bytes is not None:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - max_bytes))
        return list(_parse_lines(fh.read().splitlines()))


class AuditFeed:
    """The status page's audit source (`gateway.api.status.AUDIT`): the stream's newest
    records, re-read every ``interval_s`` by a task of the app (the page's view is sync and
    must not wait on Redis); without Redis, the local file's tail on each call."""

    def __init__(self, settings: Settings, interval_s: float = 2.0, keep: int = 50) -> None:
        from gateway.redis_conn import async_client

        r = settings.redis
        self.settings = settings.audit
        self.interval_s = interval_s
        self.keep = keep
        self.client: Any = (
            async_client(
                r, socket_connect_timeout=r.connect_timeout_s, socket_timeout=r.socket_timeout_s
            )
            if r.url
            else None
        )
        self._recent: list[dict[str, Any]] = []

    def recent(self, limit: int) -> list[dict[str, Any]]:
        if self.client is None:
            tail = read_local(self.settings.local_file, 64 * 1024)[-limit:]
            return [_flat(r) for r in reversed(tail)]
        return self._recent[:limit]

    async def refresh(self) -> None:
        try:
            entries = await self.client.xrevrange(self.settings.stream, count=self.keep)
        except (RedisError, OSError) as exc:  # keep showing the last good read
            log.debug("audit_feed_unavailable", error=repr(exc))
            return
        self._recent = [_flat(AuditRecord.from_stream(f).to_dict()) for _, f in entries]

    async def ctx(self, _: object) -> AsyncIterator[None]:
        """aiohttp cleanup_ctx: the refresh task runs while the app does."""
        task = None
        if self.client is not None:

            async def loop() -> None:
                while True:
                    await self.refresh()
                    await asyncio.sleep(self.interval_s)

            task = asyncio.create_task(loop())
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.client.aclose()


def _flat(rec: dict[str, Any]) -> dict[str, Any]:
    """One table row: old and new as compact JSON, detail folded in."""
    out = {k: v for k, v in rec.items() if k not in ("detail", "host")}
    for k in ("old", "new"):
        out[k] = orjson.dumps(rec.get(k)).decode()
    return out


def _parse_lines(lines: list[bytes]) -> Iterator[dict[str, Any]]:
    for line in lines:
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(value, dict):
            yield value


def describe(rec: Mapping[str, Any]) -> str:
    """One line for humans: when, who (via), what, target, old -> new."""
    old, new = (orjson.dumps(rec.get(k)).decode() for k in ("old", "new"))
    return (
        f"{rec.get('at', '?')}  {rec.get('who', '?')} ({rec.get('via', '?')})  "
        f"{rec.get('action', '?')}  {rec.get('target', '?')}  {old} -> {new}"
    )
