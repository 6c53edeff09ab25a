"""Admission control: bounded in flight per backend, bounded queue, shed with Retry-After."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import Overloaded
from gateway.resilience.admission import Admission, AdmissionLimits
from gateway.types import Deadline


async def hold(adm: Admission, backend: str, release: asyncio.Event, entered: list[str]) -> None:
    async with adm.slot(backend, Deadline.after(10)):
        entered.append(backend)
        await release.wait()


async def wait_until(cond, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():  # noqa: ASYNC110 - polls state the tasks change, with a deadline
            await asyncio.sleep(0)


async def test_sheds_past_in_flight_and_queue_bounds() -> None:
    shed: list[str] = []
    adm = Admission(
        AdmissionLimits(max_in_flight_per_backend=2, max_queue=1, max_queue_wait_s=10,
                        retry_after_s=2.0),
        on_shed=shed.append,
    )  # fmt: skip
    release, entered = asyncio.Event(), []
    holders = [asyncio.create_task(hold(adm, "a", release, entered)) for _ in range(3)]
    await wait_until(lambda: len(entered) == 2 and adm.queued == 1)
    assert adm.in_flight("a") == 2
    with pytest.raises(Overloaded) as err:  # in flight full, queue full: shed at once
        async with adm.slot("a", Deadline.after(10)):
            pass
    assert err.value.status == 503 and err.value.retry_after_s == 2.0
    assert shed == ["a"]
    # another backend has its own in-flight bound
    async with adm.slot("b", Deadline.after(10)):
        assert adm.in_flight("b") == 1
    release.set()
    await asyncio.gather(*holders)
    assert entered == ["a", "a", "a"]  # the queued one got a slot when one freed up
    assert adm.in_flight("a") == 0 and adm.queued == 0


async def test_a_queued_request_is_shed_when_its_wait_runs_out() -> None:
    adm = Admission(AdmissionLimits(max_in_flight_per_backend=1, max_queue=5,
                                    max_queue_wait_s=0.01))  # fmt: skip
    release, entered = asyncio.Event(), []
    holder = asyncio.create_task(hold(adm, "a", release, entered))
    await wait_until(lambda: entered == ["a"])
    with pytest.raises(Overloaded):
        async with adm.slot("a", Deadline.after(10)):
            pass
    assert adm.queued == 0
    release.set()
    await holder
    assert adm.in_flight("a") == 0


async def test_a_cancelled_waiter_leaves_no_slot_behind() -> None:
    adm = Admission(AdmissionLimits(max_in_flight_per_backend=1, max_queue=5,
                                    max_queue_wait_s=10))  # fmt: skip
    release, entered = asyncio.Event(), []
    holder = asyncio.create_task(hold(adm, "a", release, entered))
    await wait_until(lambda: entered == ["a"])
    waiter = asyncio.create_task(hold(adm, "a", release, entered))
    await wait_until(lambda: adm.queued == 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    release.set()
    await holder
    assert adm.in_flight("a") == 0 and adm.queued == 0
    async with adm.slot("a", Deadline.after(1)):
        assert adm.in_flight("a") == 1
