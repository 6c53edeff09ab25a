"""The prediction log's Redis side: memory per logged entry, and the writer's throughput.

    python -m loadtest.bench_predlog [--n 100000] [--batch 500] [--url redis://...]

Without `--url` it starts a redis-server of its own on a free port (no persistence) and stops
it after. Reports, for n entries of the default model:

- bytes per entry in Redis (INFO used_memory delta and MEMORY USAGE) for the stream alone (no
  dedupe), the stream with the high-water marks (this log), the stream with the per-request-id
  dedupe keys it replaced (`SET NX EX` per entry, still here for comparison), and the answered
  markers of feedback integrity (a key per entry by design, with its own TTL);
- entries/s of `StreamWriter.write` alone (batches of `--batch`, one pipelined round trip
  each), and of the whole `PredictionLog` (record: spool + buffer; the writer task: Redis).

A script, not a timed test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from gateway.metrics import Metrics
from gateway.predlog.redis_stream import StreamWriter, encode_fields
from gateway.predlog.spool import Spool
from gateway.predlog.writer import PredictionLog
from gateway.tritonserver import free_port
from loadtest.bench_record import sample_entry

# The dedupe this log had before the high-water marks: one key per request id, for a day.
_OLD_DEDUPE = """
local added = 0
local i = 2
for k = 2, #KEYS do
  local n = tonumber(ARGV[i])
  if redis.call('SET', KEYS[k], '1', 'NX', 'EX', ARGV[1]) then
    local fields = {}
    for j = i + 1, i + n do fields[#fields + 1] = ARGV[j] end
    redis.call('XADD', KEYS[1], '*', unpack(fields))
    added = added + 1
  end
  i = i + n + 1
end
return added
"""


def used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def fill(url: str, n: int, batch: int, mode: str, prefix: str) -> tuple[float, float]:
    """Write n entries one way; returns the seconds it took and the client's CPU seconds."""
    client = aioredis.Redis.from_url(url)
    writer = StreamWriter(
        client, prefix, maxlen=0, answered_prefix=f"{prefix}-ans" if mode == "markers" else None
    )
    script = client.register_script(_OLD_DEDUPE)
    t0, c0 = time.perf_counter(), time.process_time()
    for start in range(0, n, batch):
        entries = [sample_entry(i, False) for i in range(start, min(n, start + batch))]
        if mode == "plain":
            await writer.write(entries)
        elif mode in ("marks", "markers"):
            seg = f"predictions-{start // 50_000:020d}-1-bench-1"  # a segment per 50k lines
            await writer.write(entries, [(seg, i + 1) for i in range(start, start + len(entries))])
        else:  # the old request-id keys
            keys = [writer.stream("risk")] + [
                f"{prefix}:seen:risk:{e['request_id']}" for e in entries
            ]
            args: list[Any] = [86_400]
            for e in entries:
                fields = encode_fields(e)
                args.append(len(fields))
                args.extend(fields)
            await script(keys=keys, args=args)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    await client.aclose()
    return elapsed, cpu


async def whole_log(url: str, n: int, batch: int) -> float:
    """PredictionLog end to end: n records, then until the writer task drained them."""
    directory = Path(tempfile.mkdtemp(prefix="bench-predlog-"))
    client = aioredis.Redis.from_url(url)
    plog = PredictionLog(
        spool=Spool(directory, max_age_s=1.0), metrics=Metrics(),
        writer=StreamWriter(client, "bench-e2e", maxlen=0),
        buffer_size=100_000, batch_size=batch, flush_interval_s=0.005,
    )  # fmt: skip
    await plog.start()
    t0 = time.perf_counter()
    for i in range(n):
        plog.record(sample_entry(i, False))
        if i % 1000 == 999:
            await asyncio.sleep(0)  # requests arrive over time: the writer task runs between
    while True:  # drained when every entry is in the stream
        if await client.xlen("bench-e2e:risk") >= n:
            break
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - t0
    await plog.close()
    await client.aclose()
    shutil.rmtree(directory, ignore_errors=True)
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--url", default="")
    a = ap.parse_args()
    proc = None
    url = a.url
    if not url:
        port = free_port()
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"redis://127.0.0.1:{port}/0"
    sync = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                sync.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        print(f"redis {sync.info('server')['redis_version']}, n={a.n}, batch={a.batch}")
        for mode in ("plain", "marks", "old", "markers"):
            prefix = f"bench-{mode}"
            before, cpu0 = used(sync), redis_cpu(sync)
            secs, client_cpu = asyncio.run(fill(url, a.n, a.batch, mode, prefix))
            delta, server_cpu = used(sync) - before, redis_cpu(sync) - cpu0
            stream = sync.memory_usage(f"{prefix}:risk", samples=0) or 0
            marks = sync.memory_usage(f"{{{prefix}:risk}}:hw", samples=0) or 0
            print(f"{mode:8s} {delta / a.n:7.1f} B/entry (used_memory delta)  stream "
                  f"{stream / a.n:6.1f} B/entry  marks hash {marks} B  "
                  f"write {a.n / secs:7.0f} entries/s  CPU per entry: client "
                  f"{client_cpu / a.n * 1e6:5.1f} us, "
                  f"redis {server_cpu / a.n * 1e6:5.1f} us")  # fmt: skip
            sync.flushdb()
        secs = asyncio.run(whole_log(url, a.n, a.batch))
        print(f"PredictionLog record -> spool -> Redis: {a.n / secs:9.0f} entries/s")
    finally:
        sync.close()
        if proc is not None:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
