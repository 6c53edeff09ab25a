"""Admission control: a bounded number of calls in flight per backend, a bounded wait queue.

Past both bounds a request is shed at once with 503 `Overloaded` + Retry-After, so the
latency of admitted requests stays flat under overload instead of every request queueing
into a tail-latency collapse. The queue is gateway-wide (one bound over all backends) and
waiting in it is short and never past the request's deadline.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

from gateway.errors import Overloaded
from gateway.types import Deadline


@dataclass(frozen=True)
class AdmissionLimits:
    max_in_flight_per_backend: int = 64
    max_queue: int = 128  # waiters over all backends
    max_queue_wait_s: float = 0.05  # shed a waiter after this long (or at its deadline)
    retry_after_s: float = 1.0  # the Retry-After a shed request gets


class Admission:
    def __init__(
        self, limits: AdmissionLimits, on_shed: Callable[[str], None] | None = None
    ) -> None:
        self.limits = limits
        self.on_shed = on_shed
        self._in_flight: dict[str, int] = defaultdict(int)
        self._waiters: dict[str, deque[asyncio.Future[None]]] = defaultdict(deque)
        self._queued = 0

    def in_flight(self, backend: str) -> int:
        return self._in_flight[backend]

    @property
    def queued(self) -> int:
        return self._queued

    @asynccontextmanager
    async def slot(self, backend: str, deadline: Deadline) -> AsyncIterator[None]:
        """Hold one in-flight slot of ``backend`` for the body; raise Overloaded if none
        frees up within the queue bounds."""
        await self._acquire(backend, deadline)
        try:
            yield
        finally:
            self._release(backend)

    def try_acquire(self, backend: str) -> bool:
        """Take a slot if one is free and nobody queues for it (no await: the hot path);
        False: call `acquire`. Every slot taken must be given back with `release`."""
        if (
            self._in_flight[backend] < self.limits.max_in_flight_per_backend
            and not self._waiters[backend]
        ):
            self._in_flight[backend] += 1
            return True
        return False

    async def acquire(self, backend: str, deadline: Deadline) -> None:
        """Take a slot, queueing within the bounds; raises Overloaded when shed."""
        await self._acquire(backend, deadline)

    def release(self, backend: str) -> None:
        self._release(backend)

    async def _acquire(self, backend: str, deadline: Deadline) -> None:
        if self.try_acquire(backend):
            return
        if self._queued >= self.limits.max_queue:
            raise self._shed(backend, "queue full")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[backend].append(fut)
        self._queued += 1
        wait_s = min(self.limits.max_queue_wait_s, deadline.remaining())
        try:
            await asyncio.wait_for(asyncio.shield(fut), wait_s)
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                self._release(backend)  # granted as we gave up: pass the slot on
            else:
                fut.cancel()
            if isinstance(exc, TimeoutError):
                raise self._shed(backend, "queue wait timed out") from None
            raise
        finally:
            self._queued -= 1
            with suppress(ValueError):  # already popped by _release
                self._waiters[backend].remove(fut)

    def _release(self, backend: str) -> None:
        waiters = self._waiters[backend]
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes straight to the next waiter
                return
        self._in_flight[backend] -= 1

    def _shed(self, backend: str, why: str) -> Overloaded:
        if self.on_shed is not None:
            self.on_shed(backend)
        return Overloaded(
            f"backend {backend} is at capacity ({why}); retry later",
            details={"backend": backend},
            retry_after_s=self.limits.retry_after_s,
        )
