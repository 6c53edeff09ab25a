"""The status page's view model (`gateway.api.status`) and its HTML at /admin/ui, through the
real app with a FakeBackend: routes and weights, canary gates, breakers, fallback, drift,
reloads and audit entries."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from gateway.api.admin import POOL, RELOADER
from gateway.api.keys import METRICS
from gateway.api.status import AUDIT, status_view, tail_records
from gateway.app import build_app
from gateway.backends.pool import BackendPool, PoolMember
from gateway.config import Settings
from gateway.errors import BackendUnavailable
from gateway.rollout.analysis import ArmStats, CanaryStats, PromotionPolicy, Verdict, decide
from gateway.rollout.controller import Evaluation
from tests.unit.fakes import toy_backend, write_repo

CANARY = 'challengers:\n  - {target: toy, version: "1", weight: 10, sticky: entity_id}\n'
FALLBACK = "fallback: {default: {score: 0.5, decision: review}}\n"


def settings_for(tmp_path: Path, route_extra: str = CANARY) -> Settings:
    s = write_repo(tmp_path, route_extra)
    rollout = dataclasses.replace(s.rollout, record_dir=tmp_path / "rollout")
    routing = dataclasses.replace(s.routing, reload_on_sighup=False, reload_interval_s=60.0)
    return dataclasses.replace(s, rollout=rollout, routing=routing)


async def predict(client: TestClient, entity: str) -> dict[str, Any]:
    body = {"model_name": "toy", "entity_id": entity, "features": [1, 0, 0]}
    resp = await client.post("/v1/predict", data=io.BytesIO(json.dumps(body).encode()))
    return await resp.json()


def evaluation(
    challenger_p99: float, challenger_errors: int, weight: float, policy_version: str
) -> Evaluation:
    """A controller record built from the real types, judged by the real `decide`."""
    stats = CanaryStats(
        champion=ArmStats("champion", count=400, errors=0, p99_ms=10.0, labelled=0),
        challenger=ArmStats(
            "challenger:toy@1", count=300, errors=challenger_errors, p99_ms=challenger_p99
        ),
        window_start=1_700_000_000.0,
        window_end=1_700_000_600.0,
        policy_version=policy_version,
    )
    verdict: Verdict = decide(PromotionPolicy(), stats, weight)
    return Evaluation(
        "toy", "toy.yaml", "toy@1", weight, verdict.next_weight, verdict, stats,
        applied=False, dry_run=True, ts=1_700_000_600.0,
    )  # fmt: skip


def write_records(record_dir: Path, *evaluations: Evaluation, junk: bool = False) -> None:
    record_dir.mkdir(parents=True, exist_ok=True)
    lines = [orjson.dumps(e.record()) for e in evaluations]
    if junk:
        lines.insert(1, b'{"torn": ')  # a half-written line must not hide the others
    (record_dir / "toy.jsonl").write_bytes(b"\n".join(lines) + b"\n")


class ListAudit:
    def __init__(self, entries: Sequence[Mapping[str, Any]]) -> None:
        self.entries = list(entries)

    def recent(self, limit: int) -> Sequence[Mapping[str, Any]]:
        return self.entries[-limit:][::-1]


async def start(
    aiohttp_client, settings: Settings, backend=None, audit: ListAudit | None = None
) -> TestClient:
    app = build_app(settings, backend=backend or toy_backend())
    if audit is not None:
        app[AUDIT] = audit
    return await aiohttp_client(app)


async def test_routes_show_arms_live_weights_and_requests(tmp_path: Path, aiohttp_client) -> None:
    client = await start(aiohttp_client, settings_for(tmp_path))
    answers = [await predict(client, f"user-{i}") for i in range(40)]
    view = status_view(client.app)
    (route,) = view["routes"]
    arms = {a["arm"]: a for a in route["arms"]}
    assert {a: (x["target"], x["weight"]) for a, x in arms.items()} == {
        "champion": ("toy@2", 90.0),
        "challenger:toy@1": ("toy@1", 10.0),
    }
    served = {v: sum(a["model_version"] == v for a in answers) for v in ("1", "2")}
    assert arms["champion"]["requests"] == served["2"]
    assert arms["challenger:toy@1"]["requests"] == served["1"]
    assert route["policy_version"] == answers[0]["policy_version"]
    assert view["servers"] is None  # a bare FakeBackend: no pool, no breakers
    assert view["drift"] == {"enabled": True, "top": []}  # the gauges exist; nothing measured
    assert view["audit"] == {"enabled": True, "columns": [], "entries": []}  # on, no changes yet
    assert view["fallback"] == {"total": 0, "by_rung": []}
    json.dumps(view)  # plain data: the JSON endpoint serves it as is


async def test_canary_stage_without_decisions(tmp_path: Path, aiohttp_client) -> None:
    client = await start(aiohttp_client, settings_for(tmp_path))
    (canary,) = status_view(client.app)["canaries"]
    assert canary["automated"] and canary["decisions"] == [] and canary["gates"] == []
    assert canary["stage"] == "10 %: off the ladder (next step 25 %)"
    assert [s["state"] for s in canary["steps"]] == ["done", "next", "next", "next"]


async def test_no_canary_without_a_challenger(tmp_path: Path, aiohttp_client) -> None:
    client = await start(aiohttp_client, settings_for(tmp_path, route_extra=""))
    view = status_view(client.app)
    assert view["canaries"] == []
    assert [a["weight"] for a in view["routes"][0]["arms"]] == [100.0]


@pytest.mark.parametrize(
    ("p99", "errors", "action", "failing"),
    [
        (10.5, 0, "promote", set()),
        (12.0, 0, "rollback", {"p99 latency"}),
        (10.5, 9, "rollback", {"error rate"}),
    ],
)
async def test_canary_gates_agree_with_the_controller(
    tmp_path: Path, aiohttp_client, p99: float, errors: int, action: str, failing: set[str]
) -> None:
    settings = settings_for(tmp_path)
    client = await start(aiohttp_client, settings)
    pv = status_view(client.app)["routes"][0]["policy_version"]
    older = evaluation(10.0, 0, 5.0, "routes@old")
    latest = evaluation(p99, errors, 10.0, pv)
    write_records(settings.rollout.record_dir, older, latest, junk=True)
    (canary,) = status_view(client.app)["canaries"]
    assert [d["action"] for d in canary["decisions"]] == [action, older.verdict.action]
    assert canary["decisions"][0]["reasons"] == list(latest.verdict.reasons)
    assert latest.verdict.action == action and not canary["stale"]
    gates = {g["gate"]: g for g in canary["gates"]}
    assert {name for name, g in gates.items() if g["ok"] is False} == failing
    assert gates["p99 latency"]["limit"] == pytest.approx(11.0)  # champion 10 ms x 1.10
    assert gates["p99 latency"]["value"] == p99
    assert gates["error rate"]["value"] == pytest.approx(errors / 300, abs=1e-6)
    assert gates["answers per arm"] == {**gates["answers per arm"], "value": 300, "ok": True}
    assert gates["accuracy delta"]["ok"] is None  # no labels: not gating, as in decide()


async def test_a_decision_on_an_older_route_file_is_marked_stale(tmp_path, aiohttp_client) -> None:
    settings = settings_for(tmp_path)
    client = await start(aiohttp_client, settings)
    write_records(settings.rollout.record_dir, evaluation(10.0, 0, 10.0, "routes@edited"))
    (canary,) = status_view(client.app)["canaries"]
    assert canary["stale"] is True
    html = await (await client.get("/admin/ui")).text()
    assert "measured an earlier route file" in html


async def test_servers_show_readiness_and_breaker_states(tmp_path: Path, aiohttp_client) -> None:
    pool = BackendPool([PoolMember("a", toy_backend()), PoolMember("b", toy_backend())])
    client = await start(aiohttp_client, settings_for(tmp_path), backend=pool)
    await predict(client, "user-1")
    member = pool.members[1]
    member.ready = False
    pool.breaker(member, "toy").force_open()
    servers = {s["name"]: s for s in status_view(client.app)["servers"]}
    assert servers["b"]["ready"] is False
    assert {"model": "toy", "state": "open"} in servers["b"]["breakers"]
    assert servers["a"]["ready"] is True
    assert client.app[POOL] is pool
    html = await (await client.get("/admin/ui")).text()
    row = re.search(r'<tr class="server" data-server="b">.*?</tr>', html, re.S)
    assert row is not None and "down" in row.group(0) and 'badge open">open' in row.group(0)


async def test_fallback_answers_are_counted_by_rung(tmp_path: Path, aiohttp_client) -> None:
    backend = toy_backend()
    client = await start(aiohttp_client, settings_for(tmp_path, CANARY + FALLBACK), backend)
    backend.fail_with = BackendUnavailable("connection refused")
    answers = [await predict(client, f"user-{i}") for i in range(3)]
    assert {a["fallback_used"] for a in answers} == {"default"}
    fallback = status_view(client.app)["fallback"]
    assert fallback["total"] == 3
    assert [(r["rung"], r["count"]) for r in fallback["by_rung"]] == [("default", 3)]


async def test_drift_shows_the_top_features_once_gauges_exist(tmp_path, aiohttp_client) -> None:
    client = await start(aiohttp_client, settings_for(tmp_path))
    psi = client.app[METRICS].feature_drift_psi  # what gateway/drift's exporter sets
    values = {f"f{i}": i / 40 for i in range(12)}  # 0.0 .. 0.275
    for feature, v in values.items():
        psi.labels("toy", "2", feature).set(v)
    drift = status_view(client.app)["drift"]
    assert drift["enabled"] is True
    assert [d["feature"] for d in drift["top"]] == [f"f{i}" for i in range(11, 1, -1)]  # top 10
    levels = {d["feature"]: d["level"] for d in drift["top"]}
    assert (levels["f11"], levels["f5"], levels["f3"]) == ("alert", "warn", "ok")


async def test_reloads_are_listed_newest_first_and_escaped(tmp_path: Path, aiohttp_client) -> None:
    settings = settings_for(tmp_path)
    client = await start(aiohttp_client, settings)
    reloader = client.app[RELOADER]
    route = settings.routing.routes_dir / "toy.yaml"
    good = route.read_text()
    route.write_text(good + "<script>alert(1)</script>: 1\n")
    assert (await reloader.reload()).result == "rejected"
    route.write_text(good.replace("weight: 10", "weight: 25"))
    assert (await reloader.reload()).result == "ok"
    view = status_view(client.app)
    assert [r["result"] for r in view["reloads"]["recent"]] == ["ok", "rejected"]
    assert "<script>" in view["reloads"]["recent"][1]["error"]
    assert view["reloads"]["counts"] == {"ok": 1.0, "rejected": 1.0}
    html = await (await client.get("/admin/ui")).text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>" not in html
    assert 'data-arm="challenger:toy@1">' in html and 'data-weight="25"' in html


async def test_audit_entries_come_from_the_provider(tmp_path: Path, aiohttp_client) -> None:
    entries = [{"ts": "t1", "actor": "ops", "action": "set-weight <25>"}, {"ts": "t2"}]
    client = await start(aiohttp_client, settings_for(tmp_path), audit=ListAudit(entries))
    audit = status_view(client.app)["audit"]
    assert audit == {
        "enabled": True,
        "columns": ["ts", "actor", "action"],
        "entries": [{"ts": "t2"}, entries[0]],
    }
    html = await (await client.get("/admin/ui")).text()
    assert "set-weight &lt;25&gt;" in html


async def test_page_is_self_contained_html_that_refreshes(tmp_path: Path, aiohttp_client) -> None:
    client = await start(aiohttp_client, settings_for(tmp_path))
    resp = await client.get("/admin/ui")
    assert resp.status == 200 and resp.content_type == "text/html"
    assert resp.headers["Content-Security-Policy"].startswith("default-src 'none'")
    html = await resp.text()
    assert re.search(r'<meta http-equiv="refresh" content="\d+">', html)
    assert not re.search(r"""(src|href)=|@import|url\(""", html)  # no external assets
    weights = dict(re.findall(r'data-arm="([^"]+)">.*?data-weight="([^"]+)"', html, re.S))
    assert weights == {"champion": "90", "challenger:toy@1": "10"}
    for section in ("routes", "canary", "servers", "fallback", "drift", "reloads", "audit"):
        assert f'id="{section}"' in html
    assert "no drift measured yet" in html


async def test_json_endpoint_serves_the_view_model(tmp_path: Path, aiohttp_client) -> None:
    client = await start(aiohttp_client, settings_for(tmp_path))
    resp = await client.get("/admin/ui.json")
    assert resp.status == 200
    body = await resp.json()
    expected = status_view(client.app)
    assert body["routes"] == expected["routes"] and body["canaries"] == expected["canaries"]


def test_tail_records_reads_only_the_end_of_a_long_record(tmp_path: Path) -> None:
    path = tmp_path / "toy.jsonl"
    path.write_bytes(
        b"".join(orjson.dumps({"i": i, "pad": "x" * 200}) + b"\n" for i in range(2000))
    )
    assert path.stat().st_size > 256 * 1024
    assert [r["i"] for r in tail_records(path, 3)] == [1997, 1998, 1999]
    assert tail_records(tmp_path / "missing.jsonl", 3) == []


WORKER = """
import sys
from gateway.metrics import Metrics
m = Metrics(multiprocess_dir=sys.argv[1])
m.fallback.labels("cache", "error").inc(int(sys.argv[2]))
m.feature_drift_psi.labels("toy", "2", "a").set(float(sys.argv[2]) / 10)
if sys.argv[3] == "read":  # the page's reading, in the last worker (a heavier import)
    from gateway.api.status import _drift, _fallback, _families
    families = {f.name: f for f in _families(m)}
    print(_fallback(families.get("fallback"))["total"], _drift(families.get("feature_drift_psi")))
"""


def test_under_several_workers_the_registry_counts_every_worker(tmp_path: Path) -> None:
    """`serve --workers N`: prometheus_client keeps values in per-process files; the page sums
    them as /metrics does (separate interpreters: the mode is chosen at import)."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    outputs = [
        subprocess.run(
            [sys.executable, "-c", WORKER, str(tmp_path), str(n), mode],
            env=env, capture_output=True, text=True, check=True, timeout=60,
        ).stdout
        for n, mode in ((2, "write"), (3, "read"))
    ]  # fmt: skip
    total, drift = outputs[1].split(" ", 1)
    assert total == "5.0"  # the second worker sees both workers' fallbacks: 2 + 3
    assert "'psi': 0.3" in drift and "'level': 'alert'" in drift  # max over the workers
