"""Version readiness against a real tritonserver in explicit model-control mode: a broken new
version never takes traffic, a good one is loaded beside the serving versions and goes live.

Uses a server of its own on a copy of the repository (a test that adds versions must not
disturb the shared one)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from gateway.backends.triton import TritonBackend
from gateway.catalog import ModelCatalog
from gateway.metrics import Metrics
from gateway.routing.readiness import VersionGate
from gateway.routing.reload import RouteReloader
from gateway.routing.table import RouteTableRef, load_route_table
from gateway.tritonserver import TritonServer
from tests.reference import without_warmup

ROUTE = """model: risk
champion: {target: risk, version: "%s"}
fallback: {target: risk_distilled, version: "1"}
"""


def make_repo(repo_root: Path, tmp: Path) -> Path:
    repo = tmp / "model_repository"
    for model in ("risk", "risk_distilled"):
        shutil.copytree(
            repo_root / "model_repository" / model,
            repo / model,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        config = repo / model / "config.pbtxt"  # v3 fails to load: no warm-up race (see helper)
        config.write_text(without_warmup(config.read_text()))
    # v3: corrupt weights (the sha256 check in initialize fails: Triton cannot load it).
    shutil.copytree(repo / "risk" / "2", repo / "risk" / "3")
    (repo / "risk" / "3" / "weights.npz").write_bytes(b"not weights")
    # v4: loads fine, but answers differently from what its manifest promises (v1's weights
    # under a probe recorded from v2).
    shutil.copytree(repo / "risk" / "1", repo / "risk" / "4")
    m1 = json.loads((repo / "risk/1/manifest.json").read_text())
    m2 = json.loads((repo / "risk/2/manifest.json").read_text())
    m1["probe"] = {**m2["probe"], "expected": {**m2["probe"]["expected"], "score": 0.9}}
    (repo / "risk/4/manifest.json").write_text(json.dumps(m1))
    # v5: a faithful copy of v2, the good new version.
    shutil.copytree(repo / "risk" / "2", repo / "risk" / "5")
    return repo


async def test_only_a_version_that_loads_and_passes_its_probe_takes_traffic(
    triton_factory, repo_root: Path, tmp_path: Path
) -> None:
    repo = make_repo(repo_root, tmp_path)
    # Serving v1 and v2 only, as before a release adds versions to the repository.
    config = (repo / "risk/config.pbtxt").read_text()
    serving = config.replace(
        "version_policy: { latest: { num_versions: 10 } }",
        "version_policy: { specific: { versions: [1, 2] } }",
    )
    assert serving != config
    (repo / "risk/config.pbtxt").write_text(serving)
    server: TritonServer = triton_factory(
        repo, model_control_mode="explicit", load_models=("risk", "risk_distilled")
    )
    routes = tmp_path / "routes"
    routes.mkdir()
    (routes / "risk.yaml").write_text(ROUTE % "2")
    backend = TritonBackend(server.grpc_url)
    metrics = Metrics()
    ref = RouteTableRef(load_route_table(routes, ModelCatalog.load(repo)))
    reloader = RouteReloader(
        routes,
        ref,
        VersionGate(backend, timeout_s=60),
        metrics,
        load_catalog=lambda: ModelCatalog.load(repo),
    )
    try:
        for version, error in (("3", "risk@3 failed to load"), ("4", "risk@4 probe mismatch")):
            (routes / "risk.yaml").write_text(ROUTE % version)
            result = await reloader.reload()
            assert result.result == "rejected" and error in (result.error or ""), result
            assert ref.current.get("risk").champion.version == "2"
            # The serving versions were never disturbed by the failed attempt.
            for v in ("1", "2"):
                assert await backend.model_ready("risk", v, 5), f"risk v{v} went down"
        (routes / "risk.yaml").write_text(ROUTE % "5")
        result = await reloader.reload()
        assert result.result == "ok", result.error
        assert ref.current.get("risk").champion.version == "5"
        for v in ("1", "2", "5"):
            assert await backend.model_ready("risk", v, 5)
        assert not await backend.model_ready("risk", "3", 5)
        sample = metrics.registry.get_sample_value
        assert sample("route_reloads_total", {"result": "rejected"}) == 2
        assert sample("route_reloads_total", {"result": "ok"}) == 1
    finally:
        await backend.close()
