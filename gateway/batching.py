"""Opportunistic request coalescing: concurrent rows for one target share one backend call.

Each backend call costs the gateway a fixed amount of CPU (grpc.aio call setup, its poller
thread, the pool's bookkeeping) whatever its batch size. Under load, many single-row /v1
requests for the same (model, version) are in flight at once; merging them amortises that cost.

Policy, per target: while fewer than ``max_in_flight_per_target`` calls are in flight, a call
goes out at once (no added latency at low load). Otherwise its rows wait; when an in-flight
call finishes, everything waiting (up to ``max_batch`` rows) goes out as ONE stacked call, and
each caller gets the shared response plus the offset of its rows in it.

Semantics kept per request:
- deadlines: the merged call runs until the *latest* member deadline, and each member waits
  only until its own, so nobody is cut short by a neighbour nor kept past its own budget
  (a member that runs out raises DeadlineExceeded like a backend timeout would);
- errors: an error of the merged call is raised to every member, so the fallback ladder runs
  per request as before. Breakers, retries and admission sit below (in the pool) and count
  backend *calls*, as they already do for a ``/v1/predict:batch`` call;
- cancellation: a cancelled waiter's future is cancelled; the dispatcher skips it, the others
  are unaffected. The merged call runs in its own task, so no caller's cancellation stops it.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from gateway.backends.base import InferResponse
from gateway.catalog import ModelSchema
from gateway.errors import DeadlineExceeded
from gateway.resilience.deadline import Deadline

#: One backend call for stacked rows: (schema, rows, request_id, deadline) -> response.
RowCall = Callable[[ModelSchema, np.ndarray, str, Deadline], Awaitable[InferResponse]]


@dataclass(frozen=True)
class BatchingPolicy:
    enabled: bool = True
    #: Calls per (model, version) in flight before new rows wait to be merged (8 measured
    #: best: 4 added ~0.8 ms p50 at 400/s, 8 none; docs/benchmarks.md).
    max_in_flight_per_target: int = 8
    #: Rows per merged call; keep it <= the model's max_batch_size in Triton.
    max_batch: int = 256


@dataclass(eq=False, slots=True)
class _Waiter:
    rows: np.ndarray
    request_id: str
    deadline: Deadline
    future: asyncio.Future[tuple[InferResponse, int]]
    context: contextvars.Context


@dataclass(eq=False, slots=True)
class _Lane:
    schema: ModelSchema
    in_flight: int = 0
    waiting: deque[_Waiter] = field(default_factory=deque)


class Coalescer:
    """Per-target lanes in front of one backend call function (see module docstring)."""

    def __init__(self, policy: BatchingPolicy, call: RowCall) -> None:
        self.policy = policy
        self._call = call
        self._lanes: dict[tuple[str, str], _Lane] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: Backend calls made and rows they carried (merged calls only), for tests and stats.
        self.merged_calls = 0
        self.merged_rows = 0

    async def infer_rows(
        self, schema: ModelSchema, rows: np.ndarray, request_id: str, deadline: Deadline
    ) -> tuple[InferResponse, int]:
        """The response holding these rows, and the index of the first of them in it."""
        key = (schema.model, schema.version)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(schema)
        if lane.in_flight < self.policy.max_in_flight_per_target or len(rows) > 1:
            lane.in_flight += 1  # a multi-row batch already is one call: never held back
            try:
                return await self._call(schema, rows, request_id, deadline), 0
            finally:
                lane.in_flight -= 1
                self._drain(lane)
        future: asyncio.Future[tuple[InferResponse, int]] = (
            asyncio.get_running_loop().create_future()
        )
        lane.waiting.append(_Waiter(rows, request_id, deadline, future, contextvars.copy_context()))
        left = deadline.check("backend call")
        try:
            async with asyncio.timeout(left):
                return await future
        except TimeoutError:
            raise DeadlineExceeded(
                "deadline exceeded waiting for a merged backend call",
                details={"step": "backend call"},
            ) from None

    def waiting(self, model: str, version: str) -> int:
        """Rows' callers waiting to be merged for this target (tests, admin views)."""
        lane = self._lanes.get((model, version))
        return sum(not w.future.done() for w in lane.waiting) if lane else 0

    def _drain(self, lane: _Lane) -> None:
        """Send what waits in this lane as merged calls while the lane has room."""
        while lane.waiting and lane.in_flight < self.policy.max_in_flight_per_target:
            members: list[_Waiter] = []
            n = 0
            while lane.waiting and n < self.policy.max_batch:
                w = lane.waiting[0]
                if w.future.done():  # cancelled or timed out while waiting
                    lane.waiting.popleft()
                    continue
                if members and n + len(w.rows) > self.policy.max_batch:
                    break
                members.append(lane.waiting.popleft())
                n += len(w.rows)
            if not members:
                return
            lane.in_flight += 1
            # The merged call runs in the first member's context (its request_id in the logs),
            # in a task of its own so that no member's cancellation cancels it.
            task = asyncio.get_running_loop().create_task(
                self._merged(lane, members), context=members[0].context
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _merged(self, lane: _Lane, members: list[_Waiter]) -> None:
        try:
            rows = (
                members[0].rows if len(members) == 1 else np.concatenate([m.rows for m in members])
            )
            latest = max(members, key=lambda m: m.deadline.expires_at).deadline
            self.merged_calls += 1
            self.merged_rows += len(rows)
            try:
                resp = await self._call(lane.schema, rows, members[0].request_id, latest)
            except asyncio.CancelledError:  # close(): the members are cancelled with it
                for m in members:
                    m.future.cancel()
                raise
            except Exception as exc:  # the members share the call's fate
                for m in members:
                    if not m.future.done():
                        m.future.set_exception(exc)
                return
            offset = 0
            for m in members:
                if not m.future.done():
                    m.future.set_result((resp, offset))
                offset += len(m.rows)
        finally:
            lane.in_flight -= 1
            self._drain(lane)

    async def close(self) -> None:
        """Cancel merged calls still running (their members get CancelledError)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
