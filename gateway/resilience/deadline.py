"""One time budget per request: every awaited step spends from it."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.clock import Clock, monotonic
from gateway.errors import DeadlineExceeded


@dataclass(frozen=True, slots=True)
class Deadline:
    expires_at: float
    clock: Clock = monotonic

    @classmethod
    def after(cls, seconds: float, clock: Clock = monotonic) -> Deadline:
        return cls(clock() + seconds, clock)

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self.expires_at - self.clock())

    def expired(self) -> bool:
        return self.clock() >= self.expires_at

    def check(self, step: str) -> float:
        """Seconds left, or DeadlineExceeded naming the step that found none."""
        left = self.expires_at - self.clock()
        if left <= 0:
            raise DeadlineExceeded(f"deadline exceeded before {step}", details={"step": step})
        return left
