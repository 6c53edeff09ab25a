"""The promotion controller against real Redis (db 15): synthetic prediction-log entries in
the real stream encoding, labels in the real label store, a temp copy of the risk route file.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.clock import FakeClock
from gateway.predlog.feedback import LabelStore
from gateway.predlog.redis_stream import StreamWriter
from gateway.rollout.analysis import PromotionPolicy
from gateway.rollout.controller import RolloutController, RolloutError
from gateway.routing.table import parse_route, policy_version

REPO = Path(__file__).resolve().parents[2]
CHALLENGER_ARM = "challenger:risk@1"
POLICY = PromotionPolicy(min_samples=100, min_labels=50, window_s=600)


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


def entry(i: int, arm: str, latency_ms: float, policy: str, fallback: str | None = None) -> dict:
    champion = arm == "champion"
    return {
        "request_id": f"{arm}-{policy}-{i}",
        "entity_id": f"user-{i}",
        "model": "risk",
        "target": "risk",
        "version": "2" if champion else "1",
        "policy_version": policy,
        "arm": arm,
        "input_hash": f"h{i}",
        "output": {"score": 0.8, "decision": "deny", "confidence": 0.9},
        "fallback_used": fallback,
        "latency_ms": latency_ms,
        "ts": time.time(),
    }


async def write_window(
    client: aioredis.Redis, policy: str, challenger_latency_ms: float, n: int = 150
) -> None:
    """n answers per arm (latencies cycling over 10 values), every one labelled 'deny'."""
    entries = [entry(i, "champion", 5.0 + i % 10, policy) for i in range(n)]
    entries += [entry(i, CHALLENGER_ARM, challenger_latency_ms + i % 10, policy) for i in range(n)]
    assert await StreamWriter(client).write(entries) == 2 * n
    labels = LabelStore(client)
    async with client.pipeline(transaction=False) as pipe:
        for e in entries:
            pipe.set(labels.key(e["request_id"]), json.dumps("deny"))
        await pipe.execute()


def controller(client: aioredis.Redis, routes: Path, tmp_path: Path) -> RolloutController:
    return RolloutController(
        client,
        LabelStore(client),
        routes_dir=routes,
        policy=POLICY,
        record_dir=tmp_path / "rollout",
        wall=FakeClock(time.time() + 1.0),  # after every entry was written; never moves
        controller_id="test-controller",  # one controller across the steps of a test
        key_prefix=f"rollout-test-{uuid.uuid4().hex[:8]}",
    )


def current_policy(routes: Path) -> str:
    return policy_version((routes / "risk.yaml").read_bytes())


def temp_files(routes: Path) -> list[Path]:
    return list(routes.glob(".*.tmp"))


def records(tmp_path: Path) -> list[dict[str, Any]]:
    lines = (tmp_path / "rollout" / "risk.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


async def test_healthy_challenger_moves_10_to_25_keeping_comments(
    client: aioredis.Redis, routes: Path, tmp_path: Path
) -> None:
    original = (routes / "risk.yaml").read_text()
    assert "weight: 10," in original
    # Entries from an earlier weight (another policy_version) would breach: they must not count.
    await write_window(client, "routes@old", challenger_latency_ms=500.0, n=20)
    await write_window(client, current_policy(routes), challenger_latency_ms=5.0)

    ev = await controller(client, routes, tmp_path).evaluate_once("risk")

    assert (ev.verdict.action, ev.from_weight, ev.to_weight, ev.applied) == (
        "promote",
        10,
        25,
        True,
    )
    text = (routes / "risk.yaml").read_text()
    assert text == original.replace("weight: 10,", "weight: 25,")  # comments and layout kept
    route = parse_route(text.encode(), "risk.yaml")
    assert route.split is not None and route.split.arms[1].buckets == 2500
    assert not temp_files(routes)  # the atomic write left no temp file behind
    (rec,) = records(tmp_path)
    assert (rec["action"], rec["from_weight"], rec["to_weight"]) == ("promote", 10, 25)
    assert rec["stats"]["ignored"] == 40 and rec["stats"]["challenger"]["count"] == 150
    assert rec["stats"]["accuracy_delta"] == 0.0
    assert any(r.startswith("all gates pass") for r in rec["reasons"])

    # At 25 % nothing has been served yet under the new file: hold, never reuse the old data.
    again = await controller(client, routes, tmp_path).evaluate_once("risk")
    assert (again.verdict.action, again.to_weight, again.applied) == ("hold", 25, False)
    assert "not enough data" in again.verdict.reasons
    assert len(records(tmp_path)) == 2


async def test_p99_breach_rolls_back_to_zero(
    client: aioredis.Redis, routes: Path, tmp_path: Path
) -> None:
    await write_window(client, current_policy(routes), challenger_latency_ms=50.0)

    ev = await controller(client, routes, tmp_path).evaluate_once("risk")

    assert (ev.verdict.action, ev.to_weight, ev.applied) == ("rollback", 0, True)
    text = (routes / "risk.yaml").read_text()
    assert "weight: 0," in text and "# 10 % of entities" in text
    (rec,) = records(tmp_path)
    assert rec["action"] == "rollback" and rec["reasons"][0].startswith("breach: p99")
    assert (
        rec["stats"]["challenger"]["p99_ms"] == 59.0 and rec["stats"]["champion"]["p99_ms"] == 14.0
    )


async def test_dry_run_decides_and_records_without_editing(
    client: aioredis.Redis, routes: Path, tmp_path: Path
) -> None:
    before = (routes / "risk.yaml").read_bytes()
    await write_window(client, current_policy(routes), challenger_latency_ms=50.0)
    c = controller(client, routes, tmp_path)
    c.dry_run = True
    ev = await c.evaluate_once("risk")
    assert (ev.verdict.action, ev.applied) == ("rollback", False)
    assert (routes / "risk.yaml").read_bytes() == before
    assert records(tmp_path)[0]["dry_run"] is True


async def test_two_challengers_are_refused(
    client: aioredis.Redis, routes: Path, tmp_path: Path
) -> None:
    path = routes / "risk.yaml"
    path.write_text(
        path.read_text().replace(
            "sticky: entity_id}", "sticky: entity_id}\n  - {target: risk_distilled, version: \"1\","
            " weight: 5, sticky: entity_id}"
        )
    )  # fmt: skip
    with pytest.raises(RolloutError, match="exactly one challenger"):
        await controller(client, routes, tmp_path).evaluate_once("risk")
