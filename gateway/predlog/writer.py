"""PredictionLog: the sink the request path records into, and the task that empties it.

    record() -> EntryBuffer --(batch full or flush interval)--> StreamWriter (Redis)
                    | full                                        | unreachable
                    v                                             v
                  Spool (JSONL segments) <------------------------+
                    '--(Redis healthy again: replay, idempotent)--> StreamWriter

`record` never waits. Without Redis configured the spool is the log itself. While Redis is
down, batches go to the spool and a probe runs every `retry_interval_s`; once it answers, the
spool is replayed (claimed segment by segment, removed only after its entries are in Redis;
the writer's dedupe makes a replay after a crash exactly-once). `close` drains everything.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import structlog

from gateway.clock import Clock, monotonic
from gateway.errors import StreamUnavailable
from gateway.metrics import Metrics
from gateway.predlog.buffer import Entry, EntryBuffer
from gateway.predlog.redis_stream import StreamWriter
from gateway.predlog.spool import Spool

log = structlog.get_logger(__name__)


class PredictionLog:
    def __init__(
        self,
        *,
        spool: Spool,
        metrics: Metrics,
        writer: StreamWriter | None = None,
        buffer_size: int = 10_000,
        batch_size: int = 500,
        flush_interval_s: float = 0.05,
        retry_interval_s: float = 1.0,
        clock: Clock = monotonic,
    ) -> None:
        self.spool = spool
        self.writer = writer
        self.metrics = metrics
        self.buffer = EntryBuffer(buffer_size, batch_size)
        self.flush_interval_s = flush_interval_s
        self.retry_interval_s = retry_interval_s
        self.clock = clock
        self.healthy = writer is not None
        self._next_probe = 0.0
        self._replay_needed = writer is not None  # a previous run may have left segments
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # -- request path ------------------------------------------------------------------------
    def record(self, entry: Entry) -> None:
        if self.buffer.offer(entry):
            return
        self._to_spool([entry], "buffer_full")

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.spool.open()
        self._task = asyncio.create_task(self._run(), name="predlog-writer")

    async def close(self) -> None:
        """Stop the writer and put every buffered entry somewhere durable."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while len(self.buffer):
            await self._flush(self.buffer.take_nowait(self.buffer.batch_size))
        self._sync()
        self.spool.close()
        self._update_lag()

    def lag(self) -> int:
        pending = self.spool.pending if self.writer is not None else 0
        return len(self.buffer) + pending

    # -- writer task -------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                idle = self.retry_interval_s if self.writer is not None else 1.0
                batch = await self.buffer.take(idle, self.flush_interval_s)
                await self._flush(batch)
                self._sync()
                if self.writer is not None:
                    await self._maybe_recover()
                self._update_lag()
            except asyncio.CancelledError:
                raise
            except Exception:  # the writer must outlive any one bad batch
                log.exception("predlog_writer_error")
                await asyncio.sleep(self.retry_interval_s)

    async def _flush(self, batch: list[Entry]) -> None:
        if not batch:
            return
        if self.writer is None:
            self._to_spool(batch, "no_redis")
            return
        if not self.healthy:
            self._to_spool(batch, "redis_down")
            return
        try:
            added = await self.writer.write(batch)
        except StreamUnavailable as exc:
            self._mark_down(exc)
            self._to_spool(batch, "redis_down")
            return
        self.metrics.predlog_entries.labels(sink="redis").inc(added)
        if added < len(batch):
            self.metrics.predlog_dropped.labels(reason="duplicate").inc(len(batch) - added)

    async def _maybe_recover(self) -> None:
        assert self.writer is not None
        if not self.healthy:
            if self.clock() < self._next_probe:
                return
            try:
                await self.writer.ping()
            except StreamUnavailable as exc:
                self._mark_down(exc)
                return
            self.healthy = True
            self._replay_needed = True
            log.info("predlog_redis_back")
        if self._replay_needed and not self._closing:
            self._replay_needed = False
            await self.replay()

    async def replay(self) -> int:
        """Move every claimable spool segment into Redis; stops at the first failure."""
        assert self.writer is not None
        self.spool.seal()  # our own active segment becomes replayable too
        total = 0
        try:
            for path in self.spool.segments():
                total += await self._replay_segment(path)
        except StreamUnavailable as exc:  # the segment stays; replayed again later
            self._mark_down(exc)
        if total:
            log.info("predlog_replayed", entries=total)
        return total

    async def _replay_segment(self, path: Path) -> int:
        assert self.writer is not None
        added_total = 0
        with self.spool.claim(path) as entries:
            if entries is None:
                return 0
            size = self.buffer.batch_size
            for i in range(0, len(entries), size):
                chunk = entries[i : i + size]
                added = await self.writer.write(chunk)  # raises: the segment is kept
                self.metrics.predlog_replayed.inc(added)
                self.metrics.predlog_entries.labels(sink="redis").inc(added)
                added_total += added
                self.spool.pending = max(0, self.spool.pending - len(chunk))
        return added_total

    # -- helpers -----------------------------------------------------------------------------
    def _mark_down(self, exc: Exception) -> None:
        if self.healthy:
            log.warning("predlog_redis_down", error=str(exc))
        self.healthy = False
        self._next_probe = self.clock() + self.retry_interval_s

    def _to_spool(self, entries: list[Entry], reason: str) -> None:
        try:
            self.spool.append(entries)
        except OSError as exc:
            self.metrics.predlog_dropped.labels(reason="spool_error").inc(len(entries))
            log.error("predlog_spool_failed", error=str(exc), entries=len(entries))
            return
        self.metrics.predlog_spooled.labels(reason=reason).inc(len(entries))
        if self.writer is None:  # the spool is the log itself
            self.metrics.predlog_entries.labels(sink="spool").inc(len(entries))

    def _sync(self) -> None:
        try:
            self.spool.sync()
        except OSError as exc:
            log.error("predlog_spool_sync_failed", error=str(exc))

    def _update_lag(self) -> None:
        self.metrics.predlog_lag.set(self.lag())
