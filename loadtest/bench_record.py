"""Microbenchmark of `PredictionLog.record`, the prediction log's cost on the request path.

    python -m loadtest.bench_record [--n 200000] [--dir var/spool-bench] [--payload]

Reports µs per call for the write-ahead record (encode + one `os.write` + enqueue), and its
parts, against an in-memory-only enqueue (what record cost before the write-ahead log). A
script, not a timed test: numbers depend on the machine and its disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.metrics import Metrics
from gateway.predlog.buffer import EntryBuffer
from gateway.predlog.spool import Spool, encode
from gateway.predlog.writer import PredictionLog


def sample_entry(i: int, payload: bool) -> dict[str, Any]:
    e: dict[str, Any] = {
        "request_id": f"bench-{i:012d}", "entity_id": "h:" + "ab" * 16, "model": "risk",
        "target": "risk", "version": "2", "policy_version": "routes@0123456789ab",
        "arm": "champion", "input_hash": f"{i:032x}",
        "output": {"score": 0.4321, "decision": "review", "confidence": 0.8642},
        "fallback_used": None, "latency_ms": 3.217, "ts": 1763900000.123456,
    }  # fmt: skip
    if payload:
        e["payload"] = {"features": {f"f{k}": 0.1 * k for k in range(30)}, "context": {}}
    return e


class _NeverWrites:
    """A StreamWriter stand-in: the writer task never runs in the benchmark."""

    async def ping(self) -> None:
        return None

    async def write(self, entries: Any) -> int:
        return len(entries)


def _time(fn: Callable[[int], object], entries: list[dict[str, Any]], reps: int) -> list[float]:
    """µs per call, one figure per repetition over all entries."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for i in range(len(entries)):
            fn(i)
        out.append((time.perf_counter() - t0) / len(entries) * 1e6)
    return out


def run(n: int, directory: Path, payload: bool, fsync: bool, reps: int) -> dict[str, float]:
    entries = [sample_entry(i, payload) for i in range(n)]
    results: dict[str, float] = {}

    def fresh_log() -> PredictionLog:
        shutil.rmtree(directory, ignore_errors=True)
        spool = Spool(directory, fsync=fsync)
        spool.open()
        return PredictionLog(
            spool=spool,
            metrics=Metrics(),
            writer=_NeverWrites(),  # type: ignore[arg-type]
            buffer_size=n + 1,
            batch_size=n + 1,
        )

    samples: list[float] = []
    for _ in range(reps):
        plog = fresh_log()
        samples += _time(lambda i, p=plog: p.record(entries[i]), entries, 1)  # type: ignore[misc]
        plog.spool.close()
    results["record_wal_us"] = statistics.median(samples)

    samples = []
    for _ in range(reps):
        buf: EntryBuffer[Any] = EntryBuffer(n + 1, n + 1)
        samples += _time(lambda i, b=buf: b.offer((None, entries[i])), entries, 1)  # type: ignore[misc]
    results["enqueue_only_us"] = statistics.median(samples)

    results["encode_us"] = statistics.median(_time(lambda i: encode(entries[i]), entries, reps))

    samples = []
    encoded = [encode(e) for e in entries]
    for _ in range(reps):
        shutil.rmtree(directory, ignore_errors=True)
        spool = Spool(directory)
        spool.open()
        seg = spool.append_one(entries[0])
        samples += _time(lambda i, fd=seg.fd: _write(fd, encoded[i]), entries, 1)  # type: ignore[misc]
        spool.close()
    results["os_write_us"] = statistics.median(samples)
    results["entry_bytes"] = float(statistics.mean(len(encode(e)) for e in entries[:100]))
    shutil.rmtree(directory, ignore_errors=True)
    return results


def _write(fd: int, data: bytes) -> None:
    os.write(fd, data)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="records per repetition")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=Path("var/spool-bench"))
    ap.add_argument("--payload", action="store_true", help="entries carry a 30-feature payload")
    args = ap.parse_args(argv)
    res = run(args.n, args.dir, args.payload, fsync=False, reps=args.reps)
    for key, value in res.items():
        print(f"{key:>16}: {value:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
