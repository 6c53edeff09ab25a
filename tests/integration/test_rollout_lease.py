"""The controller across replicas, against the real Redis and temp copies of the route file:
one lease holder acts per step (fencing token checked before each write), a human edit
between steps wins, the final step swaps the champion, and every step is audited."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway.clock import FakeClock
from gateway.predlog.feedback import LabelStore
from gateway.rollout.analysis import CanaryStats, PromotionPolicy
from gateway.rollout.controller import RolloutController
from gateway.rollout.lease import Lease
from gateway.routing.split import Arm
from gateway.routing.table import Route, parse_route
from tests.conftest import REPO_ROOT
from tests.integration.test_rollout import current_policy, write_window

pytestmark = pytest.mark.integration
POLICY = PromotionPolicy(min_samples=100, min_labels=50, window_s=600)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url)
    yield c
    await c.aclose()


@pytest.fixture
def prefix() -> str:
    return f"rollout-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def routes(tmp_path: Path) -> Path:
    d = tmp_path / "routes"
    d.mkdir()
    shutil.copy(REPO_ROOT / "configs/routes/risk.yaml", d / "risk.yaml")
    return d


def make(client: aioredis.Redis, routes: Path, tmp: Path, name: str, prefix: str,
         cls: type[RolloutController] = RolloutController) -> RolloutController:  # fmt: skip
    return cls(
        client, LabelStore(client), routes_dir=routes, policy=POLICY,
        record_dir=tmp / "rollout", controller_id=name, key_prefix=prefix, lease_ttl_s=30,
    )  # fmt: skip


def now_for(*controllers: RolloutController) -> None:
    """Every entry written so far lies inside the window (the window ends at the clock)."""
    for c in controllers:
        c.wall = FakeClock(time.time() + 1.0)


async def test_two_controllers_racing_exactly_one_acts_per_step_through_the_swap(
    client: aioredis.Redis, routes: Path, tmp_path: Path, prefix: str
) -> None:
    a, b = (make(client, routes, tmp_path, n, prefix) for n in ("ctl-a", "ctl-b"))
    original = (routes / "risk.yaml").read_text()
    seen = []
    for expected in (25, 50, 100):
        await write_window(client, current_policy(routes), challenger_latency_ms=5.0)
        now_for(a, b)
        evs = await asyncio.gather(a.evaluate_once("risk"), b.evaluate_once("risk"))
        acted = [e for e in evs if e.applied]
        assert len(acted) == 1, [e.verdict for e in evs]  # exactly one acts per step
        (standby,) = [e for e in evs if not e.leader]
        assert "standing by" in standby.verdict.reasons[0] and standby.stats is None
        assert acted[0].to_weight == expected
        seen.append((acted[0].controller, acted[0].token))
    assert len(set(seen)) == 1  # the first winner keeps the lease (renewed, same token)
    final = evs[0] if evs[0].applied else evs[1]
    assert final.swap and final.verdict.final
    assert (final.champion_before, final.champion_after) == ("risk@2", "risk@1")
    text = (routes / "risk.yaml").read_text()
    route = parse_route(text.encode(), "risk.yaml")
    assert str(route.champion) == "risk@1"  # the challenger is the champion now
    assert route.split is not None
    (old,) = [arm for arm in route.split.arms if arm.name != "champion"]
    assert (str(old.target), old.buckets) == ("risk@2", 0)  # the rollback target, at 0 %
    assert "# 10 % of entities" in text and text.count("\n") == original.count("\n")
    # After the swap the controller holds: the zero-weight rollback target is not restarted.
    now_for(a, b)
    again = [e for e in await asyncio.gather(a.evaluate_once("risk"), b.evaluate_once("risk"))
             if e.leader]  # fmt: skip
    assert len(again) == 1 and (again[0].verdict.action, again[0].applied) == ("hold", False)
    # Audit: every leader evaluation, in the stream, naming who and the weights.
    rows = await client.xrange(a.audit_stream("risk"))
    assert len(rows) == 4
    fields = [{k.decode(): v.decode() for k, v in f.items()} for _, f in rows]
    assert {f["controller"] for f in fields} == {seen[0][0]}
    assert [(f["from_weight"], f["to_weight"], f["applied"]) for f in fields] == [
        ("10.0", "25.0", "true"), ("25.0", "50.0", "true"), ("50.0", "100.0", "true"),
        ("0.0", "0.0", "false"),
    ]  # fmt: skip
    assert fields[2]["swap"] == "true" and fields[2]["champion_after"] == "risk@1"
    assert all(f["os_user"] and float(f["ts"]) > 0 for f in fields)


class Paused(RolloutController):
    """Measures, then 'pauses' long enough for its lease to expire and a rival to take it."""

    rival: RolloutController

    async def gather(self, model: str, route: Route, challenger: Arm) -> CanaryStats:
        stats = await super().gather(model, route, challenger)
        await self.client.delete(self.lease(model).key)  # the lease ran out during the pause
        assert await self.rival.lease(model).acquire() is not None
        return stats


async def test_a_controller_that_lost_its_lease_mid_step_writes_nothing(
    client: aioredis.Redis, routes: Path, tmp_path: Path, prefix: str
) -> None:
    before = (routes / "risk.yaml").read_bytes()
    await write_window(client, current_policy(routes), challenger_latency_ms=5.0)
    rival = make(client, routes, tmp_path, "ctl-b", prefix)
    stale = make(client, routes, tmp_path, "ctl-a", prefix, cls=Paused)
    assert isinstance(stale, Paused)
    stale.rival = rival
    now_for(stale, rival)
    ev = await stale.evaluate_once("risk")
    assert (ev.verdict.action, ev.applied) == ("hold", False)
    assert ev.verdict.reasons[0].startswith(f"lease lost before the write (token {ev.token}")
    assert (routes / "risk.yaml").read_bytes() == before
    ok = await rival.evaluate_once("risk")  # the new holder, with a later token, acts
    assert ok.applied and ok.token is not None and ev.token is not None and ok.token > ev.token


async def test_fencing_tokens_only_grow_and_a_stale_one_fails_the_check(
    client: aioredis.Redis, prefix: str
) -> None:
    a, b = Lease(client, prefix, "m", "a", 30), Lease(client, prefix, "m", "b", 30)
    t1 = await a.acquire()
    assert t1 is not None and await b.acquire() is None and await a.acquire() == t1  # renewal
    assert await a.check(t1)
    await a.release(t1)
    t2 = await b.acquire()
    assert t2 is not None and t2 > t1
    assert not await a.check(t1) and await b.check(t2)
    holder = await b.current()
    assert holder is not None and (holder.holder, holder.token) == ("b", t2)


async def test_a_human_edit_between_steps_wins(
    client: aioredis.Redis, routes: Path, tmp_path: Path, prefix: str
) -> None:
    c = make(client, routes, tmp_path, "ctl-a", prefix)
    await write_window(client, current_policy(routes), challenger_latency_ms=5.0)
    now_for(c)
    assert (await c.evaluate_once("risk")).applied  # 10 -> 25, written by the controller
    path = routes / "risk.yaml"
    human = path.read_text().replace("weight: 25,", "weight: 15,")  # an operator's edit
    path.write_text(human)
    await write_window(client, current_policy(routes), challenger_latency_ms=5.0)
    now_for(c)
    ev = await c.evaluate_once("risk")
    assert (ev.verdict.action, ev.applied, ev.to_weight) == ("hold", False, 15)
    assert "edited outside the controller" in ev.verdict.reasons[0]
    assert path.read_text() == human  # never overwritten
    # The edit is the new starting point: the next step is judged on traffic under it.
    now_for(c)
    nxt = await c.evaluate_once("risk")
    assert (nxt.verdict.action, nxt.from_weight, nxt.to_weight, nxt.applied) == (
        "promote", 15, 25, True,
    )  # fmt: skip


async def test_a_breach_rolls_back_at_once_even_mid_ladder(
    client: aioredis.Redis, routes: Path, tmp_path: Path, prefix: str
) -> None:
    c = make(client, routes, tmp_path, "ctl-a", prefix)
    await write_window(client, current_policy(routes), challenger_latency_ms=5.0)
    now_for(c)
    assert (await c.evaluate_once("risk")).to_weight == 25
    await write_window(client, current_policy(routes), challenger_latency_ms=40.0)  # p99 breach
    now_for(c)
    ev = await c.evaluate_once("risk")
    assert (ev.verdict.action, ev.to_weight, ev.applied) == ("rollback", 0, True)
    assert ev.verdict.reasons[0].startswith("breach: p99")


async def test_rollout_status_shows_stage_gates_lease_and_history(
    client: aioredis.Redis, routes: Path, tmp_path: Path, prefix: str, redis_url: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from gateway.cli import main

    c = make(client, routes, tmp_path, "ctl-a", prefix)
    await write_window(client, current_policy(routes), challenger_latency_ms=5.0)
    now_for(c)
    assert (await c.evaluate_once("risk")).applied  # 10 -> 25; the lease stays with ctl-a
    await write_window(client, current_policy(routes), challenger_latency_ms=40.0)
    monkeypatch.setenv("SWITCHYARD__ROLLOUT__KEY_PREFIX", prefix)
    monkeypatch.setenv("SWITCHYARD__ROLLOUT__POLICY__MIN_SAMPLES", "100")
    args = ["rollout", "status", "--model", "risk", "--config", str(tmp_path / "none.yaml"),
            "--redis-url", redis_url, "--routes-dir", str(routes)]  # fmt: skip
    capsys.readouterr()  # the controller's own log lines
    assert await asyncio.to_thread(main, args) == 0  # the CLI runs its own event loop
    out = capsys.readouterr().out
    assert out.startswith("risk: 25 %: step 2 of 4 (ladder 5, 25, 50, 100)"), out
    assert "lease: ctl-a (token 1)" in out
    assert "[pass] samples" in out and "[FAIL] p99" in out  # the 40 ms challenger breaches
    assert "now: rollback -> 0 %" in out
    assert "ctl-a: promote 10.0 -> 25.0 % (applied)" in out  # the decision history
    assert await asyncio.to_thread(main, [*args, "--json"]) == 0
    (view,) = json.loads(capsys.readouterr().out)
    assert view["weight"] == 25 and view["verdict"]["action"] == "rollback"
    assert {g["gate"]: g["ok"] for g in view["gates"]}["p99"] is False
    assert (routes / "risk.yaml").read_text().count("weight: 25,") == 1  # status wrote nothing
