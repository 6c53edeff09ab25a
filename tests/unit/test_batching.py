"""Request coalescing (gateway/batching.py): single rows to one target that arrive in one loop
iteration share a backend call, and so do rows that wait while enough calls are in flight;
answers, errors, cancellation and deadlines stay per request. Gated fake calls, no timing."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import io
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from gateway.app import SERVICE, build_app
from gateway.backends.base import InferRequest, InferResponse
from gateway.batching import _SWEEP_AT, BatchingPolicy, Coalescer
from gateway.catalog import ModelSchema
from gateway.clock import FakeClock, monotonic
from gateway.errors import BackendError, ClientError, DeadlineExceeded
from gateway.tensors import Tensor
from gateway.types import Deadline
from tests.unit.fake_backend import FakeBackend
from tests.unit.fakes import toy_backend, write_repo

SCHEMA = ModelSchema("toy", "2", "features", "FP32", ("a", "b", "c"), ("score",))


class GatedCall:
    """A backend call that answers 2 * rows once the gate opens; records every call's rows."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.calls: list[np.ndarray] = []
        self.fail: Exception | None = None

    async def infer(self, request: InferRequest, deadline: Deadline) -> InferResponse:
        rows = request.inputs[0].data
        self.calls.append(rows)
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return InferResponse(
            "toy", "2", {"score": Tensor("score", "FP32", rows * 2)}, request.request_id
        )


def waiting(co: Coalescer, model: str = "toy", version: str = "2") -> int:
    """Callers waiting to be merged for this target (read from the lanes' queues)."""
    return sum(
        not w.future.done()
        for key, lane in co._lanes.items()
        if key[:2] == (model, version)
        for w in lane.waiting
    )


async def until(cond: Callable[[], bool], steps: int = 1000) -> None:
    """Yield to the loop until ``cond`` holds (bounded: no sleeps as synchronisation)."""
    for _ in range(steps):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


def row(i: float) -> np.ndarray:
    return np.array([[i, i + 0.5, -i]], dtype=np.float32)


def deadline(seconds: float = 5.0, clock: FakeClock | None = None) -> Deadline:
    return Deadline.after(seconds, clock or FakeClock())


def start(co: Coalescer, i: float, d: Deadline | None = None) -> asyncio.Task:
    request = SCHEMA.infer_request(row(i), f"r{i}")
    return asyncio.create_task(co.infer(request, d or deadline()))


def answer(result: InferResponse) -> np.ndarray:
    assert len(result.outputs["score"].data) == 1  # each caller gets its own rows only
    return result.outputs["score"].data[0]


async def test_without_the_tick_window_low_load_calls_go_at_once_unmerged() -> None:
    call = GatedCall()
    co = Coalescer(BatchingPolicy(True, max_in_flight_per_target=2, tick_window=False), call)
    a, b = start(co, 1), start(co, 2)
    await until(lambda: len(call.calls) == 2)  # both went out before any answer came back
    assert waiting(co) == 0
    call.gate.set()
    assert answer(await a) == pytest.approx(row(1)[0] * 2)
    assert answer(await b) == pytest.approx(row(2)[0] * 2)
    assert co.merged_calls == 0


async def test_rows_that_arrive_in_one_iteration_share_one_call() -> None:
    call = GatedCall()
    co = Coalescer(BatchingPolicy(True, max_in_flight_per_target=8), call)
    tasks = [start(co, i) for i in (1, 2, 3)]  # all three reach the coalescer in one pass
    await until(lambda: len(call.calls) == 1)
    call.gate.set()
    results = await asyncio.gather(*tasks)
    assert [len(c) for c in call.calls] == [3]
    for i, result in zip((1, 2, 3), results, strict=True):
        assert answer(result) == pytest.approx(row(i)[0] * 2)


async def test_a_lone_row_goes_out_alone_and_does_not_wait_for_a_call_to_end() -> None:
    call = GatedCall()
    co = Coalescer(BatchingPolicy(True, max_in_flight_per_target=8), call)
    a = start(co, 1)
    await until(lambda: len(call.calls) == 1)
    b = start(co, 2)  # a later iteration, while the first call is still out: room, so it goes
    await until(lambda: len(call.calls) == 2)
    assert [len(c) for c in call.calls] == [1, 1]
    call.gate.set()
    assert answer(await a) == pytest.approx(row(1)[0] * 2)
    assert answer(await b) == pytest.approx(row(2)[0] * 2)


class CancellableCall(GatedCall):
    """A GatedCall that records the calls that were cancelled while held at the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled = 0

    async def infer(self, request: InferRequest, deadline: Deadline) -> InferResponse:
        try:
            return await super().infer(request, deadline)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


async def test_a_call_is_cancelled_once_every_member_is_gone() -> None:
    call = CancellableCall()
    co = Coalescer(BatchingPolicy(True, max_in_flight_per_target=8), call)
    a, b = start(co, 1), start(co, 2)
    await until(lambda: len(call.calls) == 1)
    a.cancel()
    await until(lambda: a.done())
    for _ in range(5):  # give a wrongly cancelled call the chance to show
        await asyncio.sleep(0)
    assert call.cancelled == 0  # b still waits for it
    b.cancel()
    await until(lambda: call.cancelled == 1)  # a disconnect frees the backend call
    assert a.cancelled() and b.cancelled()
    lone = start(co, 3)
    await until(lambda: len(call.calls) == 2)
    lone.cancel()
    await until(lambda: call.cancelled == 2)  # a lone row's call goes with its caller


async def test_a_member_out_of_time_leaves_its_call_to_its_own_deadline() -> None:
    """A timed-out waiter must not cancel the call: the pool's own timeout of that call is what
    counts a hung server against its breaker (tests/unit/test_core.py)."""
    call = CancellableCall()
    co = Coalescer(BatchingPolicy(True, max_in_flight_per_target=8), call)
    task = start(co, 1, Deadline.after(0.02, monotonic))  # its wait runs on the loop's clock
    with pytest.raises(DeadlineExceeded):
        await task
    assert call.cancelled == 0 and len(call.calls) == 1
    call.gate.set()
    await until(lambda: not co._tasks)  # the call ended by itself
    assert call.cancelled == 0


async def test_waiting_rows_go_out_as_one_call_and_map_back() -> None:
    call = GatedCall()
    co = Coalescer(BatchingPolicy(True, max_in_flight_per_target=1), call)
    first = start(co, 0)
    await until(lambda: len(call.calls) == 1)
    others = [start(co, i) for i in (1, 2, 3)]
    await until(lambda: waiting(co) == 3)
    assert len(call.calls) == 1  # held back while the lane is full
    call.gate.set()
    results = await asyncio.gather(first, *others)
    assert [len(c) for c in call.calls] == [1, 3]
    for i, result in zip((0, 1, 2, 3), results, strict=True):
        assert answer(result) == pytest.approx(row(i)[0] * 2)
    assert (co.merged_calls, co.merged_rows) == (1, 3)


async def test_max_batch_splits_the_waiting_rows() -> None:
    call = GatedCall()
    co = Coalescer(BatchingPolicy(True, max_in_flight_per_target=1, max_batch=2), call)
    first = start(co, 0)
    await until(lambda: len(call.calls) == 1)
    others = [start(co, i) for i in (1, 2, 3)]
    await until(lambda: waiting(co) == 3)
    call.gate.set()
    results = await asyncio.gather(first, *others)
    assert [len(c) for c in call.calls] == [1, 2, 1]
    for i, result in zip((0, 1, 2, 3), results, strict=True):
        assert answer(result) == pytest.approx(row(i)[0] * 2)


async def test_batch_rows_are_never_held_back() -> None:
    call = GatedCall()
    co = Coalescer(BatchingPolicy(True, max_in_flight_per_target=1), call)
    first = start(co, 0)
    await until(lambda: len(call.calls) == 1)
    rows = np.concatenate([row(1), row(2)])
    batch = asyncio.create_task(co.infer(SCHEMA.infer_request(rows, "b"), deadline()))
    await until(lambda: len(call.calls) == 2)  # went out although the lane was full
    call.gate.set()
    await first
    resp = await batch
    assert resp.outputs["score"].data.shape == (2, 3)


async def test_an_error_of_the_merged_call_reaches_every_member() -> None:
    call = GatedCall()
    co = Coalescer(BatchingPolicy(True, max_in_flight_per_target=1), call)
    first = start(co, 0)
    await until(lambda: len(call.calls) == 1)
    others = [start(co, i) for i in (1, 2)]
    await until(lambda: waiting(co) == 2)
    call.fail = BackendError("triton said no")
    call.gate.set()
    results = await asyncio.gather(first, *others, return_exceptions=True)
    assert len(call.calls) == 2
    assert all(isinstance(r, BackendError) for r in results)


class RowCheckingCall:
    """A model that validates each call's rows and refuses the whole call when one row is
    bad (a negative first feature), as Triton does for one request's bad input."""

    def __init__(self) -> None:
        self.calls: list[np.ndarray] = []

    async def infer(self, request: InferRequest, deadline: Deadline) -> InferResponse:
        rows = request.inputs[0].data
        self.calls.append(rows)
        await asyncio.sleep(0)
        if (rows[:, 0] < 0).any():
            raise ClientError("features must be non-negative", code="invalid_tensor")
        return InferResponse(
            "toy", "2", {"score": Tensor("score", "FP32", rows * 2)}, request.request_id
        )


async def test_one_members_bad_input_fails_that_member_alone() -> None:
    """A client error of a merged call is the input's, not the call's: each member is asked
    again on its own, so the bad row's caller gets the error and the others their answers."""
    call = RowCheckingCall()
    co = Coalescer(BatchingPolicy(True, max_in_flight_per_target=8), call)
    tasks = [start(co, i) for i in (1, -2, 3)]  # one loop pass: one merged call
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert len(call.calls[0]) == 3  # they were merged first
    assert isinstance(results[1], ClientError)
    assert answer(results[0]) == pytest.approx(row(1)[0] * 2)
    assert answer(results[2]) == pytest.approx(row(3)[0] * 2)
    assert sorted(len(c) for c in call.calls[1:]) == [1, 1, 1]  # then each alone, once


async def test_lanes_of_made_up_output_names_do_not_pile_up() -> None:
    """A lane's key holds the outputs the client names. Names a client makes up are refused
    downstream; their lanes must not stay behind, or memory grows with every new name."""
    call = RowCheckingCall()
    co = Coalescer(BatchingPolicy(True, max_in_flight_per_target=8), call)
    for i in range(3 * _SWEEP_AT):
        request = dataclasses.replace(SCHEMA.infer_request(row(1), f"r{i}"), outputs=(f"o{i}",))
        await co.infer(request, deadline())
    assert len(call.calls) == 3 * _SWEEP_AT
    assert len(co._lanes) <= _SWEEP_AT


async def test_a_cancelled_waiter_does_not_break_the_others() -> None:
    call = GatedCall()
    co = Coalescer(BatchingPolicy(True, max_in_flight_per_target=1), call)
    first = start(co, 0)
    await until(lambda: len(call.calls) == 1)
    a, b, c = start(co, 1), start(co, 2), start(co, 3)
    await until(lambda: waiting(co) == 3)
    b.cancel()
    await until(lambda: waiting(co) == 2)
    call.gate.clear()
    call.gate.set()
    await first
    assert answer(await a) == pytest.approx(row(1)[0] * 2)
    assert answer(await c) == pytest.approx(row(3)[0] * 2)
    assert b.cancelled()
    assert [len(x) for x in call.calls] == [1, 2]  # the cancelled row was not sent


async def test_cancelling_a_member_of_a_running_merged_call_spares_the_rest() -> None:
    call = GatedCall()
    co = Coalescer(BatchingPolicy(True, max_in_flight_per_target=1), call)
    first = start(co, 0)
    await until(lambda: len(call.calls) == 1)
    a, b = start(co, 1), start(co, 2)
    await until(lambda: waiting(co) == 2)
    # Let the first call answer, but hold the merged one at the gate.
    call.gate.set()
    await first
    call.gate.clear()
    await until(lambda: len(call.calls) == 2)
    a.cancel()
    await until(lambda: a.done())
    call.gate.set()
    assert answer(await b) == pytest.approx(row(2)[0] * 2)
    assert a.cancelled()


async def test_a_waiter_out_of_time_fails_alone() -> None:
    clock = FakeClock()
    call = GatedCall()
    co = Coalescer(BatchingPolicy(True, max_in_flight_per_target=1), call)
    first = start(co, 0)
    await until(lambda: len(call.calls) == 1)
    late = start(co, 1, Deadline.after(0.0, clock))  # no time left at all
    ok = start(co, 2)
    with pytest.raises(DeadlineExceeded):
        await late
    call.gate.set()
    await first
    assert answer(await ok) == pytest.approx(row(2)[0] * 2)


async def test_a_row_out_of_time_never_joins_a_lane() -> None:
    """It fails at once; before, it joined the lane, failed, and was still sent to Triton."""
    call = GatedCall()
    co = Coalescer(BatchingPolicy(True, max_in_flight_per_target=8), call)
    late = start(co, 1, Deadline.after(0.0, FakeClock()))
    ok = start(co, 2)
    with pytest.raises(DeadlineExceeded):
        await late
    await until(lambda: len(call.calls) == 1)
    call.gate.set()
    assert answer(await ok) == pytest.approx(row(2)[0] * 2)
    assert [len(c) for c in call.calls] == [1]  # only the row with time left went out


async def test_a_lone_rows_response_is_passed_on_as_it_came() -> None:
    """A call that carried one request needs no per-member slicing: no copy of its outputs."""
    call = GatedCall()
    call.gate.set()
    co = Coalescer(BatchingPolicy(True, max_in_flight_per_target=8), call)
    seen: list[InferResponse] = []
    real = call.infer

    async def spy(request: InferRequest, d: Deadline) -> InferResponse:
        seen.append(await real(request, d))
        return seen[-1]

    call.infer = spy  # type: ignore[method-assign]
    result = await start(co, 3)
    assert result is seen[0]
    assert answer(result) == pytest.approx(row(3)[0] * 2)


class GatedBackend(FakeBackend):
    """The toy FakeBackend, holding every call until the gate opens."""

    gate: asyncio.Event

    async def infer(self, request: InferRequest, deadline: Deadline) -> InferResponse:
        await self.gate.wait()
        return await super().infer(request, deadline)


async def test_service_merges_concurrent_predictions_and_answers_each(
    tmp_path: Path, aiohttp_client: Callable[..., Awaitable]
) -> None:
    backend = toy_backend()
    backend.__class__ = GatedBackend
    gated: GatedBackend = backend  # type: ignore[assignment]
    gated.gate = asyncio.Event()
    settings = dataclasses.replace(
        write_repo(tmp_path), batching=BatchingPolicy(True, max_in_flight_per_target=1)
    )
    app = build_app(settings, backend=gated)
    client = await aiohttp_client(app)
    coalescer = app[SERVICE].stack.inner  # service -> ladder -> coalescer
    assert isinstance(coalescer, Coalescer)

    async def post(i: int) -> dict:
        body = {"request_id": f"req-{i}", "model_name": "toy", "features": [i, -2.0, 0.5]}
        resp = await client.post("/v1/predict", data=io.BytesIO(json.dumps(body).encode()))
        assert resp.status == 200
        return await resp.json()

    first = asyncio.create_task(post(0))
    await until(lambda: sum(la.in_flight for la in coalescer._lanes.values()) == 1, steps=10_000)
    rest = [asyncio.create_task(post(i)) for i in (1, 2, 3, 4)]
    await until(lambda: waiting(coalescer) == 4, steps=10_000)
    gated.gate.set()
    bodies = await asyncio.gather(first, *rest)
    assert [c.inputs[0].data.shape[0] for c in gated.calls] == [1, 4]
    for i, body in enumerate(bodies):
        assert body["request_id"] == f"req-{i}"
        assert body["score"] == pytest.approx(1 / (1 + np.exp(-(i - 1.5))), rel=1e-6)
        assert body["model_version"] == "2"


async def test_a_finished_call_leaves_no_reference_cycle_behind() -> None:
    """Each member pointed at its call and at the member list, itself included: a cycle per
    request, so every request's objects waited for the collector, whose gen0 pauses then took
    4-7 ms at 1,550 requests/s. Refcounting alone must free them."""
    call = GatedCall()
    call.gate.set()
    co = Coalescer(BatchingPolicy(True, max_in_flight_per_target=8), call)
    await asyncio.gather(*(start(co, i) for i in range(3)))  # one merged call
    await start(co, 9)  # and a lone one
    await until(lambda: not co._tasks)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        await asyncio.gather(*(start(co, i) for i in range(3)))
        await start(co, 9)
        await until(lambda: not co._tasks)
        gc.collect()
        cyclic = {type(o).__name__ for o in gc.garbage}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not cyclic & {"_Waiter", "InferRequest", "Future", "Task"}, cyclic


async def test_by_default_a_row_does_not_queue_behind_a_few_slow_calls() -> None:
    """At 1,000 rows/s, Triton's 5 ms batching delay keeps ~7 one-row calls in flight; with
    room for only 8, a row often waited for one of them to end, which showed in the p99."""
    call = GatedCall()
    co = Coalescer(BatchingPolicy(), call)
    tasks = []
    for i in range(12):  # each in an iteration of its own: 12 one-row calls
        tasks.append(start(co, i))
        await until(lambda n=i + 1: len(call.calls) == n)
    assert waiting(co) == 0
    call.gate.set()
    for i, task in enumerate(tasks):
        assert answer(await task) == pytest.approx(row(i)[0] * 2)


def test_on_by_default_with_the_tick_window_and_room_for_64_calls() -> None:
    policy = BatchingPolicy()
    assert policy.enabled and policy.tick_window and policy.max_in_flight_per_target == 64
