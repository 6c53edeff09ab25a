"""The archiver: prediction streams -> Parquet files, exactly once, through a consumer group.

Per stream (`<prefix>:<model>`), one batch at a time:

    XREADGROUP (our pending list first, then new entries) -> split by UTC date of the id
      -> rows already in a part file? (its name's id range covers them) skip them
      -> the rest: temp file -> fsync -> rename part-<first>_<last>.parquet -> fsync dir
      -> XACK the whole batch

A crash anywhere before the XACK leaves the batch in the group's pending list; the next run
reads it again (pending first) and finds the file under its name, so it only acknowledges,
or it writes the same name again. Nothing is ever written under a second name: a row is
written only if no part file's range holds its id, and a range holds every entry of the
stream between its ends (a batch is a run of consecutive delivered entries; those of the
range not in the file were acknowledged earlier, after their own file).

Trimming: after a stream is drained, `XTRIM MINID ~` removes what is archived and acked and
older than `trim_keep_s` (the label join and the rollout window still read the stream), never
at or above the oldest entry pending in any group. It runs alongside the writer's
`XADD MAXLEN ~`: both only remove, MAXLEN stays the memory cap. If MAXLEN removes entries
before the archiver read them they are gone; the run counts them (`trimmed_unread`, from the
stream's and the group's entry counters).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError, ResponseError

from gateway.archive import rows as R
from gateway.archive.store import PREDICTIONS, ArchiveStore
from gateway.errors import StreamUnavailable
from gateway.predlog.redis_stream import decode_fields
from gateway.progress import QUIET, Progress, Task

log = structlog.get_logger(__name__)

Batch = list[tuple[R.StreamId, Mapping[bytes | str, bytes | str] | None]]


@dataclass
class StreamReport:
    stream: str
    #: Entries read (pending and new), rows written, rows found already archived.
    read: int = 0
    written: int = 0
    already: int = 0
    #: Pending entries whose data Redis no longer has (trimmed while pending): acked, lost.
    lost: int = 0
    files: list[str] = field(default_factory=list)
    #: Entries XTRIM MINID removed after the run.
    trimmed: int = 0
    #: Entries MAXLEN removed before this group read them (the archiver fell behind, or they
    #: were trimmed before the group existed): never archived.
    trimmed_unread: int = 0
    #: (model, date) partitions that got a file this run: their aggregates are rebuilt.
    touched: set[tuple[str, str]] = field(default_factory=set)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stream": self.stream, "read": self.read, "written": self.written,
            "already_archived": self.already, "lost": self.lost, "files": len(self.files),
            "trimmed": self.trimmed, "trimmed_unread": self.trimmed_unread,
        }  # fmt: skip


class Archiver:
    def __init__(
        self,
        client: aioredis.Redis,
        store: ArchiveStore,
        prefix: str = "predictions",
        group: str = "archiver",
        consumer: str = "archiver",
        batch_size: int = 10_000,
        trim_keep_s: float = 86_400.0,
        wall: Callable[[], float] = time.time,
        after_file: Callable[[int], None] | None = None,
        progress: Progress = QUIET,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.client = client
        self.store = store
        self.prefix = prefix
        self.group = group
        self.consumer = consumer
        self.batch_size = batch_size
        self.trim_keep_s = trim_keep_s
        self.wall = wall
        #: Called after each file is renamed into place, before its batch's XACK (tests
        #: stop the process there: the crash window exactly-once must survive).
        self.after_file = after_file
        self.progress = progress
        self.files_written = 0
        #: Per partition directory: the id ranges its part files cover (listed once a run).
        self._ranges: dict[str, list[tuple[R.StreamId, R.StreamId]]] = {}

    def model_of(self, stream: str) -> str:
        return stream[len(self.prefix) + 1 :]

    async def run(self, streams: Sequence[str]) -> list[StreamReport]:
        self._ranges.clear()
        return [await self.archive_stream(s) for s in streams]

    async def archive_stream(self, stream: str) -> StreamReport:
        report = StreamReport(stream)
        model = self.model_of(stream)
        if not model or "/" in model or model in (".", ".."):
            log.warning("archive_stream_skipped", stream=stream, reason="not a model name")
            return report
        try:
            if not await self._ensure_group(stream):
                return report
            report.trimmed_unread = await self._trimmed_unread(stream)
            backlog = await self._backlog(stream) if self.progress.shown else None
            with self.progress.task(f"archive {stream}", backlog, "entry") as task:
                cursor = "0"  # our pending list first: a crashed run's batch comes back whole
                while batch := await self._read(stream, cursor):
                    await self._settle(stream, model, batch, report, task)
                    cursor = R.format_id(batch[-1][0])
                while batch := await self._read(stream, ">"):
                    await self._settle(stream, model, batch, report, task)
            report.trimmed = await self._trim(stream)
        except (RedisError, OSError) as exc:
            raise StreamUnavailable(f"archiving {stream} failed: {exc}") from exc
        if report.trimmed_unread:
            log.warning("archive_entries_trimmed_unread", stream=stream,
                        lost=report.trimmed_unread,
                        hint="MAXLEN removed entries before they were archived")  # fmt: skip
        log.info("archive_stream_done", **report.to_dict())
        return report

    async def _ensure_group(self, stream: str) -> bool:
        try:
            await self.client.xgroup_create(stream, self.group, id="0")
        except ResponseError as exc:
            text = str(exc)
            if "BUSYGROUP" in text:
                return True
            if "requires the key to exist" in text:
                return False  # no stream (yet): nothing to archive
            raise
        return True

    async def _read(self, stream: str, cursor: str) -> Batch:
        reply: Any = await self.client.xreadgroup(
            self.group, self.consumer, {stream: cursor}, count=self.batch_size
        )
        if not reply:
            return []
        entries = reply[0][1]  # [[stream, [(id, fields), ...]]] (RESP2, the client's default)
        return [(R.parse_id(sid), fields or None) for sid, fields in entries]

    async def _settle(
        self, stream: str, model: str, batch: Batch, report: StreamReport, task: Task
    ) -> None:
        report.read += len(batch)
        by_day: dict[str, list[tuple[R.StreamId, dict[str, Any]]]] = {}
        for sid, fields in batch:
            if fields is None:
                report.lost += 1
                continue
            by_day.setdefault(R.day_of(sid), []).append((sid, decode_fields(fields)))
        for day, rows in by_day.items():
            directory = self.store.partition(PREDICTIONS, model, day)
            ranges = self._covered(directory)
            todo = [(sid, e) for sid, e in rows if not any(a <= sid <= b for a, b in ranges)]
            report.already += len(rows) - len(todo)
            if not todo:
                continue
            first, last = todo[0][0], todo[-1][0]
            path = self.store.write_table(directory, R.part_name(first, last), R.to_table(todo))
            ranges.append((first, last))
            report.written += len(todo)
            report.files.append(path)
            report.touched.add((model, day))
            self.files_written += 1
            if self.after_file is not None:
                self.after_file(self.files_written)
        if report.lost:
            log.warning("archive_pending_entries_lost", stream=stream, lost=report.lost)
        await self.client.xack(stream, self.group, *[R.format_id(sid) for sid, _ in batch])
        task.advance(len(batch))  # entries read (and acknowledged)
        task.note(f"{report.written} rows written")

    def _covered(self, directory: str) -> list[tuple[R.StreamId, R.StreamId]]:
        ranges = self._ranges.get(directory)
        if ranges is None:
            found = (R.part_range(n) for n in self.store.files(directory))
            ranges = self._ranges[directory] = [r for r in found if r is not None]
        return ranges

    async def _backlog(self, stream: str) -> int | None:
        """Entries this run should read: our pending list and the group's lag (None: unknown,
        as on Redis < 7). Only for progress; what is read is what XREADGROUP returns."""
        mine = next((g for g in await self.client.xinfo_groups(stream)
                     if _text(g.get("name")) == self.group), None)  # fmt: skip
        if mine is None or mine.get("lag") is None:
            return None
        return int(mine.get("pending") or 0) + int(mine["lag"])

    async def _trimmed_unread(self, stream: str) -> int:
        """How many entries the stream lost (MAXLEN) before this group read them.

        Trimming removes the oldest entries first, so unread ones are gone only once every
        entry up to the group's last-delivered id is gone too; then everything the stream
        holds is unread, and what was added but neither read nor held was lost."""
        info = await self.client.xinfo_stream(stream)
        mine = next((g for g in await self.client.xinfo_groups(stream)
                     if _text(g.get("name")) == self.group), None)  # fmt: skip
        if mine is None or info.get("entries-added") is None:
            return 0  # Redis < 7 keeps no counters
        delivered = R.parse_id(mine.get("last-delivered-id") or "0-0")
        first = info.get("first-entry")
        if first and R.parse_id(first[0]) <= delivered:
            return 0
        read = mine.get("entries-read")
        if read is None:
            if delivered != (0, 0):
                return 0  # Redis cannot say
            read = 0
        return max(0, int(info["entries-added"]) - int(read) - int(info.get("length") or 0))

    async def _trim(self, stream: str) -> int:
        if self.trim_keep_s < 0:
            return 0
        limit: R.StreamId = (int((self.wall() - self.trim_keep_s) * 1000), 0)
        for g in await self.client.xinfo_groups(stream):
            delivered = R.parse_id(g.get("last-delivered-id") or "0-0")
            limit = min(limit, (delivered[0], delivered[1] + 1))
            if int(g.get("pending") or 0):
                summary = await self.client.xpending(stream, _text(g.get("name")))
                if summary.get("min"):
                    limit = min(limit, R.parse_id(summary["min"]))
        if limit <= (0, 0):
            return 0
        return int(await self.client.xtrim(stream, minid=R.format_id(limit), approximate=True))


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
