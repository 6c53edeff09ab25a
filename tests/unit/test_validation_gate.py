"""The validation gate without Triton: which reports let a version through, and where the
gate sits (reloader before any load, set-weight above 0 %, the controller's step up)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.catalog import ModelCatalog
from gateway.config import RoutingSettings, load_settings
from gateway.registry.publish import publish
from gateway.registry.report import ValidationGate, report_status, write_report
from gateway.routing.edit import set_weight
from gateway.routing.readiness import VersionGate
from gateway.routing.table import RouteError, Target, load_route_table
from tests.registry_artifacts import model_repo, risk_artifact

ROUTE = """model: risk
champion: {target: risk, version: "2"}
challengers:
  - {target: risk, version: "%s", weight: %s, sticky: entity_id}
"""


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return risk_artifact(tmp_path_factory.mktemp("artifact") / "risk", c=0.5)


@pytest.fixture
def repo(tmp_path: Path, artifact: Path) -> Path:
    repo = model_repo(tmp_path)
    assert publish(repo, "risk", artifact).version == 3
    return repo


def _report(repo: Path, version: str = "3", **changes: object) -> dict:
    from gateway.registry.layout import read_manifest
    from gateway.registry.publish import manifest_digest

    digest = manifest_digest(read_manifest(repo / "risk" / version))
    checks = [{"name": n, "passed": True, "detail": "ok"} for n in ("schema", "golden")]
    report = {"model": "risk", "version": version, "digest": digest, "passed": True}
    return {**report, "checks": checks, **changes}


def test_only_a_passing_report_for_the_current_content_lets_a_version_through(
    repo: Path,
) -> None:
    gate = ValidationGate(repo)
    assert "has no validation report" in (gate.refusal("risk", "3") or "")
    assert report_status(repo, "risk", "3") == "unvalidated"
    failed = [{"name": "golden", "passed": False, "detail": "case 0: score 0.4"}]
    write_report(repo, "risk", "3", _report(repo, passed=False, checks=failed))
    assert "failed validation check 'golden': case 0: score 0.4" in (
        gate.refusal("risk", "3") or ""
    )
    assert report_status(repo, "risk", "3") == "failed:golden"
    write_report(repo, "risk", "3", _report(repo, digest="sha256:" + "0" * 64))
    assert "stale" in (gate.refusal("risk", "3") or "")
    write_report(repo, "risk", "3", _report(repo))
    assert gate.refusal("risk", "3") is None
    assert report_status(repo, "risk", "3") == "validated"
    gate.require([Target("risk", "3")])
    with pytest.raises(RouteError, match="risk@2 has no validation report"):
        gate.require([Target("risk", "3"), Target("risk", "2")])


def test_set_weight_refuses_a_step_up_but_always_allows_a_rollback(
    repo: Path, tmp_path: Path
) -> None:
    routes = tmp_path / "routes"
    routes.mkdir()
    path = routes / "risk.yaml"
    path.write_text(ROUTE % ("3", "5"))
    gate = ValidationGate(repo)
    with pytest.raises(RouteError, match="risk@3 has no validation report"):
        set_weight(routes, "risk", "3", 25, validation=gate)
    assert "weight: 5," in path.read_text()  # untouched
    set_weight(routes, "risk", "3", 0, validation=gate)
    assert "weight: 0," in path.read_text()
    write_report(repo, "risk", "3", _report(repo))
    set_weight(routes, "risk", "3", 25, validation=gate)
    assert "weight: 25," in path.read_text()


class _NoCalls:
    """A backend that fails the test if the gate asks it anything."""

    name = "untouchable"

    async def model_ready(self, *args: object) -> bool:
        raise AssertionError("the gate asked for readiness before refusing")

    async def infer(self, *args: object) -> None:
        raise AssertionError("the gate probed before refusing")

    async def load_model(self, *args: object) -> None:
        raise AssertionError("the gate loaded before refusing")


async def test_the_reloader_gate_refuses_before_loading_anything(
    repo: Path, tmp_path: Path
) -> None:
    routes = tmp_path / "routes"
    routes.mkdir()
    (routes / "risk.yaml").write_text("model: risk\nchampion: {target: risk, version: '2'}\n")
    catalog = ModelCatalog.load(repo)
    live = load_route_table(routes, catalog)
    (routes / "risk.yaml").write_text(ROUTE % ("3", "10"))
    table = load_route_table(routes, catalog)
    gate = VersionGate(_NoCalls(), validation=ValidationGate(repo))  # type: ignore[arg-type]
    with pytest.raises(RouteError, match="risk@3 has no validation report"):
        await gate.check(table, live, catalog)
    await gate.check(live, live, catalog)  # nothing new: nothing to refuse


def test_the_shipped_config_enforces_the_gate(repo_root: Path) -> None:
    # The library default stays off (a bare Settings() has no registry to read), the shipped
    # config turns it on: every version a shipped route names has a committed passing report.
    assert RoutingSettings().require_validation is False
    settings = load_settings(repo_root / "configs" / "gateway.yaml", env={}, base_dir=repo_root)
    assert settings.routing.require_validation is True


def test_every_shipped_routed_version_has_a_passing_report(repo_root: Path) -> None:
    repo = repo_root / "model_repository"
    catalog = ModelCatalog.load(repo)
    table = load_route_table(repo_root / "configs" / "routes", catalog)
    ValidationGate(repo).require(sorted(table.targets(), key=str))  # raises on any refusal
