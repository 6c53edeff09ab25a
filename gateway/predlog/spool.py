"""The on-disk prediction log: append-only JSONL segments fed from a bounded in-memory buffer.

The request path only enqueues; a background task batches entries to disk. When the buffer is
full the entry is written synchronously instead of dropped: logging may slow down, never lose.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

import orjson
import structlog

from gateway.metrics import Metrics

log = structlog.get_logger(__name__)

SEGMENT_BYTES = 64 << 20


class SpoolLog:
    def __init__(
        self,
        directory: Path,
        metrics: Metrics,
        buffer_size: int = 10_000,
        flush_interval_s: float = 0.05,
        fsync: bool = False,
    ) -> None:
        self.directory = directory
        self._metrics = metrics
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(buffer_size)
        self._flush_interval_s = flush_interval_s
        self._fsync = fsync
        self._task: asyncio.Task[None] | None = None
        self._file: Any = None
        self._segment = 0

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.create_task(self._run(), name="predlog-spool")

    def record(self, entry: dict[str, Any]) -> None:
        line = orjson.dumps(entry, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
        try:
            self._queue.put_nowait(line)
        except asyncio.QueueFull:
            self._write([line])

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._write(self._drain())
        if self._file is not None:
            self._file.close()
            self._file = None

    def _drain(self) -> list[bytes]:
        lines = []
        while not self._queue.empty():
            lines.append(self._queue.get_nowait())
        return lines

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            await asyncio.sleep(self._flush_interval_s)  # let a batch accumulate
            lines = [first, *self._drain()]
            await asyncio.to_thread(self._write, lines)

    def _open(self) -> Any:
        if self._file is None or self._file.tell() >= SEGMENT_BYTES:
            if self._file is not None:
                self._file.close()
            existing = sorted(self.directory.glob("predictions-*.jsonl"))
            if existing and existing[-1].stat().st_size < SEGMENT_BYTES:
                path = existing[-1]
            else:
                path = self.directory / f"predictions-{len(existing):06d}.jsonl"
            self._file = path.open("ab")
        return self._file

    def _write(self, lines: list[bytes]) -> None:
        if not lines:
            return
        f = self._open()
        f.write(b"".join(lines))
        f.flush()
        if self._fsync:
            os.fsync(f.fileno())
        self._metrics.predlog_entries.labels(sink="spool").inc(len(lines))
