"""How loaded one pool member is: Triton's own queue and timings plus the gateway's in-flight.

The gateway's in-flight count alone is blind to what Triton holds from other gateway replicas
and to a server that is simply slower. Every scrape (about every 250 ms) of a server's
/metrics gives its pending requests (a gauge) and, between two scrapes, the mean time a
request spent queued plus computing. The score estimates how long a new call would wait:

    score = (max(in_flight, pending) + 1) * service_s

where ``service_s`` is the larger of Triton's mean (queue + compute) per request and this
pool's own peak-EWMA of the member's call latency (Finagle's "peak EWMA": a slow answer
raises it at once, fast ones bring it down with a ``decay_s`` time constant). Triton's
counters see only time inside Triton; the observed latency also catches a server that
stalls as a whole (stopped, throttled, its network slow), which its counters miss.

A server whose metrics cannot be read (stalled, or gone) ranks after every server that
answers (among themselves, by in-flight). Without any scrape yet (or
no metrics URL) a server is charged ``default_service_s``, which the pool sets to half its
typical service time: a new member is tried soon (its first answers measure it) without
taking every call, and with nothing measured anywhere members are ordered by in-flight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.triton_metrics import ServerCounters

__all__ = ["ServerLoad", "load_score"]

_FAILING = 1e9  # above any real score: seconds of expected wait


@dataclass
class ServerLoad:
    """What the last scrapes said of one server; updated by the pool's scrape loop."""

    pending: float = 0.0
    mean_service_s: float | None = None  # (queue + compute) per request, last interval
    failing: bool = False
    ewma_s: float | None = None  # peak-EWMA of observed call latency
    decay_s: float = 1.0
    _last: ServerCounters | None = None
    _observed_at: float = 0.0

    def observe(self, seconds: float, now: float) -> None:
        """One call's latency as the pool saw it."""
        if self.ewma_s is None or seconds > self.ewma_s:
            self.ewma_s = seconds
        else:
            w = math.exp(-max(0.0, now - self._observed_at) / self.decay_s)
            self.ewma_s = self.ewma_s * w + seconds * (1.0 - w)
        self._observed_at = now

    def service_s(self) -> float | None:
        """The estimate of one call's time, or None with nothing measured yet."""
        known = [x for x in (self.mean_service_s, self.ewma_s) if x is not None]
        return max(known) if known else None

    def update(self, now: ServerCounters) -> None:
        before = self._last
        self.failing = False
        self.pending = now.pending
        if before is not None and now.requests >= before.requests:
            requests = now.requests - before.requests
            if requests > 0:
                busy_us = (now.queue_us - before.queue_us) + (now.compute_us - before.compute_us)
                self.mean_service_s = max(0.0, busy_us) / requests / 1e6
        self._last = now  # a restart (counters fell) starts the next interval afresh

    def fail(self) -> None:
        self.failing = True


def load_score(load: ServerLoad, in_flight: int, default_service_s: float = 1.0) -> float:
    """Lower is better; comparable across members of one pool."""
    if load.failing:
        return _FAILING + in_flight
    service_s = load.service_s()
    if service_s is None:
        service_s = default_service_s
    # A floor so a server measured at ~0 s is still ordered by its queue.
    return (max(in_flight, load.pending) + 1) * max(service_s, 1e-6)
