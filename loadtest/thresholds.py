"""Pass/fail thresholds of a locust run, and load-shape stages, kept free of locust imports
(locust monkey-patches the standard library with gevent at import) so they are unit-tested."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Thresholds:
    """A run fails when its p99 (ms) or its error rate exceeds these; None disables one."""

    max_p99_ms: float | None = None
    max_error_rate: float | None = None
    min_requests: int = 1  # a run that sent nothing proves nothing

    def check(self, requests: int, failures: int, p99_ms: float) -> list[str]:
        """The reasons the run failed; empty when it passed."""
        reasons = []
        if requests < self.min_requests:
            reasons.append(f"only {requests} requests (need at least {self.min_requests})")
            return reasons
        rate = failures / requests
        if self.max_error_rate is not None and rate > self.max_error_rate:
            reasons.append(f"error rate {rate:.4%} > {self.max_error_rate:.4%}")
        if self.max_p99_ms is not None and p99_ms > self.max_p99_ms:
            reasons.append(f"p99 {p99_ms:.0f} ms > {self.max_p99_ms:.0f} ms")
        return reasons


@dataclass(frozen=True)
class Stage:
    """Hold ``users`` (reached at ``spawn_rate`` per second) until ``until_s`` into the run."""

    until_s: float
    users: int
    spawn_rate: float


def parse_stages(text: str) -> list[Stage]:
    """``"30:10:5, 60:100:50"`` -> stages (until_s:users:spawn_rate), strictly increasing."""
    stages = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            until, users, rate = part.split(":")
            stage = Stage(float(until), int(users), float(rate))
        except ValueError:
            raise ValueError(f"stage {part!r} is not until_s:users:spawn_rate") from None
        if stage.users < 0 or stage.spawn_rate <= 0:
            raise ValueError(f"stage {part!r}: users >= 0 and spawn_rate > 0")
        if stages and stage.until_s <= stages[-1].until_s:
            raise ValueError(f"stage {part!r} does not end after the one before")
        stages.append(stage)
    return stages


def stage_at(stages: list[Stage], run_time_s: float) -> Stage | None:
    """The stage in force at ``run_time_s``; None once the last one ended (the run stops)."""
    for stage in stages:
        if run_time_s < stage.until_s:
            return stage
    return None
