"""Retries for transient backend failures, bounded three ways: attempts, budget, deadline.

Only `BackendUnavailable` (gRPC UNAVAILABLE, refused or dropped connections) is retried, and
never one marked ``retryable = False`` (an open breaker, no ready server). A global
`RetryBudget` keeps retries under a share of the requests over a sliding window, so a sick
backend sees at most ~10 % extra load instead of a retry storm; a small floor of retries per
second (Finagle's and Linkerd's `minRetriesPerSec`) keeps a quiet service able to retry a
one-off dropped connection. Backoff is exponential with
full jitter; the randomness is injectable.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from gateway.clock import Clock, monotonic
from gateway.errors import SwitchyardError
from gateway.types import Deadline

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3  # first call included
    backoff_base_s: float = 0.005  # attempt n waits up to base * 2**(n-1), fully jittered
    backoff_max_s: float = 0.1
    budget_ratio: float = 0.1  # retries <= this share of requests in the window
    budget_window_s: float = 10.0
    budget_min_retries_per_s: float = 1.0  # floor: this many per second whatever the traffic
    min_attempt_s: float = 0.005  # no retry when less than this is left of the deadline

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        cap = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
        return rng.uniform(0.0, cap)


def retryable(exc: BaseException) -> bool:
    return isinstance(exc, SwitchyardError) and exc.retryable


class RetryBudget:
    """Counts requests and retries in a sliding window (1 s buckets); shared gateway-wide."""

    def __init__(
        self, ratio: float, window_s: float, clock: Clock = monotonic, min_per_s: float = 0.0
    ) -> None:
        self.ratio = ratio
        self.window_s = window_s
        self.clock = clock
        self.floor = min_per_s * window_s  # retries allowed in any window, traffic or not
        self._buckets: deque[list[int]] = deque()  # [second, requests, retries]

    def _bucket(self) -> list[int]:
        now = int(self.clock())
        while self._buckets and self._buckets[0][0] <= now - self.window_s:
            self._buckets.popleft()
        if not self._buckets or self._buckets[-1][0] != now:
            self._buckets.append([now, 0, 0])
        return self._buckets[-1]

    def record_request(self) -> None:
        self._bucket()[1] += 1

    def try_spend(self) -> bool:
        """Take one retry if the window allows it."""
        bucket = self._bucket()
        requests = sum(b[1] for b in self._buckets)
        retries = sum(b[2] for b in self._buckets)
        if retries + 1 > self.ratio * requests + self.floor:
            return False
        bucket[2] += 1
        return True

    def counts(self) -> tuple[int, int]:
        """(requests, retries) in the window."""
        self._bucket()
        return sum(b[1] for b in self._buckets), sum(b[2] for b in self._buckets)


class Retrier:
    """Runs an attempt function under a RetryPolicy, a shared budget and a deadline."""

    def __init__(
        self,
        policy: RetryPolicy,
        budget: RetryBudget,
        rng: random.Random | None = None,
        on_retry: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.policy = policy
        self.budget = budget
        self.rng = rng or random.Random()
        self.on_retry = on_retry

    async def call(self, attempt: Callable[[int], Awaitable[T]], deadline: Deadline) -> T:
        """``attempt(n)`` for n = 1, 2, ... until it succeeds or a bound is reached; the last
        exception propagates unchanged."""
        self.budget.record_request()
        # The first attempt runs bare: building tenacity's Retrying object costs more than
        # everything else the pool does per call, and almost every call succeeds first time.
        try:
            return await attempt(1)
        except BaseException as exc:
            if not retryable(exc) or self._stop(1, deadline):
                raise
            pause = self._wait(1, deadline)
            if self.on_retry is not None:
                self.on_retry(exc)
        await asyncio.sleep(pause)
        return await self._retry(attempt, deadline)

    def _stop(self, attempt_number: int, deadline: Deadline) -> bool:
        policy = self.policy
        if attempt_number >= policy.max_attempts:
            return True
        if deadline.remaining() < policy.min_attempt_s:
            return True
        return not self.budget.try_spend()  # last: spend only when retrying for real

    def _wait(self, attempt_number: int, deadline: Deadline) -> float:
        pause = self.policy.backoff(attempt_number, self.rng)
        return max(0.0, min(pause, deadline.remaining() - self.policy.min_attempt_s))

    async def _retry(self, attempt: Callable[[int], Awaitable[T]], deadline: Deadline) -> T:
        """Attempts 2, 3, ... under tenacity, once the first has failed and was retryable."""

        def stop(state: RetryCallState) -> bool:
            return self._stop(state.attempt_number + 1, deadline)

        def wait(state: RetryCallState) -> float:
            return self._wait(state.attempt_number + 1, deadline)

        def before_sleep(state: RetryCallState) -> None:
            if self.on_retry is not None and state.outcome is not None:
                exc = state.outcome.exception()
                if exc is not None:
                    self.on_retry(exc)

        retrying = AsyncRetrying(
            retry=retry_if_exception(retryable),
            stop=stop,
            wait=wait,
            before_sleep=before_sleep,
            reraise=True,
        )
        async for try_ in retrying:
            with try_:
                return await attempt(try_.retry_state.attempt_number + 1)
        raise AssertionError("unreachable: tenacity reraises the last error")  # pragma: no cover
