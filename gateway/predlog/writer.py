"""PredictionLog: the sink the request path records into, and the task that empties it.

    record() --1. os.write--> Spool segment (write-ahead: survives a process crash at once)
             --2. enqueue---> EntryBuffer --(batch full or flush interval)--> StreamWriter
                                                                            (Redis)
    segment sealed (size/age) and settled: all confirmed -> deleted (its marks forgotten)
                                                         or kept keep_confirmed_s, re-checked
                                           else (Redis down, buffer full) -> replayed

`record` never waits on the network: one unbuffered append to the page cache (a few µs) and
an in-memory enqueue. Without Redis configured the spool is the log itself. While Redis is
down, batches are not retried from memory: their entries already sit in the spool, and a
probe runs every `retry_interval_s`; once it answers, the unlocked segments are replayed
(claimed one by one, removed only after all their entries are in Redis). On start, and every
`orphan_scan_interval_s` while Redis is healthy, the unlocked segments of a process that died
(SIGKILL, OOM; this one or a sibling sharing the directory) are replayed the same way; the
stream's high-water mark per (segment, line) makes every replay, even of entries that had
reached Redis, exactly-once. That needs a segment's lines to reach Redis in order, so at its
first entry that misses the fast path (a failed batch, a full buffer) a segment leaves the fast
path for good: it is rotated and replayed whole. `close` drains the buffer, unlocks whatever
is not confirmed and, while Redis answers, replays it (within `close_replay_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import structlog

from gateway.clock import Clock, monotonic
from gateway.errors import StreamUnavailable
from gateway.metrics import Metrics
from gateway.predlog.buffer import Entry, EntryBuffer
from gateway.predlog.redis_stream import NO_POSITION, Position, StreamWriter
from gateway.predlog.spool import Segment, Spool, segment_id

log = structlog.get_logger(__name__)

#: An entry on its way to Redis, with the spool segment that holds it (None: the spool was
#: unwritable, so memory is its only copy) and its line there.
Pending = tuple[Segment | None, int, Entry]


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
        orphan_scan_interval_s: float = 1.0,
        close_replay_s: float = 5.0,
        clock: Clock = monotonic,
    ) -> None:
        self.spool = spool
        self.writer = writer
        self.metrics = metrics
        self.buffer: EntryBuffer[Pending] = EntryBuffer(buffer_size, batch_size)
        self.flush_interval_s = flush_interval_s
        self.retry_interval_s = retry_interval_s
        self.orphan_scan_interval_s = orphan_scan_interval_s
        #: How long close() may spend sending what is left in the spool to Redis.
        self.close_replay_s = close_replay_s
        self._next_orphan_scan = 0.0
        self.clock = clock
        self.healthy = writer is not None
        self._next_probe = 0.0
        self._replay_needed = writer is not None  # a previous run may have left segments
        self._released_seen = 0
        self._spool_broken = False
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        # Label lookups once, not per entry (they lock and validate).
        self._to_spool_count = metrics.predlog_entries.labels(sink="spool")
        self._buffer_full = metrics.predlog_spooled.labels(reason="buffer_full")
        self._no_redis = metrics.predlog_spooled.labels(reason="no_redis")
        self._replay_only = metrics.predlog_spooled.labels(reason="redis_down")
        self._spool_error = metrics.predlog_dropped.labels(reason="spool_error")

    # -- request path ------------------------------------------------------------------------
    def record(self, entry: Entry) -> None:
        seg = self._append(entry)
        if self.writer is None:  # the spool is the log itself
            if seg is None:
                self._spool_error.inc()
                return
            self._to_spool_count.inc()
            self._no_redis.inc()
            return
        if seg is not None and seg.failed:  # this segment goes by replay only
            self.spool.pending += 1
            (self._buffer_full if self.healthy else self._replay_only).inc()
            return
        if self.buffer.offer((seg, seg.written if seg is not None else 0, entry)):
            if seg is not None:
                seg.inflight += 1
            return
        if seg is None:
            self._spool_error.inc()
            return
        seg.fail(seg.written)  # later lines must not overtake this one into Redis
        self.spool.pending += 1  # on disk only: its segment is replayed once sealed
        self._buffer_full.inc()

    def _append(self, entry: Entry) -> Segment | None:
        try:
            seg = self.spool.append_one(entry)
        except OSError as exc:
            if not self._spool_broken:
                self._spool_broken = True
                log.error("predlog_spool_failed", error=str(exc))
            return None
        if self._spool_broken:
            self._spool_broken = False
            log.info("predlog_spool_back")
        return seg

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.spool.open()
        self._task = asyncio.create_task(self._run(), name="predlog-writer")

    async def close(self) -> None:
        """Stop the writer, drain the buffer to Redis; unconfirmed entries stay spooled."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while len(self.buffer):
            await self._flush(self.buffer.take_nowait(self.buffer.batch_size))
        try:
            self.spool.close()
        except OSError as exc:
            log.error("predlog_spool_close_failed", error=str(exc))
        if self.writer is not None:
            await self._replay_leftovers()
        self._update_lag()

    async def _replay_leftovers(self) -> None:
        """What this process left on disk only (a full buffer, a failed batch, an outage
        that just ended) goes to Redis now, while it answers: the spool may not outlive the
        process (a pod's emptyDir goes with the pod). Bounded: a stop must not hang."""
        assert self.writer is not None
        try:
            async with asyncio.timeout(self.close_replay_s):
                if not self.healthy:
                    await self.writer.ping()
                    self.healthy = True
                await self.replay(seal=False)
                if self.healthy:
                    await self._forget_deleted()
        except (TimeoutError, StreamUnavailable) as exc:
            left = self.spool.pending
            log.warning("predlog_left_in_spool", entries=left, error=str(exc) or "timeout")

    def lag(self) -> int:
        pending = self.spool.pending if self.writer is not None else 0
        return len(self.buffer) + pending

    # -- writer task -------------------------------------------------------------------------
    async def _run(self) -> None:
        # Without Redis nothing is buffered: wake up anyway to fsync and rotate.
        idle = self.retry_interval_s if self.writer is not None else self.flush_interval_s or 0.05
        while True:
            try:
                batch = await self.buffer.take(idle, self.flush_interval_s)
                await self._flush(batch)
                await self._sync()
                if self.writer is not None:
                    await self._maybe_recover()
                self._update_lag()
            except asyncio.CancelledError:
                raise
            except Exception:  # the writer must outlive any one bad batch
                log.exception("predlog_writer_error")
                await asyncio.sleep(self.retry_interval_s)

    async def _flush(self, batch: list[Pending]) -> None:
        if not batch:
            return
        assert self.writer is not None, "nothing is buffered without Redis"
        held = [p for p in batch if p[0] is not None and p[0].holds(p[1])]
        if held:  # past their segment's first failed line: they go by replay
            self._settle(held, confirmed=False)
            batch = [p for p in batch if p[0] is None or not p[0].holds(p[1])]
            if not batch:
                return
        if self.healthy:
            try:
                added = await self.writer.write(
                    [e for _, _, e in batch], [_position(seg, line) for seg, line, _ in batch]
                )
            except StreamUnavailable as exc:
                self._mark_down(exc)
            except (Exception, asyncio.CancelledError):
                # A bug, say, or close() cancelling a write that may not have reached Redis
                # (a connection still being set up): its lines go by replay, and so do the
                # later lines of their segments, which must not reach Redis first (the
                # segment's mark would pass the lost lines).
                self._settle(batch, confirmed=False)
                raise
            else:
                self.metrics.predlog_entries.labels(sink="redis").inc(added)
                if added < len(batch):
                    self.metrics.predlog_dropped.labels(reason="duplicate").inc(len(batch) - added)
                self._settle(batch, confirmed=True)
                return
        self._settle(batch, confirmed=False)
        spooled = sum(1 for seg, _, _ in batch if seg is not None)
        self.metrics.predlog_spooled.labels(reason="redis_down").inc(spooled)
        if spooled < len(batch):
            self._spool_error.inc(len(batch) - spooled)

    def _settle(self, batch: list[Pending], confirmed: bool) -> None:
        """Count the batch against its segments; sealed ones with nothing in flight go."""
        for seg, line, _ in batch:
            if seg is None:
                continue
            seg.inflight -= 1
            if confirmed:
                seg.acked += 1
            else:
                seg.fail(line)
                self.spool.pending += 1
        self._collect(self.spool.collect)

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
        await self._upkeep()
        if not self.healthy:
            return
        if self.spool.released > self._released_seen:
            self._released_seen = self.spool.released
            self._replay_needed = True
        now = self.clock()
        if self._replay_needed and not self._closing:
            self._replay_needed = False
            self._next_orphan_scan = now + self.orphan_scan_interval_s
            await self.replay()
        elif self.orphan_scan_interval_s > 0 and now >= self._next_orphan_scan:
            # A sibling that died leaves unlocked segments: claim and replay them while Redis
            # stays healthy (our own active and settling segments are locked, so skipped).
            self._next_orphan_scan = now + self.orphan_scan_interval_s
            await self.replay(seal=False)

    async def _upkeep(self) -> None:
        """Forget the marks of deleted segments; re-check kept ones whose time is up."""
        assert self.writer is not None
        try:
            await self._forget_deleted()
            for seg in self.spool.kept_due():
                marks = await self.writer.marks(seg.id, seg.last)
                if all(marks[m] >= line for m, line in seg.last.items()):
                    self.spool.drop(seg)
                else:  # Redis lost what it had acked (a crash inside its fsync window)
                    log.warning("predlog_redis_lost_entries", segment=seg.id)
                    self.spool.release(seg)
        except StreamUnavailable as exc:
            self._mark_down(exc)
        except OSError as exc:
            log.error("predlog_spool_upkeep_failed", error=str(exc))

    async def _forget_deleted(self) -> None:
        assert self.writer is not None
        deleted, self.spool.deleted = self.spool.deleted, []
        for n, seg in enumerate(deleted):
            try:
                await self.writer.forget(seg.id, seg.last)
            except StreamUnavailable:
                self.spool.deleted[:0] = deleted[n:]  # next time
                raise

    async def replay(self, seal: bool = True) -> int:
        """Send every claimable spool segment to Redis; stops at the first failure."""
        assert self.writer is not None
        if seal:  # our own active segment settles and becomes replayable
            self._collect(self.spool.seal)
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
        seg = segment_id(path)
        models: set[str] = set()
        with self.spool.claim_lines(path) as lines:
            if lines is None:
                return 0
            size = self.buffer.batch_size
            for i in range(0, len(lines), size):
                chunk = lines[i : i + size]
                entries = [e for _, e in chunk]
                models.update(str(e.get("model") or "unknown") for e in entries)
                # raises: the segment is kept
                added = await self.writer.write(entries, [(seg, n) for n, _ in chunk])
                self.metrics.predlog_replayed.inc(added)
                self.metrics.predlog_entries.labels(sink="redis").inc(added)
                added_total += added
                self.spool.pending = max(0, self.spool.pending - len(chunk))
        # Unlinked: nothing replays it again, so its marks can go (a failure leaves a field).
        with contextlib.suppress(StreamUnavailable):
            await self.writer.forget(seg, models)
        return added_total

    # -- helpers -----------------------------------------------------------------------------
    def _mark_down(self, exc: Exception) -> None:
        if self.healthy:
            log.warning("predlog_redis_down", error=str(exc))
        self.healthy = False
        self._next_probe = self.clock() + self.retry_interval_s

    def _collect(self, step: Callable[[], object]) -> None:
        try:
            step()
        except OSError as exc:
            log.error("predlog_spool_upkeep_failed", error=str(exc))

    async def _sync(self) -> None:
        seg = self.spool.active
        if self.spool.fsync and seg is not None and seg.synced < seg.size:
            size = seg.size
            try:  # in a thread: an fsync takes milliseconds, the event loop serves requests
                await asyncio.to_thread(os.fsync, seg.fd)
                seg.synced = size
            except OSError as exc:
                log.error("predlog_spool_fsync_failed", error=str(exc))
        self._collect(self.spool.sync)  # rotation; fsyncs only what came meanwhile

    def _update_lag(self) -> None:
        self.metrics.predlog_lag.set(self.lag())


def _position(seg: Segment | None, line: int) -> Position:
    return NO_POSITION if seg is None else (seg.id, line)
