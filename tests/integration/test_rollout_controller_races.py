"""The rollout controller against edits a human makes while it works: the edit must stand.

A redis-server of the test's own (conftest's `redis_server`, never the shared one): the
controller's lease, its `written` state and the synthetic prediction-log window live there alone.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway.clock import FakeClock
from gateway.predlog.feedback import LabelStore
from gateway.rollout.analysis import PromotionPolicy
from gateway.rollout.controller import RolloutController
from gateway.rollout.lease import Lease
from gateway.routing.edit import set_weight
from tests.integration.conftest import RedisServer
from tests.integration.test_rollout import current_policy, write_window

REPO = Path(__file__).resolve().parents[2]
POLICY = PromotionPolicy(min_samples=100, min_labels=50, window_s=600)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url)
    yield c
    await c.aclose()


@pytest.fixture
def routes(tmp_path: Path) -> Path:
    d = tmp_path / "routes"
    d.mkdir()
    shutil.copy(REPO / "configs/routes/risk.yaml", d / "risk.yaml")
    return d


def controller(client: aioredis.Redis, routes: Path, tmp_path: Path) -> RolloutController:
    return RolloutController(
        client,
        LabelStore(client),
        routes_dir=routes,
        policy=POLICY,
        record_dir=tmp_path / "rollout",
        wall=FakeClock(time.time() + 1.0),  # after every entry was written
        controller_id="race-controller",
        key_prefix=f"rollout-race-{uuid.uuid4().hex[:8]}",
    )


def weight_lines(routes: Path) -> list[str]:
    text = (routes / "risk.yaml").read_text()
    return [line.strip() for line in text.splitlines() if "weight:" in line and "{" in line]


async def test_an_edit_during_the_fencing_check_is_not_overwritten(
    client: aioredis.Redis, routes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease check is a Redis round trip between rendering the new file and writing it;
    an operator stopping the canary in that moment once had the promotion written over it."""
    await write_window(client, current_policy(routes), challenger_latency_ms=5.0)
    c = controller(client, routes, tmp_path)
    real_check = Lease.check

    async def check_while_a_human_edits(self: Lease, token: int) -> bool:
        set_weight(routes, "risk", "1", 0)  # the operator stops the canary right now
        return await real_check(self, token)

    monkeypatch.setattr(Lease, "check", check_while_a_human_edits)
    ev = await c.evaluate_once("risk")
    monkeypatch.undo()

    assert weight_lines(routes) == ['- {target: risk, version: "1", weight: 0, sticky: entity_id}']
    assert (ev.verdict.action, ev.to_weight, ev.applied) == ("hold", 10, False)
    assert "changed during the evaluation" in ev.verdict.reasons[0]
    # The next step sees the edit as a human's and keeps it.
    nxt = await c.evaluate_once("risk")
    assert (nxt.verdict.action, nxt.applied) == ("hold", False)
    assert "edited outside the controller" in nxt.verdict.reasons[0]
    assert "weight: 0," in (routes / "risk.yaml").read_text()


async def test_a_reverted_step_is_judged_only_on_traffic_since_the_revert(
    client: aioredis.Redis, routes: Path, tmp_path: Path
) -> None:
    """An operator puts the controller's 10 -> 25 % step back to 10 % by hand: the file is
    byte-identical to the earlier 10 % one, so the healthy 10 % traffic from before still
    counted under its hash and the step after the "edit stands" hold promoted again, on no
    new traffic at all."""
    p10 = current_policy(routes)
    await write_window(client, p10, challenger_latency_ms=5.0)  # healthy traffic at 10 %
    c = controller(client, routes, tmp_path)
    clock = FakeClock(time.time())
    c.wall = clock  # each step at the real time it runs: stream ids are the server's clock

    first = await c.evaluate_once("risk")
    assert (first.verdict.action, first.to_weight, first.applied) == ("promote", 25, True)

    set_weight(routes, "risk", "1", 10)  # the operator reverts by hand
    assert current_policy(routes) == p10
    clock.now = time.time()
    adopted = await c.evaluate_once("risk")
    assert (adopted.verdict.action, adopted.applied) == ("hold", False)
    assert "edited outside the controller" in adopted.verdict.reasons[0]

    # No request served since the revert: nothing to judge, whatever the window still holds.
    clock.now = time.time() + 1.0
    stale = await c.evaluate_once("risk")
    assert (stale.verdict.action, stale.to_weight, stale.applied) == ("hold", 10, False)
    assert stale.verdict.reasons[0] == "not enough data"
    assert stale.stats is not None and stale.stats.challenger.count == 0
    assert stale.stats.window_start >= first.ts  # from the controller's write on
    assert weight_lines(routes) == ['- {target: risk, version: "1", weight: 10, sticky: entity_id}']

    # Traffic served after the revert counts again: the controller is not stuck.
    await write_window(client, p10, challenger_latency_ms=5.0)
    clock.now = time.time() + 1.0
    fresh = await c.evaluate_once("risk")
    assert fresh.stats is not None and fresh.stats.challenger.count == 150
    assert (fresh.verdict.action, fresh.to_weight, fresh.applied) == ("promote", 25, True)
