"""Injectable time, so breakers, deadlines and windows test deterministically."""

from __future__ import annotations

import time
from collections.abc import Callable

#: A monotonic clock in seconds. Production code takes one as an argument; tests pass a fake.
Clock = Callable[[], float]

monotonic: Clock = time.monotonic


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
