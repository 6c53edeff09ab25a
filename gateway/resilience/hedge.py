"""Hedged requests: a late call gets a duplicate on another replica; the first answer wins.

A replica that stalls (a GC pause, a stopped process, a noisy neighbour) sets the tail of
every call that lands on it. Once a call has waited longer than its target's rolling p95
(the route's ``hedge.after``) the Pool sends the same request to another ready replica; the
first answer is returned and the other call is cancelled. A `RetryBudget` per route (the
same sliding window as retries) caps hedges at ``max_ratio`` of the route's requests, so a
slow pool sees a few percent more load, not double. The Service above logs the one answer
it gets, so the prediction is logged once whichever call wins.

Outcomes (``hedges_total{outcome}``): ``won`` (the hedge answered first), ``lost`` (the
first call answered first after the hedge went out), ``failed`` (both failed), ``budget``
(late, but the budget was spent), ``no_replica`` (late, but no other replica was ready).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from gateway.clock import Clock, monotonic
from gateway.resilience.retry import RetryBudget
from gateway.types import Deadline, HedgeSpec

T = TypeVar("T")

__all__ = ["Hedger", "LatencyWindow"]


class LatencyWindow:
    """The last ``size`` latencies of one target; a quantile is re-sorted at most every
    ``every`` samples, so the hot path pays a deque append."""

    def __init__(self, size: int = 512, min_samples: int = 20, every: int = 16) -> None:
        self.samples: deque[float] = deque(maxlen=size)
        self.min_samples = min_samples
        self.every = every
        self._since = 0
        self._sorted: list[float] = []

    def record(self, seconds: float) -> None:
        self.samples.append(seconds)
        self._since += 1

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (nearest rank), or None with too few samples to say."""
        if len(self.samples) < self.min_samples:
            return None
        if self._since >= self.every or not self._sorted:
            self._sorted = sorted(self.samples)
            self._since = 0
        return self._sorted[min(len(self._sorted) - 1, int(q * len(self._sorted)))]


class Hedger:
    """Latency windows per target, budgets per route, and the race between the two calls."""

    def __init__(
        self,
        clock: Clock = monotonic,
        window_s: float = 10.0,
        min_per_s: float = 0.0,
        on_outcome: Callable[[str], None] | None = None,
    ) -> None:
        self.clock = clock
        self.window_s = window_s
        self.min_per_s = min_per_s
        self.on_outcome = on_outcome
        self.windows: dict[Any, LatencyWindow] = {}
        self.budgets: dict[str, RetryBudget] = {}

    def record(self, target: Any, seconds: float) -> None:
        window = self.windows.get(target)
        if window is None:
            window = self.windows[target] = LatencyWindow()
        window.record(seconds)

    def delay_s(self, spec: HedgeSpec, target: Any) -> float | None:
        """How long to wait before hedging; None: not yet known (too few samples)."""
        if spec.after_ms is not None:
            return spec.after_ms / 1000.0
        window = self.windows.get(target)
        if window is None or spec.quantile is None:
            return None
        return window.quantile(spec.quantile)

    def budget(self, route: str, spec: HedgeSpec) -> RetryBudget:
        b = self.budgets.get(route)
        if b is None or b.ratio != spec.max_ratio:  # a route reload may change the ratio
            b = self.budgets[route] = RetryBudget(
                spec.max_ratio, self.window_s, self.clock, min_per_s=self.min_per_s
            )
        return b

    def _count(self, outcome: str) -> None:
        if self.on_outcome is not None:
            self.on_outcome(outcome)

    async def run(
        self,
        spec: HedgeSpec,
        route: str,
        target: Any,
        first: Callable[[], Coroutine[Any, Any, T]],
        second: Callable[[], Coroutine[Any, Any, T] | None],
        deadline: Deadline,
    ) -> T:
        """``first()`` now; ``second()`` (a call on another replica, or None when there is
        none) once the delay passes without an answer and the budget allows."""
        budget = self.budget(route, spec)
        budget.record_request()
        delay = self.delay_s(spec, target)
        if delay is None or delay >= deadline.remaining():
            return await first()
        task = asyncio.ensure_future(first())
        try:
            done, _ = await asyncio.wait({task}, timeout=delay)
        except BaseException:
            task.cancel()
            raise
        if done:
            return task.result()
        if not budget.try_spend():
            self._count("budget")
            return await task
        coro = second()
        if coro is None:
            self._count("no_replica")
            return await task
        return await self._race(task, asyncio.ensure_future(coro))

    async def _race(self, first: asyncio.Future[T], hedge: asyncio.Future[T]) -> T:
        pending = {first, hedge}
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in (first, hedge):  # both done at once: the first call's answer wins
                    if fut in done and not fut.cancelled() and fut.exception() is None:
                        self._count("won" if fut is hedge else "lost")
                        return fut.result()
            self._count("failed")
            return first.result()  # both failed: the first call's error propagates
        finally:
            for fut in pending:  # the loser (or both, if the caller went away)
                fut.cancel()
                fut.add_done_callback(_quiet)


def _quiet(fut: asyncio.Future[Any]) -> None:
    """Retrieve a cancelled loser's outcome so asyncio does not report it as never read."""
    with contextlib.suppress(BaseException):
        fut.exception()
