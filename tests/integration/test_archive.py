"""The prediction archive against the real Redis: N entries written by the real StreamWriter
give exactly N Parquet rows, through a SIGKILL between rename and XACK; the archive's label
join and canary stats equal the Redis path's on the same data; trimming never reaches an
unarchived entry.

Each test uses its own key prefixes and deletes only its own keys (no FLUSHDB), so it can
share a Redis database with other tests."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest
import redis
import redis.asyncio as aioredis

from gateway.archive.aggregates import DAILY
from gateway.archive.query import ArchiveReader, gather_stats_archive, join_labels_archive
from gateway.archive.run import RunOptions, archive_run
from gateway.archive.store import AGGREGATES, ArchiveStore
from gateway.predlog.feedback import LabelStore, join_labels
from gateway.predlog.redis_stream import StreamWriter
from gateway.rollout.analysis import gather_stats
from gateway.stats import p99
from tests.conftest import REDIS_URL, reachable_redis, unavailable
from tests.terminal import redraws, run_on_terminal

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def prefix() -> Iterator[str]:
    """A unique key prefix on the test Redis; its keys are deleted afterwards."""
    client = reachable_redis()
    p = f"t-archive-{uuid.uuid4().hex[:10]}"
    try:
        yield p
    finally:
        keys = list(client.scan_iter(match=f"{p}*", count=1000))
        for i in range(0, len(keys), 1000):
            client.unlink(*keys[i : i + 1000])
        client.close()


@pytest.fixture
async def client() -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(REDIS_URL)
    yield c
    await c.aclose()


def make_entries(n: int, model: str = "risk", seed: int = 7) -> list[dict[str, Any]]:
    """Entries in the schema of gateway/service.py `_record`: two arms, some fallbacks,
    some sampled payloads."""
    rnd = random.Random(seed)
    now = time.time()
    out = []
    for i in range(n):
        challenger = i % 4 == 0
        out.append({
            "request_id": f"{model}-{i}-{uuid.uuid4().hex[:6]}",
            "entity_id": f"h:{i % 37}",
            "model": model,
            "target": model,
            "version": "4" if challenger else "3",
            "policy_version": "routes@abc" if i % 10 else "routes@old",
            "arm": "challenger" if challenger else "champion",
            "input_hash": f"{i:016x}",
            "output": {"score": round(rnd.random(), 4), "decision": rnd.choice(["deny", "allow"]),
                       "confidence": 0.8},
            "fallback_used": "cache" if i % 23 == 0 else None,
            "latency_ms": round(rnd.uniform(1, 40), 3),
            "ts": now,
            "protocol": "v1",
            **({"payload": {"features": {"f0": i * 0.5}, "context": {"segment": "eu"}}}
               if i % 50 == 0 else {}),
        })  # fmt: skip
    return out


async def write_all(client: aioredis.Redis, prefix: str, entries: list[dict[str, Any]]) -> None:
    writer = StreamWriter(client, prefix=prefix, maxlen=0)
    for i in range(0, len(entries), 500):
        assert await writer.write(entries[i : i + 500]) == len(entries[i : i + 500])


def archived(root: Path) -> list[tuple[str, int]]:
    """(request_id, stream_ms) of every archived row."""
    files = sorted(str(p) for p in root.glob("predictions/model=*/date=*/part-*.parquet"))
    if not files:
        return []
    with duckdb.connect() as con:
        return con.execute(
            "SELECT request_id, stream_ms FROM read_parquet(?, hive_partitioning=false)", [files]
        ).fetchall()


def archiver_cmd(prefix: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gateway", "predlog", "archive", "--once", "--out", str(out),
            "--redis-url", REDIS_URL, *extra]  # fmt: skip


def archiver_env(prefix: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SWITCHYARD__PREDLOG__STREAM_PREFIX": prefix,
        "SWITCHYARD__FEEDBACK__LABEL_PREFIX": f"{prefix}-label",
    }


def test_n_predictions_give_n_rows_through_a_kill_between_rename_and_xack(
    prefix: str, tmp_path: Path
) -> None:
    n = 1200
    entries = make_entries(n)
    stream = f"{prefix}:risk"

    async def write() -> None:
        async with aioredis.Redis.from_url(REDIS_URL) as c:
            await write_all(c, prefix, entries)

    asyncio.run(write())
    sync = redis.Redis.from_url(REDIS_URL)
    out = tmp_path / "archive"
    stderr = tmp_path / "archiver.err"
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            archiver_cmd(prefix, out, "--batch-size", "100", "--hang-after-files", "3"),
            cwd=ROOT, env=archiver_env(prefix), stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "hanging after 3 files" not in stderr.read_text():
            assert proc.poll() is None, stderr.read_text()
            assert time.monotonic() < deadline, "the archiver never reached its third file"
            time.sleep(0.05)  # polling a file with a deadline, not synchronising on time
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    # The crash window: the third file is in place, its 100 entries not acknowledged.
    assert len(archived(out)) == 300
    assert sync.xpending(stream, "archiver")["pending"] == 100

    # The rerun, with other batch boundaries, acks the pending batch without a second copy.
    done = subprocess.run(
        archiver_cmd(prefix, out, "--batch-size", "70"),
        cwd=ROOT, env=archiver_env(prefix), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = archived(out)
    ids = [r for r, _ in rows]
    assert len(rows) == n
    assert len(set(ids)) == n
    assert set(ids) == {e["request_id"] for e in entries}
    assert sync.xpending(stream, "archiver")["pending"] == 0
    assert '"already_archived": 100' in done.stdout
    # Every file is named by the ids it holds.
    with duckdb.connect() as con:
        for part in out.glob("predictions/model=risk/date=*/part-*.parquet"):
            lo, hi = con.execute(
                "SELECT min(stream_ms * 1000000 + stream_seq), max(stream_ms * 1000000 + "
                "stream_seq) FROM read_parquet(?)", [str(part)],
            ).fetchone()  # fmt: skip
            first, last = part.name[len("part-") : -len(".parquet")].split("_")
            as_num = [
                int(x.split("-")[0]) * 1_000_000 + int(x.split("-")[1]) for x in (first, last)
            ]
            assert as_num == [lo, hi], part.name

    # A third run finds nothing new.
    async def rerun() -> dict[str, Any]:
        async with aioredis.Redis.from_url(REDIS_URL) as c:
            return await archive_run(c, ArchiveStore(out), RunOptions(prefix=prefix))

    assert asyncio.run(rerun())["rows_written"] == 0
    assert len(archived(out)) == n
    sync.close()


async def test_archive_join_and_canary_stats_equal_the_redis_path(
    client: aioredis.Redis, prefix: str, tmp_path: Path
) -> None:
    entries = make_entries(800) + make_entries(200, model="fraud", seed=3)
    await write_all(client, prefix, entries)
    labels = LabelStore(client, prefix=f"{prefix}-label")
    rnd = random.Random(11)
    given: list[tuple[str, Any]] = []
    for e in entries:
        if rnd.random() < 0.6:  # string labels compare with decision, booleans with score
            label: Any = rnd.choice(["deny", "allow"]) if rnd.random() < 0.5 else rnd.random() < 0.5
            given.append((e["request_id"], label))
    for i in range(0, len(given), 50):  # 50 at a time: the pool's connections
        stored = await asyncio.gather(*(labels.put(r, lab) for r, lab in given[i : i + 50]))
        assert all(stored)
    store = ArchiveStore(tmp_path / "archive")
    report = await archive_run(client, store, RunOptions(prefix=prefix, batch_size=400), labels)
    assert report["rows_written"] == len(entries)

    wall = time.time()
    streams = [f"{prefix}:fraud", f"{prefix}:risk"]
    reader = ArchiveReader(store)
    try:
        for window in (None, 3600.0):
            on_redis = await join_labels(client, labels, streams, window, wall=lambda: wall)
            on_archive = await join_labels_archive(reader, labels, None, window, lambda: wall)
            assert on_archive.to_dict() == on_redis.to_dict()
            assert on_redis.entries == len(entries) and on_redis.deltas()
        args = ("champion", "challenger", "routes@abc", 3600.0)
        s_redis = await gather_stats(client, labels, f"{prefix}:risk", *args, wall=lambda: wall)
        s_arch = await gather_stats_archive(reader, labels, "risk", *args, wall=lambda: wall)
        assert s_arch.to_dict() == s_redis.to_dict()
        assert s_redis.ignored > 0 and s_redis.challenger.labelled > 0
    finally:
        reader.close()

    # The day's aggregates: the same counts, nearest-rank p99 and label join.
    (agg,) = (tmp_path / "archive" / AGGREGATES).glob(f"model=risk/date=*/{DAILY}")
    got = {
        (v, a): (n, p, lab, ok)
        for v, a, n, p, lab, ok in duckdb.connect()
        .execute(
            "SELECT version, arm, answers, p99_ms, labelled, correct FROM read_parquet(?)",
            [str(agg)],
        )
        .fetchall()
    }
    risk = [e for e in entries if e["model"] == "risk"]
    joined = {(a.version, a.arm): (a.labelled, a.correct) for a in on_redis.arms
              if a.model == "risk"}  # fmt: skip
    want = {}
    for key in joined:
        mine = [e for e in risk if (e["version"], e["arm"]) == key]
        want[key] = (len(mine), p99([e["latency_ms"] for e in mine]), *joined[key])
    assert got == want


async def test_trim_removes_only_archived_entries(
    client: aioredis.Redis, prefix: str, tmp_path: Path
) -> None:
    from gateway.archive.archiver import Archiver

    stream = f"{prefix}:risk"
    await write_all(client, prefix, make_entries(1000))
    store = ArchiveStore(tmp_path / "archive")
    # Kept a day in Redis (the default): nothing this recent goes.
    keep = Archiver(client, store, prefix, batch_size=300)
    (r,) = await keep.run([stream])
    assert (r.written, r.trimmed) == (1000, 0)
    assert await client.xlen(stream) == 1000
    # 300 more, delivered to the group but unacknowledged (a crashed run's batch).
    await write_all(client, prefix, make_entries(300, seed=9))
    reply = await client.xreadgroup("archiver", "archiver", {stream: ">"}, count=300)
    pending_ids = [sid for sid, _ in reply[0][1]]
    trimmer = Archiver(client, store, prefix, batch_size=300, trim_keep_s=0)
    assert await trimmer._trim(stream) > 0  # archived and acked: trimmed (whole nodes)
    left = {sid for sid, _ in await client.xrange(stream)}
    assert set(pending_ids) <= left
    assert await client.xlen(stream) < 1300
    # The rerun still archives the pending 300; then everything may go.
    (r2,) = await trimmer.run([stream])
    assert r2.written == 300 and len(archived(tmp_path / "archive")) == 1300
    # Entries that MAXLEN removes while pending are reported lost and acknowledged.
    await write_all(client, prefix, make_entries(10, seed=10))
    await client.xreadgroup("archiver", "archiver", {stream: ">"}, count=10)
    await client.xtrim(stream, maxlen=0, approximate=False)
    (r3,) = await trimmer.run([stream])
    assert (r3.read, r3.lost, r3.written, r3.trimmed_unread) == (10, 10, 0, 0)
    assert (await client.xpending(stream, "archiver"))["pending"] == 0
    # ... and entries it removes before the archiver read them are flagged.
    await write_all(client, prefix, make_entries(10, seed=11))
    await client.xtrim(stream, maxlen=0, approximate=False)
    (r4,) = await trimmer.run([stream])
    assert (r4.read, r4.trimmed_unread) == (0, 10)


async def test_archive_through_an_fsspec_url(client: aioredis.Redis, prefix: str) -> None:
    try:
        import fsspec  # noqa: F401  (optional at runtime; the dev extra has it)
    except ImportError:
        unavailable("fsspec not installed (pip install -e '.[dev]')")
    await write_all(client, prefix, make_entries(500))
    store = ArchiveStore(f"memory://{prefix}")
    try:
        report = await archive_run(client, store, RunOptions(prefix=prefix, batch_size=200))
        assert report["rows_written"] == 500
        reader = ArchiveReader(store)
        try:
            rows = sum(len(chunk) for chunk in reader.entries())
        finally:
            reader.close()
        assert rows == 500
        assert store.partitions(AGGREGATES)
    finally:
        store.fs.rm(store.root, recursive=True)


def test_labels_join_cli_gives_the_same_report_from_either_source(
    prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main

    entries = make_entries(400)
    out = tmp_path / "archive"

    async def setup() -> None:
        async with aioredis.Redis.from_url(REDIS_URL) as c:
            await write_all(c, prefix, entries)
            labels = LabelStore(c, prefix=f"{prefix}-label")
            for e in entries[::3]:
                await labels.put(e["request_id"], "deny")
            await archive_run(c, ArchiveStore(out), RunOptions(prefix=prefix))

    asyncio.run(setup())
    env = {"SWITCHYARD__PREDLOG__STREAM_PREFIX": prefix,
           "SWITCHYARD__FEEDBACK__LABEL_PREFIX": f"{prefix}-label"}  # fmt: skip
    common = ["labels", "join", "--config", str(ROOT / "configs/gateway.yaml"),
              "--redis-url", REDIS_URL]  # fmt: skip
    reports = []
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        for source in (["--source", "redis"], ["--source", "archive", "--archive", str(out)]):
            capsys.readouterr()
            assert main([*common, *source]) == 0
            reports.append(orjson.loads(capsys.readouterr().out))
    assert reports[0] == reports[1]
    assert reports[0]["entries"] == 400
    assert sum(a["labelled"] for a in reports[0]["arms"]) == len(entries[::3])
    assert reports[0]["canary_accuracy_delta"]


def test_archive_shows_progress_on_a_terminal_and_none_in_ci(prefix: str, tmp_path: Path) -> None:
    async def write() -> None:
        async with aioredis.Redis.from_url(REDIS_URL) as c:
            await write_all(c, prefix, make_entries(600, "risk") + make_entries(600, "digits"))

    asyncio.run(write())
    env = {k: v for k, v in archiver_env(prefix).items() if k not in {"CI", "SWITCHYARD_PROGRESS"}}
    env["TERM"] = "xterm-256color"
    args = ("--batch-size", "200", "--no-retention")
    reports = {}
    for model, extra in (("risk", {}), ("digits", {"CI": "true"})):
        cmd = archiver_cmd(prefix, tmp_path / "archive", "--model", model, *args)
        rc, out, err = run_on_terminal(cmd, {**env, **extra}, ROOT)
        assert rc == 0, err
        reports[model] = (orjson.loads(out), err)
    report, err = reports["risk"]  # on a terminal: entries read of the backlog, rows written
    assert f"archive {prefix}:risk".encode() in err and b"600/600" in err
    assert b"600 rows written" in err and redraws(err)
    report_ci, err_ci = reports["digits"]  # the same on a terminal in CI: the logs only
    assert b"rows written" not in err_ci and not redraws(err_ci)
    assert f'"stream":"{prefix}:digits"'.encode() in err_ci  # (the logs did reach it)
    assert report["rows_written"] == report_ci["rows_written"] == 600
