"""The prediction log's parts without Redis: buffer, spool, redaction, field encoding, and the
writer's spool-then-replay path against an in-memory StreamWriter double."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway.clock import FakeClock
from gateway.errors import StreamUnavailable
from gateway.metrics import Metrics
from gateway.predlog.buffer import EntryBuffer
from gateway.predlog.redaction import LogPolicies, PolicyError
from gateway.predlog.redis_stream import Position, decode_fields, encode_fields
from gateway.predlog.spool import Spool
from gateway.predlog.spool import segment_id as seg_id
from gateway.predlog.writer import PredictionLog


def entry(i: int, model: str = "toy") -> dict[str, Any]:
    return {"request_id": f"r{i}", "entity_id": f"user-{i}", "model": model, "version": "2",
            "policy_version": "routes@x", "arm": "champion", "input_hash": "ab" * 16,
            "output": {"score": 0.25, "decision": "approve", "confidence": 0.75},
            "fallback_used": None, "latency_ms": 1.25, "ts": 1700000000.5}  # fmt: skip


class MemoryStream:
    """A StreamWriter double with the same contract: per (model, segment) a high-water mark
    of lines written; a line at or below it is a duplicate. Or down."""

    def __init__(self) -> None:
        self.down = False
        self.entries: list[Mapping[str, Any]] = []
        self._marks: dict[tuple[str, str], int] = {}

    async def ping(self) -> None:
        if self.down:
            raise StreamUnavailable("down")

    async def write(
        self, entries: Sequence[Mapping[str, Any]], positions: Sequence[Position] | None = None
    ) -> int:
        await self.ping()
        added = 0
        for n, e in enumerate(entries):
            segment, line = positions[n] if positions is not None else ("", 0)
            key = (str(e["model"]), segment)
            if segment and line <= self._marks.get(key, 0):
                continue
            if segment:
                self._marks[key] = line
            self.entries.append(e)
            added += 1
        return added

    async def marks(self, segment: str, models: Iterable[str]) -> dict[str, int]:
        return {m: self._marks.get((m, segment), 0) for m in models}

    async def forget(self, segment: str, models: Iterable[str]) -> None:
        await self.ping()
        for m in models:
            self._marks.pop((m, segment), None)


def test_buffer_is_bounded_and_batches() -> None:
    buf = EntryBuffer(capacity=3, batch_size=2)
    assert [buf.offer(entry(i)) for i in range(4)] == [True, True, True, False]
    assert [e["request_id"] for e in buf.take_nowait(2)] == ["r0", "r1"]
    assert len(buf) == 1 and buf.offer(entry(9))


def test_fields_round_trip_through_stream_encoding() -> None:
    e = entry(1)
    flat = encode_fields(e)
    assert all(isinstance(v, str) for v in flat)
    assert flat[flat.index("fallback_used") + 1] == ""
    raw = {k.encode(): v.encode() for k, v in zip(flat[::2], flat[1::2], strict=True)}
    assert decode_fields(raw) == e


def test_spool_appends_segments_and_skips_a_torn_line(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=True, segment_bytes=200)
    spool.open()
    spool.append([entry(0), entry(1)])
    spool.sync()  # over 200 bytes: rotates
    spool.append([entry(2)])
    spool.seal()
    segments = spool.segments()
    assert len(segments) == 2
    with segments[-1].open("ab") as f:
        f.write(b'{"request_id": "torn')  # a crash mid-write
    assert [e["request_id"] for e in spool.read_all()] == ["r0", "r1", "r2"]


def test_a_segment_being_written_cannot_be_claimed(tmp_path: Path) -> None:
    writer = Spool(tmp_path)
    writer.open()
    writer.append([entry(0)])
    writer.sync()
    (active,) = writer.segments()
    with Spool(tmp_path).claim(active) as entries:
        assert entries is None  # locked by its writer (another worker, say)
    writer.seal()
    with Spool(tmp_path).claim(active) as entries:
        assert entries is not None and entries[0]["request_id"] == "r0"
    assert not active.exists()


async def test_without_redis_the_spool_is_the_log(tmp_path: Path) -> None:
    metrics = Metrics()
    plog = PredictionLog(spool=Spool(tmp_path), metrics=metrics, flush_interval_s=0)
    await plog.start()
    for i in range(5):
        plog.record(entry(i))
    await plog.close()
    assert [e["request_id"] for e in Spool(tmp_path).read_all()] == [f"r{i}" for i in range(5)]
    assert metrics.registry.get_sample_value("prediction_log_entries_total", {"sink": "spool"}) == 5


async def test_full_buffer_spills_to_the_spool_without_waiting(tmp_path: Path) -> None:
    stream = MemoryStream()
    metrics = Metrics()
    plog = PredictionLog(
        spool=Spool(tmp_path),
        metrics=metrics,
        writer=stream,
        buffer_size=2,
        batch_size=2,  # type: ignore[arg-type]
    )
    plog.spool.open()  # not started: nothing drains the buffer
    for i in range(5):
        plog.record(entry(i))
    assert len(plog.buffer) == 2
    # Write-ahead: every entry is on disk when record() returns, the overflow only there.
    assert [e["request_id"] for e in plog.spool.read_all()] == [f"r{i}" for i in range(5)]
    assert (
        metrics.registry.get_sample_value("prediction_log_spooled_total", {"reason": "buffer_full"})
        == 3
    )
    # The buffered two reach the stream, then the spooled three by the replay close() runs
    # while Redis answers: the spool may not outlive the process (a pod's emptyDir).
    await plog.close()
    assert sorted(e["request_id"] for e in stream.entries) == [f"r{i}" for i in range(5)]
    assert plog.spool.segments() == []


async def test_redis_down_spools_and_replay_is_exactly_once(tmp_path: Path) -> None:
    stream = MemoryStream()
    stream.down = True
    metrics = Metrics()
    plog = PredictionLog(spool=Spool(tmp_path), metrics=metrics, writer=stream)  # type: ignore[arg-type]
    await plog.start()
    for i in range(10):
        plog.record(entry(i))
    await plog.close()  # drains into the spool: Redis is down
    assert len(Spool(tmp_path).read_all()) == 10 and stream.entries == []
    assert (
        metrics.registry.get_sample_value("prediction_log_spooled_total", {"reason": "redis_down"})
        == 10
    )

    stream.down = False
    (seg,) = Spool(tmp_path).segments()  # a replay cut short by a crash: lines 1..4 went
    await stream.write([entry(i) for i in range(4)], [(seg_id(seg), n) for n in range(1, 5)])
    again = PredictionLog(spool=Spool(tmp_path), metrics=Metrics(), writer=stream)  # type: ignore[arg-type]
    again.spool.open()
    assert await again.replay() == 6
    assert sorted(e["request_id"] for e in stream.entries) == sorted(f"r{i}" for i in range(10))
    assert Spool(tmp_path).segments() == []


async def test_every_entry_is_on_disk_before_record_returns_and_goes_once_confirmed(
    tmp_path: Path,
) -> None:
    stream = MemoryStream()
    clock = FakeClock()
    spool = Spool(tmp_path, max_age_s=1.0, clock=clock)
    plog = PredictionLog(spool=spool, metrics=Metrics(), writer=stream)  # type: ignore[arg-type]
    spool.open()
    for i in range(3):
        plog.record(entry(i))
    # Nothing flushed yet: a SIGKILL now would still leave all three in the segment.
    assert [e["request_id"] for e in Spool(tmp_path).read_all()] == ["r0", "r1", "r2"]
    (seg,) = spool.segments()
    spool.sync()  # young: stays active
    clock.advance(1.0)
    spool.sync()  # old: sealed, but its entries are in flight, so it stays locked
    with Spool(tmp_path).claim(seg) as entries:
        assert entries is None
    await plog._flush(plog.buffer.take_nowait())  # all three confirmed by Redis
    assert [e["request_id"] for e in stream.entries] == ["r0", "r1", "r2"]
    assert spool.segments() == []  # a confirmed segment is deleted
    plog.record(entry(3))  # a fresh segment
    assert len(spool.segments()) == 1
    await plog.close()
    assert spool.segments() == [] and len(stream.entries) == 4


async def test_segments_of_a_crashed_process_are_replayed_exactly_once(tmp_path: Path) -> None:
    stream = MemoryStream()
    dead = PredictionLog(spool=Spool(tmp_path), metrics=Metrics(), writer=stream)  # type: ignore[arg-type]
    dead.spool.open()
    for i in range(6):
        dead.record(entry(i))
    await dead._flush(dead.buffer.take_nowait(2))  # r0, r1 reached Redis before the crash
    # The crash: no close, no flush; the kernel drops the process's locks with its fds.
    assert dead.spool._active is not None
    os.close(dead.spool._active.fd)
    metrics = Metrics()
    again = PredictionLog(spool=Spool(tmp_path), metrics=metrics, writer=stream)  # type: ignore[arg-type]
    again.spool.open()
    assert await again.replay() == 4
    assert sorted(e["request_id"] for e in stream.entries) == [f"r{i}" for i in range(6)]
    assert metrics.registry.get_sample_value("prediction_log_replayed_total") == 4
    assert again.spool.segments() == []


async def test_an_unwritable_spool_still_reaches_redis_and_counts_losses(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    unwritable = tmp_path / "file" / "spool"  # under a regular file: every open fails
    stream, metrics = MemoryStream(), Metrics()
    plog = PredictionLog(spool=Spool(unwritable), metrics=metrics, writer=stream)  # type: ignore[arg-type]
    plog.record(entry(0))  # never raises into the request path
    await plog.close()
    assert [e["request_id"] for e in stream.entries] == ["r0"]
    alone = PredictionLog(spool=Spool(unwritable), metrics=metrics)
    alone.record(entry(1))  # without Redis the spool was its only place
    assert (
        metrics.registry.get_sample_value("prediction_log_dropped_total", {"reason": "spool_error"})
        == 1
    )


def test_redaction_hashes_and_drops_everywhere() -> None:
    policies = LogPolicies.from_settings(
        {"toy": {"hash": ["entity_id", "segment"], "drop": ["b"], "sample_rate": 1.0}},
        salt="k",
    )
    policy = policies.for_model("toy")
    e = entry(1) | {"payload": {"features": {"a": 1.0, "b": 2.0}, "context": {"segment": "eu"}}}
    out = policy.apply(e)
    assert out["entity_id"] == policy.hash_value("user-1") != "user-1"
    assert out["payload"] == {
        "features": {"a": 1.0},
        "context": {"segment": policy.hash_value("eu")},
    }
    assert e["entity_id"] == "user-1"  # the original is untouched
    assert policies.for_model("other").apply(e) == e
    unsalted = LogPolicies.from_settings({"toy": {"hash": ["entity_id"]}}).for_model("toy")
    assert unsalted.hash_value("user-1") != policy.hash_value("user-1")


def test_sampling_follows_the_rate() -> None:
    draws = iter([0.05, 0.5, 0.09])
    policies = LogPolicies.from_settings({}, sample_rate=0.1, rand=lambda: next(draws))
    p = policies.for_model("toy")
    assert [p.sampled(policies.rand) for _ in range(3)] == [True, False, True]
    assert not LogPolicies.from_settings({}).for_model("toy").sampled(lambda: 0.0)


@pytest.mark.parametrize(
    "spec",
    [{"hash": ["request_id"]}, {"drop": "entity_id"}, {"sample_rate": 2}, {"mask": ["x"]}, []],
)
def test_bad_policies_are_refused(spec: Any) -> None:
    with pytest.raises(PolicyError):
        LogPolicies.from_settings({"toy": spec})


class StalledStream(MemoryStream):
    """A stream whose first write never reaches Redis until let go: a connection being set
    up (at start, after a blip, in a TLS or AUTH handshake) when SIGTERM comes."""

    def __init__(self) -> None:
        super().__init__()
        self.stalled = asyncio.Event()
        self._first = True

    async def write(
        self, entries: Sequence[Mapping[str, Any]], positions: Sequence[Position] | None = None
    ) -> int:
        if self._first:
            self._first = False
            self.stalled.set()
            await asyncio.Event().wait()  # cancelled by close(): nothing was written
        return await super().write(entries, positions)


async def test_a_write_cancelled_by_close_is_replayed_not_overtaken(tmp_path: Path) -> None:
    """close() cancels the writer in the middle of a write that has not reached Redis. The
    lines after it must not reach Redis first: the segment's mark would pass the lost lines,
    and a replay would take them for written."""
    stream = StalledStream()
    plog = PredictionLog(spool=Spool(tmp_path), metrics=Metrics(), writer=stream)  # type: ignore[arg-type]
    await plog.start()
    for i in range(5):
        plog.record(entry(i))
    await asyncio.wait_for(stream.stalled.wait(), 5)
    for i in range(5, 10):
        plog.record(entry(i))
    await plog.close()
    again = PredictionLog(spool=Spool(tmp_path), metrics=Metrics(), writer=stream)  # type: ignore[arg-type]
    again.spool.open()
    await again.replay()
    assert sorted(e["request_id"] for e in stream.entries) == sorted(f"r{i}" for i in range(10))


@pytest.mark.parametrize("turns", [0, 1, 2])
async def test_close_right_after_a_record_does_not_hang(tmp_path: Path, turns: int) -> None:
    """Python 3.11's wait_for swallows a cancel that lands as the awaited event fires: the
    writer idling for an entry kept running, and close() awaited it forever."""
    stream = MemoryStream()
    plog = PredictionLog(spool=Spool(tmp_path), metrics=Metrics(), writer=stream)  # type: ignore[arg-type]
    await plog.start()
    for _ in range(5):
        await asyncio.sleep(0)  # the writer idles in take(), waiting for an entry
    plog.record(entry(1))
    for _ in range(turns):
        await asyncio.sleep(0)
    closing = asyncio.create_task(plog.close())
    done, _ = await asyncio.wait([closing], timeout=5)
    assert done, "close() hung: the writer task ignored its cancellation"
    assert [e["request_id"] for e in stream.entries] == ["r1"]
