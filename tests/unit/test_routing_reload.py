"""Hot reload, version readiness, shadow traffic and /admin/routes, through the real app with a
FakeBackend. Nothing here waits on wall-clock time except polling with a deadline."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.api.admin import RELOADER
from gateway.api.keys import SERVICE
from gateway.app import build_app
from gateway.backends.base import InferRequest, InferResponse
from gateway.config import Settings
from gateway.errors import BackendError
from gateway.routing.edit import set_weight
from gateway.types import Deadline
from tests.unit.fake_backend import FakeBackend
from tests.unit.fakes import FEATURES, toy_backend, write_repo

PROBE = {
    "features": [1.0, 0.0, 0.0],
    "expected": {"score": 0.7310586, "decision": "deny"},
    "atol": 1e-5,
}


class GatedBackend(FakeBackend):
    """Calls for `slow_version` wait until `gate` opens: a shadow target as slow as we like."""

    def __init__(self) -> None:
        super().__init__(list(toy_backend().models.values()))
        self.gate = asyncio.Event()
        self.slow_version = "1"
        self.fail_slow = False

    async def infer(self, request: InferRequest, deadline: Deadline) -> InferResponse:
        if request.version == self.slow_version:
            await self.gate.wait()
            if self.fail_slow:
                raise BackendError("shadow target broke")
        return await super().infer(request, deadline)


async def poll(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.01)


def settings_for(tmp_path: Path, route_extra: str = "", **routing: Any) -> Settings:
    s = write_repo(tmp_path, route_extra)
    routing.setdefault("reload_interval_s", 0.02)
    routing.setdefault("reload_on_sighup", False)
    return dataclasses.replace(s, routing=dataclasses.replace(s.routing, **routing))


def add_version(s: Settings, version: str, probe: dict[str, Any] | None = PROBE) -> None:
    d = s.routing.model_repository / "toy" / version
    d.mkdir()
    manifest = {
        "model": "toy",
        "version": version,
        "input_schema": {"tensor": "features", "datatype": "FP32", "features": FEATURES},
        "outputs": ["score", "decision", "confidence"],
        "probe": probe,
    }
    (d / "manifest.json").write_text(json.dumps(manifest))


def write_route(s: Settings, body: str) -> None:
    (s.routing.routes_dir / "toy.yaml").write_text("model: toy\n" + body)


async def predict(client: TestClient, entity: str = "e1", **extra: Any) -> dict[str, Any]:
    body = {"model_name": "toy", "entity_id": entity, "features": [1, 0, 0], **extra}
    resp = await client.post("/v1/predict", data=io.BytesIO(json.dumps(body).encode()))
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def admin(client: TestClient) -> dict[str, Any]:
    resp = await client.get("/admin/routes")
    assert resp.status == 200
    return await resp.json()


@pytest.fixture
async def make(aiohttp_client) -> Callable[..., Awaitable[TestClient]]:
    async def start(settings: Settings, backend: FakeBackend | None = None) -> TestClient:
        return await aiohttp_client(build_app(settings, backend=backend or toy_backend()))

    return start


async def test_edit_is_picked_up_by_the_watcher(tmp_path: Path, make) -> None:
    s = settings_for(tmp_path)
    client = await make(s)
    before = await predict(client)
    assert before["model_version"] == "2"
    write_route(s, 'champion: {target: toy, version: "1"}\n')

    async def moved() -> bool:
        return (await predict(client))["model_version"] == "1"

    await poll(moved)
    after = await predict(client)
    assert after["policy_version"] != before["policy_version"]
    state = await admin(client)
    assert state["last_reload"]["result"] == "ok"
    assert state["routes"]["toy"]["policy_version"] == after["policy_version"]


async def test_an_edit_during_start_up_is_picked_up(
    tmp_path: Path, make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An edit landing after the table was read but before the reloader existed (Redis, the
    spool and the rest start in between) once counted as already seen: the old table served
    until the next edit, however long that took."""
    import gateway.app as app_mod

    s = settings_for(tmp_path)
    real = app_mod.build_observability

    def edit_then_start(*args: Any, **kwargs: Any) -> Any:
        write_route(s, 'champion: {target: toy, version: "1"}\n')  # e.g. the controller
        return real(*args, **kwargs)

    monkeypatch.setattr(app_mod, "build_observability", edit_then_start)
    client = await make(s)

    async def moved() -> bool:
        return (await predict(client))["model_version"] == "1"

    await poll(moved)
    reloader = client.app[RELOADER]
    assert reloader.last is not None and reloader.last.result == "ok"
    assert not reloader.changed()


async def test_invalid_edit_keeps_the_old_table(tmp_path: Path, make) -> None:
    s = settings_for(tmp_path)
    client = await make(s)
    before = await predict(client)
    write_route(s, 'champion: {target: toy, version: "2"}\nchallengers:\n  - {target: toy}\n')
    reloader = client.app[RELOADER]

    async def rejected() -> bool:
        return reloader.last is not None and reloader.last.result == "rejected"

    await poll(rejected)
    after = await predict(client)
    assert after["policy_version"] == before["policy_version"]
    assert after["model_version"] == "2"
    state = await admin(client)
    assert state["last_reload"]["result"] == "rejected"
    assert "toy.yaml:4: challengers[0]: 'version' is required" in state["last_reload"]["error"]
    metrics = await (await client.get("/metrics")).text()
    assert 'route_reloads_total{result="rejected"} 1.0' in metrics


async def test_new_version_loads_passes_its_probe_then_takes_traffic(tmp_path, make) -> None:
    s = settings_for(tmp_path, reload_interval_s=3600)
    backend = toy_backend()
    client = await make(s, backend)
    add_version(s, "3")
    write_route(s, 'champion: {target: toy, version: "3"}\n')
    result = await client.app[RELOADER].reload()
    assert result.result == "ok", result.error
    # Loaded beside the serving versions, never instead of them.
    ((model, config),) = backend.loads
    assert model == "toy" and config is not None
    assert config["version_policy"] == {"specific": {"versions": [1, 2, 3]}}
    assert (await predict(client))["model_version"] == "3"


@pytest.mark.parametrize(
    ("breakage", "error"),
    [("load", "toy@3 failed to load"), ("probe", "toy@3 probe mismatch: score")],
)
async def test_broken_new_version_never_takes_traffic(tmp_path, make, breakage, error) -> None:
    s = settings_for(tmp_path, reload_interval_s=3600)
    backend = toy_backend()
    client = await make(s, backend)
    before = await predict(client)
    if breakage == "load":
        backend.broken.add(("toy", "3"))
        add_version(s, "3")
    else:
        add_version(s, "3", {**PROBE, "expected": {"score": 0.1, "decision": "approve"}})
    write_route(
        s,
        'champion: {target: toy, version: "2"}\n'
        'challengers:\n  - {target: toy, version: "3", weight: 100, sticky: entity_id}\n',
    )
    result = await client.app[RELOADER].reload()
    assert result.result == "rejected" and error in (result.error or "")
    answers = [await predict(client, f"e{i}") for i in range(20)]
    assert {a["model_version"] for a in answers} == {"2"}
    assert {a["policy_version"] for a in answers} == {before["policy_version"]}
    assert not any(c.version == "3" and not c.request_id.startswith("probe") for c in backend.calls)


async def test_reload_trigger_reloads_without_a_change_poll(tmp_path: Path, make) -> None:
    """What SIGHUP does: reload at once, whatever the poll interval."""
    s = settings_for(tmp_path, reload_interval_s=3600)
    client = await make(s)
    write_route(s, 'champion: {target: toy, version: "1"}\n')
    reloader = client.app[RELOADER]
    reloader.trigger()

    async def reloaded() -> bool:
        return reloader.last is not None and reloader.last.reason == "sighup"

    await poll(reloaded)
    assert (await predict(client))["model_version"] == "1"


SHADOW = 'shadow:\n  - {target: toy, version: "1", sample: 1.0}\n'


async def test_shadow_never_delays_or_alters_the_answer(tmp_path: Path, make) -> None:
    s = settings_for(tmp_path, SHADOW)
    plain = await predict(await make(settings_for(tmp_path / "plain")))
    backend = GatedBackend()
    client = await make(s, backend)
    shadow = client.app[SERVICE].shadow
    assert shadow is not None
    # The shadow target is blocked: the answer still comes back, unchanged.
    got = await predict(client)
    assert {k: got[k] for k in ("score", "decision", "model_version")} == {
        k: plain[k] for k in ("score", "decision", "model_version")
    }
    assert shadow.in_flight == 1
    backend.gate.set()

    async def compared() -> bool:
        return shadow.stats[("toy", "toy@1")].compared == 1

    await poll(compared)
    summary = (await admin(client))["shadow"]["toy -> toy@1"]
    assert summary["agreement_rate"] == 1.0 and summary["mean_abs_score_delta"] == 0.0


async def test_shadow_over_capacity_is_dropped_and_errors_are_counted(tmp_path, make) -> None:
    s = settings_for(tmp_path, SHADOW, shadow_max_in_flight=1)
    backend = GatedBackend()
    backend.fail_slow = True
    client = await make(s, backend)
    shadow = client.app[SERVICE].shadow
    assert shadow is not None
    a, b = await predict(client, "e1"), await predict(client, "e2")
    assert a["model_version"] == b["model_version"] == "2"
    stats = shadow.stats[("toy", "toy@1")]
    assert stats.dropped == 1 and shadow.in_flight == 1
    backend.gate.set()

    async def failed() -> bool:
        return stats.errors == 1

    await poll(failed)
    metrics = await (await client.get("/metrics")).text()
    assert 'shadow_requests_total{model="toy",result="dropped",target="toy@1"} 1.0' in metrics


async def test_admin_shows_arms_weights_and_counts(tmp_path: Path, make) -> None:
    s = settings_for(
        tmp_path, 'challengers:\n  - {target: toy, version: "1", weight: 50, sticky: entity_id}\n'
    )
    client = await make(s)
    answers = [await predict(client, f"user-{i}") for i in range(40)]
    state = (await admin(client))["routes"]["toy"]
    assert [(a["arm"], a["weight"]) for a in state["arms"]] == [
        ("champion", 50.0),
        ("challenger:toy@1", 50.0),
    ]
    counts = state["arm_counts"]
    assert sum(counts.values()) == 40
    assert counts["challenger:toy@1"] == sum(a["model_version"] == "1" for a in answers)
    assert 0 < counts["challenger:toy@1"] < 40


def test_set_weight_keeps_comments_and_replaces_atomically(tmp_path: Path) -> None:
    original = (
        '# the risk route\nmodel: risk\nchampion: {target: risk, version: "2"}  # champ\n'
        'challengers:\n  # canary\n  - {target: risk, version: "1", weight: 10, sticky: '
        "entity_id}\nslo: {p99_ms: 100}\n"
    )
    path = tmp_path / "risk.yaml"
    path.write_text(original)
    set_weight(tmp_path, "risk", "1", 25)
    assert path.read_text() == original.replace("weight: 10", "weight: 25")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["risk.yaml"]  # no temp file left
    with pytest.raises(ValueError, match="weight"):
        set_weight(tmp_path, "risk", "1", 150)
    with pytest.raises(ValueError, match="it is the champion"):
        set_weight(tmp_path, "risk", "2", 5)
    assert path.read_text() == original.replace("weight: 10", "weight: 25")  # untouched


def test_set_weight_adds_a_new_canary_and_never_adds_at_zero(tmp_path: Path) -> None:
    original = (
        'model: risk\nchampion: {target: risk, version: "2"}\nchallengers:\n'
        '  - {target: risk, version: "1", weight: 0, sticky: entity_id}  # rolled back\n'
    )
    path = tmp_path / "risk.yaml"
    path.write_text(original)
    with pytest.raises(ValueError, match="no challenger with version '3'"):
        set_weight(tmp_path, "risk", "3", 0)  # nothing to roll back: no arm is invented
    assert path.read_text() == original
    set_weight(tmp_path, "risk", "3", 5)
    assert path.read_text() == original + (
        '  - {target: risk, version: "3", weight: 5, sticky: entity_id}\n'
    )
    set_weight(tmp_path, "risk", "3", 25)  # now it exists: its weight changes, nothing is added
    assert path.read_text().count('version: "3"') == 1
    assert "weight: 25, sticky: entity_id}" in path.read_text()
