"""The bounded in-process buffer between the request path and the log writer.

`offer` never waits: it says whether the entry fit, and the caller spools what did not. The
writer takes batches when one is full or the oldest entry has waited `flush_interval_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any, Generic, TypeVar

Entry = dict[str, Any]
T = TypeVar("T")


class EntryBuffer(Generic[T]):
    def __init__(self, capacity: int, batch_size: int) -> None:
        if capacity < 1 or batch_size < 1:
            raise ValueError("capacity and batch_size must be at least 1")
        self.capacity = capacity
        self.batch_size = batch_size
        self._items: deque[T] = deque()
        self._nonempty = asyncio.Event()
        self._full_batch = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, entry: T) -> bool:
        if len(self._items) >= self.capacity:
            return False
        self._items.append(entry)
        self._nonempty.set()
        if len(self._items) >= self.batch_size:
            self._full_batch.set()
        return True

    def take_nowait(self, limit: int | None = None) -> list[T]:
        n = min(len(self._items), limit or len(self._items))
        batch = [self._items.popleft() for _ in range(n)]
        if not self._items:
            self._nonempty.clear()
        if len(self._items) < self.batch_size:
            self._full_batch.clear()
        return batch

    async def take(self, idle_s: float, flush_interval_s: float) -> list[T]:
        """Up to one batch: waits at most `idle_s` for a first entry, then at most
        `flush_interval_s` for the batch to fill. Empty when nothing came."""
        # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancellation that
        # lands as the event fires (an entry just recorded), and the writer it should stop
        # ran on, with PredictionLog.close() awaiting it forever.
        if not self._items:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(idle_s):
                    await self._nonempty.wait()
        if self._items and len(self._items) < self.batch_size and flush_interval_s > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(flush_interval_s):
                    await self._full_batch.wait()
        return self.take_nowait(self.batch_size)
