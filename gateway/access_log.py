"""Which requests get an access line: every error and every slow request, and fast successes
up to a budget of lines per second; the fast successes over the budget are counted, not
written.

At saturation one structlog JSON line costs ~8 us of Python per request (render, timestamp,
the write) and was ~5 % of the gateway's CPU per prediction in a py-spy profile
(docs/benchmarks.md, issue 15). Every request is already counted and timed by the Prometheus
metrics, so above a few hundred requests per second the lines of fast successes add cost,
not information. The budget is a one-second window on an injectable clock: below the budget
every line is written, as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from gateway.clock import Clock, monotonic


class _Inc(Protocol):
    def inc(self, amount: float = 1) -> None: ...


@dataclass(frozen=True)
class AccessLogPolicy:
    #: Lines per second for fast successes (status < 400, under slow_ms); 0: every line.
    max_lines_per_s: int = 0
    #: A request at least this slow is always logged, whatever the budget.
    slow_ms: float = 250.0


class AccessSampler:
    """Decides per request whether its access line is written (see module docstring)."""

    def __init__(
        self, policy: AccessLogPolicy, clock: Clock = monotonic, skipped: _Inc | None = None
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.skipped = skipped
        self._window_ends = -math.inf
        self._used = 0

    def keep(self, status: int, latency_ms: float) -> bool:
        budget = self.policy.max_lines_per_s
        if budget <= 0 or status >= 400 or latency_ms >= self.policy.slow_ms:
            return True
        now = self.clock()
        if now >= self._window_ends:
            self._window_ends = now + 1.0
            self._used = 0
        if self._used < budget:
            self._used += 1
            return True
        if self.skipped is not None:
            self.skipped.inc()
        return False
