"""Opportunistic request coalescing: concurrent rows for one target share one backend call.

A layer of the request path (`infer(request, deadline)`), between the fallback ladder and
the pool. Each backend call costs the gateway a fixed amount of CPU (grpc.aio call setup, its
poller thread, the pool's bookkeeping) whatever its batch size. Under load, many single-row
requests (/v1, or /v2 to a catalog model) for the same (model, version) are in flight at
once; merging them amortises that cost. Only requests marked ``batchable`` (independent rows
along dimension 0, one input) are merged; anything else passes straight through.

Policy, per target, in two stages:
- the tick window (``tick_window``, on by default): a single row waits for the end of the
  current event-loop iteration, and the rows that arrived in that iteration go out as ONE
  stacked call. At low load a row is alone in its iteration and goes out by itself, one loop
  pass later (microseconds); under load the requests parsed from one batch of readable sockets
  share a call, so the merge grows with the load without a timer. It saves what a call
  costs, ~0.14 ms over gRPC and ~0.06 ms over HTTP (docs/benchmarks.md, "The framework's
  floor");
- the in-flight cap: while ``max_in_flight_per_target`` calls are in flight, rows keep
  waiting; when an in-flight call finishes, everything waiting (up to ``max_batch`` rows)
  goes out as one call. Without the tick window, a row goes out at once while the lane has
  room, in its caller's task.
Each caller gets its own rows of the shared response (numpy views, no copies).

Semantics kept per request:
- deadlines: the merged call runs until the *latest* member deadline, and each member waits
  only until its own, so nobody is cut short by a neighbour nor kept past its own budget
  (a member that runs out raises DeadlineExceeded like a backend timeout would);
- errors: an error of the merged call is raised to every member, so the fallback ladder runs
  per request as before. Breakers, retries and admission sit below (in the pool) and count
  backend *calls*, as they already do for a ``/v1/predict:batch`` call;
- cancellation: a cancelled waiter's future is cancelled; the dispatcher skips it, the others
  are unaffected. The merged call runs in its own task, so no one caller's cancellation stops
  it; once every member of a call is cancelled (callers gone), the call is cancelled too,
  which frees its admission slot as a direct call's cancellation would. A member out of time
  does not cancel the call: that runs to its own deadline, where the pool counts a hung
  server's timeout against it.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from gateway.errors import ClientError, DeadlineExceeded
from gateway.types import Deadline, InferRequest, InferResponse, Tensor


class InferLayer(Protocol):
    async def infer(self, request: InferRequest, deadline: Deadline) -> InferResponse: ...


@dataclass(frozen=True)
class BatchingPolicy:
    enabled: bool = True
    #: Calls per (model, version) in flight before new rows wait to be merged: a bound for
    #: overload, out of reach at moderate load. 8 was measured best before the tick window;
    #: with it, 8 bound at half load (Triton's 5 ms batching delay keeps ~7 one-row calls in
    #: flight at 1,000/s) and its wait added p99; 64 costs no CPU at saturation
    #: (docs/benchmarks.md, round 3).
    max_in_flight_per_target: int = 64
    #: Rows per merged call; keep it <= the model's max_batch_size in Triton.
    max_batch: int = 256
    #: Single rows wait for the end of the loop iteration they arrived in, and go out with
    #: the rows that arrived with them (module docstring).
    tick_window: bool = True


@dataclass(eq=False, slots=True)
class _Waiter:
    request: InferRequest
    deadline: Deadline
    future: asyncio.Future[tuple[InferResponse, int]]
    context: contextvars.Context
    #: The call carrying this row once it is sent, and everyone it carries.
    call: asyncio.Task[None] | None = None
    members: list[_Waiter] | None = None

    @property
    def rows(self) -> int:
        return len(self.request.inputs[0].data)


@dataclass(eq=False, slots=True)
class _Lane:
    in_flight: int = 0
    waiting: deque[_Waiter] = field(default_factory=deque)
    tick_pending: bool = False

    @property
    def idle(self) -> bool:
        """Nothing in flight, waiting or about to be drained: no caller holds this lane."""
        return not self.in_flight and not self.waiting and not self.tick_pending


#: Lanes at which the idle ones are forgotten: far above the (target, outputs) pairs a
#: deployment has, so a sweep is rare and the hot path only pays a len().
_SWEEP_AT = 1024


#: Requests that may share a call: same target, input name, dtype, row shape and outputs.
_LaneKey = tuple[str, str, str, str, tuple[int, ...], tuple[str, ...]]


class Coalescer:
    """Per-target lanes in front of the next layer (see module docstring)."""

    def __init__(self, policy: BatchingPolicy, inner: InferLayer) -> None:
        self.policy = policy
        self.inner = inner
        self._lanes: dict[_LaneKey, _Lane] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: Backend calls that carried more than one request, and their rows, for stats.
        self.merged_calls = 0
        self.merged_rows = 0

    async def infer(self, request: InferRequest, deadline: Deadline) -> InferResponse:
        if not self.policy.enabled or not request.batchable or len(request.inputs) != 1:
            return await self.inner.infer(request, deadline)
        t = request.inputs[0]
        key = (request.model, request.version, t.name, t.datatype, t.data.shape[1:],
               request.outputs)  # fmt: skip
        lane = self._lanes.get(key)
        if lane is None:
            if len(self._lanes) >= _SWEEP_AT:
                self._sweep()
            lane = self._lanes[key] = _Lane()
        room = lane.in_flight < self.policy.max_in_flight_per_target
        if len(t.data) > 1 or (room and not self.policy.tick_window):
            lane.in_flight += 1  # a multi-row batch already is one call: never held back
            try:
                return await self.inner.infer(request, deadline)
            finally:
                lane.in_flight -= 1
                self._drain(lane)
        left = deadline.check("backend call")  # out of time: it never joins the lane
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[InferResponse, int]] = loop.create_future()
        waiter = _Waiter(request, deadline, future, contextvars.copy_context())
        lane.waiting.append(waiter)
        if room and not lane.tick_pending:  # full lanes are drained by their calls' ends
            lane.tick_pending = True
            loop.call_soon(self._tick, lane)
        # One timer handle, not asyncio.timeout(): that is a context manager, a Timeout and a
        # reschedule per request, ~2 % of a prediction's CPU (docs/benchmarks.md, round 3).
        timer = loop.call_later(left, _expire, future)
        try:
            resp, offset = await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                future.exception()  # expired as we were cancelled: retrieved, not reported
            self._abandon(waiter)
            raise
        finally:
            timer.cancel()
        if offset < 0:  # the call carried this request alone: its response as it came
            return resp
        return _rows_of(resp, offset, len(t.data), request.request_id)

    def _sweep(self) -> None:
        """Forget the idle lanes. A lane's key holds the output names the client asked for,
        so lanes kept forever would grow with every name a client makes up (each refused
        downstream, each leaving its lane behind)."""
        for key in [k for k, la in self._lanes.items() if la.idle]:
            del self._lanes[key]

    def _tick(self, lane: _Lane) -> None:
        lane.tick_pending = False
        self._drain(lane)

    @staticmethod
    def _abandon(waiter: _Waiter) -> None:
        """A caller went away: once no member of its call is left waiting, stop the call."""
        call, members = waiter.call, waiter.members
        if call is None or members is None or call.done():
            return
        if all(m.future.cancelled() for m in members):
            call.cancel()

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
                if members and n + w.rows > self.policy.max_batch:
                    break
                members.append(lane.waiting.popleft())
                n += w.rows
            if not members:
                return
            lane.in_flight += 1
            # The merged call runs in the first member's context (its request_id in the logs),
            # in a task of its own so that no member's cancellation cancels it.
            task = asyncio.get_running_loop().create_task(
                self._merged(lane, members), context=members[0].context
            )
            for m in members:
                m.call, m.members = task, members
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _merged(self, lane: _Lane, members: list[_Waiter]) -> None:
        try:
            first = members[0].request
            if len(members) == 1:
                request = first
            else:
                t = first.inputs[0]
                rows = np.concatenate([m.request.inputs[0].data for m in members])
                request = InferRequest(
                    first.model, first.version, (Tensor(t.name, t.datatype, rows),),
                    first.outputs, first.request_id, first.parameters, first.priority, True,
                    first.policy,
                )  # fmt: skip
            latest = max(members, key=lambda m: m.deadline.expires_at).deadline
            if len(members) > 1:
                self.merged_calls += 1
                self.merged_rows += sum(m.rows for m in members)
            try:
                try:
                    resp = await self.inner.infer(request, latest)
                except ClientError:
                    if len(members) == 1:
                        raise
                    # The input's fault, not the call's: one member's bad row (Triton refuses
                    # a whole request for it) must not fail the rows merged with it. Each is
                    # asked again alone, under its own deadline, and gets its own outcome.
                    await self._each_alone(members)
                    return
            except asyncio.CancelledError:  # close(): the members are cancelled with it
                for m in members:
                    m.future.cancel()
                raise
            except Exception as exc:  # a server's failure: the members share the call's fate
                for m in members:
                    if not m.future.done():
                        m.future.set_exception(exc)
                return
            if len(members) == 1:
                if not members[0].future.done():
                    members[0].future.set_result((resp, _WHOLE))
                return
            offset = 0
            for m in members:
                if not m.future.done():
                    m.future.set_result((resp, offset))
                offset += m.rows
        finally:
            # Each member points at the call and at the member list, itself included: a
            # reference cycle per request that only the collector frees, in pauses that grew
            # with the load (12 objects a request, gen0 pauses of 4-7 ms at 1,550/s). Cut it,
            # so a request's objects go the moment its caller is done with them.
            for m in members:
                m.call = m.members = None
            lane.in_flight -= 1
            self._drain(lane)

    async def _each_alone(self, members: list[_Waiter]) -> None:
        async def one(m: _Waiter) -> None:
            try:
                resp = await self.inner.infer(m.request, m.deadline)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not m.future.done():
                    m.future.set_exception(exc)
            else:
                if not m.future.done():
                    m.future.set_result((resp, _WHOLE))

        loop = asyncio.get_running_loop()  # each in its own caller's context (request_id)
        await asyncio.gather(
            *(loop.create_task(one(m), context=m.context) for m in members if not m.future.done())
        )

    async def close(self) -> None:
        """Cancel merged calls still running (their members get CancelledError)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


#: The offset a lone member gets: the whole response is its own.
_WHOLE = -1


def _expire(future: asyncio.Future[tuple[InferResponse, int]]) -> None:
    """A member's own deadline passed before its call answered. Not abandoned: the call runs
    to its own deadline (the latest member's), where a hung server's timeout is counted
    against it (breaker) instead of cancelled away."""
    if not future.done():
        future.set_exception(DeadlineExceeded(
            "deadline exceeded waiting for a merged backend call",
            details={"step": "backend call"}))  # fmt: skip


def _rows_of(resp: InferResponse, offset: int, n: int, request_id: str) -> InferResponse:
    """One member's rows of a merged response (views; outputs without a batch dim as is)."""
    outputs = {
        name: Tensor(name, t.datatype, t.data[offset : offset + n]) if t.data.ndim else t
        for name, t in resp.outputs.items()
    }
    return InferResponse(resp.model, resp.version, outputs, request_id, resp.parameters)
