"""Latency statistics and open-loop arrival schedules for the benchmark (no I/O here, so the
numbers the benchmark prints are unit-tested)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.stats import percentile

QUANTILES = (0.5, 0.9, 0.99, 0.999)

__all__ = ["QUANTILES", "Summary", "percentile"]


@dataclass(frozen=True)
class Summary:
    """What one phase of the benchmark measured. Latencies are in milliseconds."""

    requests: int
    errors: int
    elapsed_s: float
    p50: float
    p90: float
    p99: float
    p999: float
    mean: float

    @property
    def throughput(self) -> float:
        """Successful requests per second."""
        return (self.requests - self.errors) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def summarize(latencies_ms: Sequence[float], errors: int, elapsed_s: float) -> Summary:
    """Summarize successful requests' latencies; ``errors`` failed on top of them."""
    values = sorted(latencies_ms)
    p50, p90, p99, p999 = (percentile(values, q) for q in QUANTILES)
    mean = sum(values) / len(values) if values else math.nan
    return Summary(len(values) + errors, errors, elapsed_s, p50, p90, p99, p999, mean)


def open_loop_schedule(
    rate_per_s: float, duration_s: float, rng: random.Random | None = None
) -> list[float]:
    """Send times (seconds from the start) for an open-loop run at ``rate_per_s``.

    With ``rng``, inter-arrival gaps are exponential (a Poisson process, how independent
    clients arrive); without, they are constant. Either way the times are fixed before the run
    starts and latency is measured from the scheduled time, so a slow server cannot slow the
    generator down and hide its own queueing (coordinated omission).
    """
    if rate_per_s <= 0 or duration_s <= 0:
        raise ValueError("rate and duration must be positive")
    times: list[float] = []
    if rng is None:
        n = int(rate_per_s * duration_s)
        return [i / rate_per_s for i in range(n)]
    t = rng.expovariate(rate_per_s)
    while t < duration_s:
        times.append(t)
        t += rng.expovariate(rate_per_s)
    return times


def split_schedule(times: Sequence[float], parts: int) -> list[list[float]]:
    """Deal a schedule round-robin to ``parts`` generator processes: each gets an even share
    spread over the whole run (not one contiguous slice)."""
    return [list(times[i::parts]) for i in range(parts)]
