"""The ground floor: value types every layer of the request path shares.

    adapters (REST /v1, REST /v2, gRPC)
      -> Service -> FallbackLadder -> Coalescer -> Pool -> TritonBackend

Every layer offers ``infer(request: InferRequest, deadline: Deadline) -> InferResponse``.
This module imports nothing of the gateway but `errors`, so any layer can import it and no
layer needs to import one above itself to name what it passes down.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.clock import Clock, monotonic
from gateway.errors import DeadlineExceeded


@dataclass(frozen=True, slots=True)
class Tensor:
    """A named array with its Triton datatype; BYTES tensors hold numpy object arrays of bytes."""

    name: str
    datatype: str
    data: np.ndarray

    @property
    def shape(self) -> list[int]:
        return list(self.data.shape)


@dataclass(frozen=True, slots=True)
class Target:
    """One model version a request can be sent to."""

    model: str
    version: str

    def __str__(self) -> str:
        return f"{self.model}@{self.version}"


@dataclass(frozen=True, slots=True)
class Deadline:
    """One time budget per request: every awaited step spends from it."""

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

    def shortened(self, seconds: float) -> Deadline:
        """This deadline, ``seconds`` earlier (a share held back for a later step)."""
        return Deadline(self.expires_at - seconds, self.clock)


@dataclass(frozen=True, slots=True)
class HedgeSpec:
    """A route's hedging (route file ``hedge: {after: p95, max_ratio: 0.05}``): once the
    target's rolling ``quantile`` (or a fixed ``after_ms``) passes without an answer, the Pool
    sends a duplicate to another ready replica; at most ``max_ratio`` of requests hedge."""

    quantile: float | None = 0.95
    after_ms: float | None = None
    max_ratio: float = 0.05


@dataclass(frozen=True, slots=True)
class CallPolicy:
    """What a route decides for every call it plans, as one value the layers below read.

    The Service attaches it to the request; the FallbackLadder reads the ladder and the
    latency trigger, the Pool reads the timeout floor. Built once per route file load.
    """

    route: str
    policy_version: str
    fallback: Target | None = None
    cache_ttl_s: float = 0.0  # the cache rung: the last answer for the same input
    default: Mapping[str, Any] | None = None  # the default rung: a static scalar answer
    response_cache_ttl_s: float = 0.0  # answer from the cache before the primary (off: 0)
    p99_ms: float | None = None  # the route's SLO: latency trigger and timeout floor
    hedge: HedgeSpec | None = None  # the Pool hedges this route's calls (off: None)

    @property
    def has_ladder(self) -> bool:
        return self.fallback is not None or self.default is not None or self.cache_ttl_s > 0


@dataclass(frozen=True, slots=True)
class InferRequest:
    model: str
    version: str  # "" lets the server pick (its version policy's latest)
    inputs: tuple[Tensor, ...]
    outputs: tuple[str, ...] = ()  # empty: every output of the model
    request_id: str = ""
    #: The client's request-level parameters (entity_id, segment, priority, ...).
    parameters: Mapping[str, Any] = field(default_factory=dict)
    #: Triton priority level (0: the model's default); set only where the model has levels.
    priority: int = 0
    #: Rows along dimension 0 are independent (a catalog model's feature rows), so the
    #: coalescer may stack this request with others for the same target.
    batchable: bool = False
    #: The route's policy (None: a model without a route, straight through).
    policy: CallPolicy | None = None
    #: Input digests, computed once by the Service: one per row when rows are independent,
    #: else one; the ladder's cache keys and the prediction log's input_hash.
    cache_keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class InferResponse:
    model: str
    version: str
    outputs: Mapping[str, Tensor]
    request_id: str = ""
    #: What the gateway adds to an OIP response's ``parameters``: policy_version,
    #: fallback_used, request_id. Empty straight from a backend.
    parameters: Mapping[str, Any] = field(default_factory=dict)

    @property
    def fallback_used(self) -> str | None:
        rung = self.parameters.get("fallback_used")
        return str(rung) if rung else None
