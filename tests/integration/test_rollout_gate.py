"""The rollout controller behind the validation gate (real Redis, db 15): a healthy challenger
without a passing report is held at its weight, with the refusal recorded; a breach still rolls
back to 0 % (the gate never blocks a rollback)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway.clock import FakeClock
from gateway.predlog.feedback import LabelStore
from gateway.predlog.redis_stream import StreamWriter
from gateway.registry.report import ValidationGate
from gateway.rollout.analysis import PromotionPolicy
from gateway.rollout.controller import RolloutController
from gateway.routing.table import policy_version
from tests.registry_artifacts import REPO_ROOT, model_repo

ARM = "challenger:risk@1"


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url)
    yield c
    await c.aclose()


async def write_window(client: aioredis.Redis, policy: str, challenger_ms: float) -> None:
    def entry(i: int, arm: str, ms: float) -> dict:
        return {
            "request_id": f"{arm}-{i}", "entity_id": f"user-{i}", "model": "risk",
            "target": "risk", "version": "2" if arm == "champion" else "1",
            "policy_version": policy, "arm": arm, "input_hash": f"h{i}",
            "output": {"score": 0.8, "decision": "deny", "confidence": 0.9},
            "fallback_used": None, "latency_ms": ms + i % 10, "ts": time.time(),
        }  # fmt: skip

    entries = [entry(i, "champion", 5.0) for i in range(150)]
    entries += [entry(i, ARM, challenger_ms) for i in range(150)]
    assert await StreamWriter(client).write(entries) == 300
    labels = LabelStore(client)
    async with client.pipeline(transaction=False) as pipe:
        for e in entries:
            pipe.set(labels.key(e["request_id"]), json.dumps("deny"))
        await pipe.execute()


@pytest.mark.parametrize(
    ("challenger_ms", "action", "weight"), [(5.0, "hold", 10), (500.0, "rollback", 0)]
)
async def test_the_gate_holds_a_step_up_but_never_a_rollback(
    client: aioredis.Redis, tmp_path: Path, challenger_ms: float, action: str, weight: float
) -> None:
    routes = tmp_path / "routes"
    routes.mkdir()
    shutil.copy(REPO_ROOT / "configs/routes/risk.yaml", routes / "risk.yaml")
    original = (routes / "risk.yaml").read_text()
    await write_window(client, policy_version(original.encode()), challenger_ms)
    controller = RolloutController(
        client,
        LabelStore(client),
        routes_dir=routes,
        policy=PromotionPolicy(min_samples=100, min_labels=50, window_s=600),
        record_dir=tmp_path / "rollout",
        wall=FakeClock(time.time() + 1.0),
        validation=ValidationGate(model_repo(tmp_path)),  # no reports at all
    )
    ev = await controller.evaluate_once("risk")
    assert (ev.verdict.action, ev.to_weight) == (action, weight)
    text = (routes / "risk.yaml").read_text()
    if action == "hold":
        assert text == original and not ev.applied
        (reason,) = ev.verdict.reasons
        assert reason.startswith("validation gate: risk@1 has no validation report")
        rec = json.loads((tmp_path / "rollout" / "risk.jsonl").read_text())
        assert rec["reasons"] == [reason]
    else:
        assert ev.applied and text == original.replace("weight: 10,", "weight: 0,")
