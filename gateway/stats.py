"""The one definition of a percentile the gateway reports or decides on.

Nearest rank, never interpolated: p99 of 1,000 samples is the 990th smallest, a latency that
was really observed. The latency trigger, the rollout controller's gates and the benchmarks
all use this, so "p99" means the same number everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in [0, 1]): the smallest value with
    at least q of the samples at or below it; NaN for no samples."""
    if not sorted_values:
        return math.nan
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is outside [0, 1]")
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def p99(values: Sequence[float]) -> float | None:
    """The nearest-rank 99th percentile of unsorted values, or None for no samples."""
    return percentile(sorted(values), 0.99) if values else None
