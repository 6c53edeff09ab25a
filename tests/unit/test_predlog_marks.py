"""The prediction log's high-water-mark dedupe, orphan replay and kept segments, against the
in-memory StreamWriter double of test_predlog (same contract as the Redis script)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

from gateway.clock import FakeClock
from gateway.metrics import Metrics
from gateway.predlog.spool import Spool
from gateway.predlog.writer import PredictionLog
from tests.unit.test_predlog import MemoryStream, entry


async def until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll with a deadline (the writer task runs meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if cond() or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.01)


def dead_sibling(directory: Path, n: int, stream: MemoryStream | None = None) -> None:
    """A process that spooled n entries into `directory` and died (SIGKILL: no settle; the
    kernel drops its locks with its fds)."""
    plog = PredictionLog(spool=Spool(directory), metrics=Metrics(), writer=stream)  # type: ignore[arg-type]
    plog.spool.open()
    for i in range(n):
        plog.record(entry(100 + i))
    assert plog.spool.active is not None
    os.close(plog.spool.active.fd)


async def test_a_dead_siblings_segments_are_replayed_while_redis_stays_healthy(
    tmp_path: Path,
) -> None:
    """Issue 13: a foreign segment sat unsent while Redis stayed healthy (only a restart or an
    outage triggered a replay)."""
    stream = MemoryStream()
    live = PredictionLog(
        spool=Spool(tmp_path), metrics=Metrics(), writer=stream,  # type: ignore[arg-type]
        flush_interval_s=0.01, retry_interval_s=0.05, orphan_scan_interval_s=0.1,
    )  # fmt: skip
    await live.start()
    try:
        live.record(entry(0))
        await until(lambda: len(stream.entries) >= 1)
        dead_sibling(tmp_path, 5)  # after the live one's start-up replay
        await until(lambda: len(stream.entries) >= 6)  # within seconds, Redis healthy all along
    finally:
        await live.close()
    assert sorted(e["request_id"] for e in stream.entries) == ["r0"] + [
        f"r{100 + i}" for i in range(5)
    ]
    assert Spool(tmp_path).segments() == []


async def test_a_segment_does_not_overtake_its_first_failed_line(tmp_path: Path) -> None:
    """Once a line misses the fast path, later lines of its segment wait for the replay:
    otherwise the mark would pass the missing line and the replay would drop it."""
    stream = MemoryStream()
    plog = PredictionLog(spool=Spool(tmp_path), metrics=Metrics(), writer=stream, buffer_size=2)  # type: ignore[arg-type]
    plog.spool.open()
    for i in range(3):  # r2 overflows the buffer
        plog.record(entry(i))
    await plog._flush(plog.buffer.take_nowait())  # r0, r1: before the gap, they go
    plog.record(entry(3))  # after the gap: spool only, though the buffer has room again
    assert len(plog.buffer) == 0
    await plog._flush(plog.buffer.take_nowait())
    assert [e["request_id"] for e in stream.entries] == ["r0", "r1"]
    assert await plog.replay() == 2
    assert [e["request_id"] for e in stream.entries] == ["r0", "r1", "r2", "r3"]
    await plog.close()


async def test_marks_of_deleted_segments_are_forgotten(tmp_path: Path) -> None:
    stream = MemoryStream()
    plog = PredictionLog(spool=Spool(tmp_path), metrics=Metrics(), writer=stream)  # type: ignore[arg-type]
    await plog.start()
    for i in range(4):
        plog.record(entry(i))
    await plog.close()
    assert len(stream.entries) == 4
    assert stream._marks == {}  # memory in Redis is per live segment, not per entry


async def test_kept_segments_are_rechecked_and_replayed_if_redis_lost_them(
    tmp_path: Path,
) -> None:
    """keep_confirmed_s: a confirmed segment stays (locked) for that long; then, if Redis no
    longer has its lines (a crash inside appendfsync everysec's window), it is replayed."""
    clock = FakeClock()
    stream = MemoryStream()
    spool = Spool(tmp_path, keep_confirmed_s=5.0, clock=clock)
    plog = PredictionLog(spool=spool, metrics=Metrics(), writer=stream, clock=clock)  # type: ignore[arg-type]
    spool.open()
    for i in range(3):
        plog.record(entry(i))
    spool.seal()
    await plog._flush(plog.buffer.take_nowait())
    assert len(stream.entries) == 3 and len(spool.segments()) == 1  # confirmed, kept
    await plog._maybe_recover()
    assert len(spool.segments()) == 1  # not due yet
    with Spool(tmp_path).claim(spool.segments()[0]) as entries:
        assert entries is None  # kept segments stay locked: no sibling replays them
    stream.entries.clear()
    stream._marks.clear()  # Redis restarted without the last second of its AOF
    clock.advance(5.0)
    await plog._maybe_recover()  # due: its marks are gone, so it is released and replayed
    assert sorted(e["request_id"] for e in stream.entries) == ["r0", "r1", "r2"]
    assert spool.segments() == []
    # A kept segment that Redis still has is simply deleted.
    plog.record(entry(9))
    spool.seal()
    await plog._flush(plog.buffer.take_nowait())
    clock.advance(5.0)
    await plog._maybe_recover()
    assert spool.segments() == [] and len(stream.entries) == 4
    await plog.close()


def test_a_fresh_empty_segment_is_not_claimed(tmp_path: Path) -> None:
    """Between a writer's open and its flock the file is empty and unlocked: a claimer (the
    orphan scan, every second) must not take it and unlink it under the writer."""
    fresh = tmp_path / "predictions-00000000000000000001-1-abcd-1.jsonl"
    fresh.touch()
    with Spool(tmp_path).claim(fresh) as entries:
        assert entries is None
    assert fresh.exists()
    os.utime(fresh, (time.time() - 3600, time.time() - 3600))  # an old empty orphan goes
    with Spool(tmp_path).claim(fresh) as entries:
        assert entries == []
    assert not fresh.exists()
