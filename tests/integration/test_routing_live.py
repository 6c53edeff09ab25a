"""Routing in a real gateway process against the real tritonserver: a live route edit under
load, and sticky arms across two gateway instances and a restart."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from gateway.tritonserver import TritonServer
from tests.integration.conftest import GatewayProcess, start_gateway, stop_gateway, wait_http_ok


def probe_features(repo_root: Path) -> list[float]:
    manifest = json.loads((repo_root / "model_repository/risk/2/manifest.json").read_text())
    return manifest["probe"]["features"]


def predict(url: str, features: list[float], entity: str) -> dict[str, Any]:
    body = json.dumps({"model_name": "risk", "entity_id": entity, "features": features}).encode()
    req = urllib.request.Request(f"{url}/v1/predict", data=body, method="POST")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def start(repo_root: Path, workdir: Path, triton: TritonServer, routes: Path) -> GatewayProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    gw = start_gateway(
        repo_root,
        workdir,
        triton.grpc_url,
        {
            "SWITCHYARD__ROUTING__ROUTES_DIR": str(routes),
            "SWITCHYARD__ROUTING__RELOAD_INTERVAL_S": "0.2",
        },
    )
    wait_http_ok(f"{gw.url}/readyz", 60, gw.process, gw.log_file)
    return gw


@pytest.fixture
def routes(repo_root: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "routes"
    shutil.copytree(repo_root / "configs/routes", copy)
    return copy


def test_route_edit_under_load_moves_traffic_within_a_second(
    triton: TritonServer, repo_root: Path, tmp_path: Path, routes: Path
) -> None:
    gw = start(repo_root, tmp_path / "gw", triton, routes)
    features = probe_features(repo_root)
    results: list[tuple[float, str, str]] = []  # (time, policy_version, model_version)
    failures: list[str] = []
    stop = threading.Event()

    def client(n: int) -> None:
        i = 0
        while not stop.is_set() and i < 3000:
            i += 1
            try:
                body = predict(gw.url, features, f"user-{n}-{i}")
                results.append((time.monotonic(), body["policy_version"], body["model_version"]))
            except (urllib.error.URLError, OSError, KeyError) as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while len(results) < 50:
            assert time.monotonic() < deadline and not failures, failures[:3]
            time.sleep(0.01)
        old_policy = results[-1][1]
        assert {r[2] for r in results} == {"1", "2"}  # the shipped 10 % canary is live
        # The edit: promote v1 to champion, no challengers (written in place, like an editor).
        text = (routes / "risk.yaml").read_text()
        edited = text.replace(
            'champion: {target: risk, version: "2"}', 'champion: {target: risk, version: "1"}'
        )
        edited = (
            "\n".join(
                ln
                for ln in edited.splitlines()
                if "weight:" not in ln and not ln.startswith("challengers:")
            )
            + "\n"
        )
        assert edited != text
        written_at = time.monotonic()
        (routes / "risk.yaml").write_text(edited)
        while not any(r[1] != old_policy for r in results[-20:]):
            assert time.monotonic() < written_at + 10, "the edit was never picked up"
            time.sleep(0.01)
        switched_at = min(r[0] for r in results if r[1] != old_policy)
        settle = time.monotonic() + 0.5
        while time.monotonic() < settle:
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        stop_gateway(gw)
    assert failures == []
    assert switched_at - written_at < 1.0
    after = [r for r in results if r[0] > switched_at + 0.1]
    assert after and {(r[1], r[2]) for r in after} == {(after[0][1], "1")}  # v1 only, new policy


def test_sticky_arms_agree_across_instances_and_a_restart(
    triton: TritonServer, repo_root: Path, tmp_path: Path, routes: Path
) -> None:
    features = probe_features(repo_root)
    entities = [f"user-{i}" for i in range(150)]
    a = start(repo_root, tmp_path / "a", triton, routes)
    b = start(repo_root, tmp_path / "b", triton, routes)
    try:
        arms_a = [predict(a.url, features, e)["model_version"] for e in entities]
        arms_b = [predict(b.url, features, e)["model_version"] for e in entities]
        stop_gateway(b)
        b = start(repo_root, tmp_path / "b2", triton, routes)
        arms_b2 = [predict(b.url, features, e)["model_version"] for e in entities]
        repeat_a = [predict(a.url, features, e)["model_version"] for e in entities]
    finally:
        stop_gateway(a)
        stop_gateway(b)
    assert arms_a == arms_b == arms_b2 == repeat_a
    assert 0 < arms_a.count("1") < 50  # the 10 % canary holds some entities, not most
