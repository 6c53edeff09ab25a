"""The validation gate against a real tritonserver: four bad versions, each refused for its own
reason (wrong outputs, less accurate, slow, incompatible schema), and one that passes and then
goes live through the reloader and `routes set-weight`.

One server for the module, on a copy of `risk` serving v1 and v2 only (as before a release):
`models validate` loads each candidate through explicit model control.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.backends.triton import TritonBackend
from gateway.catalog import ModelCatalog
from gateway.cli import main
from gateway.metrics import Metrics
from gateway.registry.publish import publish
from gateway.registry.report import ValidationGate, refusal, write_report
from gateway.registry.validate import Thresholds, validate
from gateway.routing.edit import set_weight
from gateway.routing.readiness import VersionGate
from gateway.routing.reload import RouteReloader
from gateway.routing.table import RouteError, RouteTableRef, Target, load_route_table, parse_route
from gateway.tritonserver import TritonInstallation, TritonOptions, TritonPorts, TritonServer
from tests.registry_artifacts import model_repo, risk_artifact

ROUTE = """model: risk
champion: {target: risk, version: "2"}
challengers:
  - {target: risk, version: "%s", weight: 0, sticky: entity_id}
slo: {p99_ms: 100}
"""
SLEEP_S = 0.15  # the slow version's extra time per execute: over the 100 ms SLO


def _slow(artifact: Path) -> None:
    model_py = artifact / "files" / "model.py"
    src = model_py.read_text().replace("import json\n", "import json\nimport time\n", 1)
    src = src.replace(
        "    def execute(self, requests):\n",
        f"    def execute(self, requests):\n        time.sleep({SLEEP_S})\n",
        1,
    )
    model_py.write_text(src)


def _swap_features(artifact: Path) -> None:
    path = artifact / "training.json"
    training = json.loads(path.read_text())
    f = training["input_schema"]["features"]
    f[0], f[1] = f[1], f[0]
    path.write_text(json.dumps(training))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("registry")
    repo = model_repo(tmp)
    good = risk_artifact(tmp / "good", c=0.5)
    wrong = risk_artifact(tmp / "wrong", c=2.0)  # its golden outputs are another model's
    shutil.copyfile(good / "golden.json", wrong / "golden.json")
    weak = risk_artifact(tmp / "weak", c=0.01)
    slow = shutil.copytree(good, tmp / "slow")
    _slow(slow)
    schema = risk_artifact(tmp / "schema", c=0.7)
    _swap_features(schema)
    for version, art in enumerate((good, wrong, weak, slow, schema), start=3):
        assert publish(repo, "risk", art).version == version
    config = repo / "risk" / "config.pbtxt"
    text = config.read_text()
    serving = text.replace("{ latest: { num_versions: 10 } }", "{ specific: { versions: [1, 2] } }")
    assert serving != text
    config.write_text(serving)
    return repo


@pytest.fixture(scope="module")
def server(
    repo: Path, triton_installation: TritonInstallation, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    s = TritonServer(
        TritonOptions(
            model_repository=repo,
            ports=TritonPorts.free(),
            model_control_mode="explicit",
            load_models=("risk",),
        ),
        installation=triton_installation,
        log_file=tmp_path_factory.mktemp("triton") / "tritonserver.log",
        ready_timeout_s=120,
    )
    with s:
        yield s


@pytest.fixture(scope="module")
def routes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("routes")
    (d / "risk.yaml").write_text(ROUTE % "1")
    return d


def server_ready(server: TritonServer, version: str) -> bool:
    try:
        with urllib.request.urlopen(f"{server.http_url}/v2/models/risk/versions/{version}/ready"):
            return True
    except urllib.error.HTTPError:
        return False


def _validate(repo: Path, routes: Path, server: TritonServer, version: str) -> int:
    return main(
        ["models", "validate", "--model", "risk", "--version", version, "--probes", "10",
         "--repository", str(repo), "--routes-dir", str(routes), "--triton-url", server.grpc_url]
    )  # fmt: skip


@pytest.mark.parametrize(
    ("version", "check", "why"),
    [
        ("4", "golden", "expected"),
        ("5", "metrics", "holdout_accuracy 0.937063 < 0.972028"),
        ("6", "latency", "> slo.p99_ms 100"),
        ("7", "schema", "feature 0 is 'mean_texture'"),
    ],
)
def test_a_bad_version_is_refused_for_its_own_reason(
    repo: Path, routes: Path, server: TritonServer, capsys, version: str, check: str, why: str
) -> None:
    assert _validate(repo, routes, server, version) == 1
    out = capsys.readouterr().out
    failed = [line.split()[1] for line in out.splitlines() if line.startswith("FAIL")]
    assert failed == [check], out
    if check in ("schema", "metrics"):  # a statically bad version is never loaded
        skipped = [line.split()[1] for line in out.splitlines() if line.startswith("SKIP")]
        assert skipped == ["load", "golden", "latency"], out
        assert not server_ready(server, version)
    report = json.loads((repo / "risk" / "validation" / f"{version}.json").read_text())
    assert not report["passed"]
    reason = refusal(repo, "risk", version)
    assert reason is not None and f"check '{check}'" in reason and why in reason, reason
    with pytest.raises(RouteError, match=f"failed validation check '{check}'"):
        ValidationGate(repo).require([Target("risk", version)])


async def test_the_gate_keeps_unvalidated_versions_out_and_lets_a_passing_one_in(
    repo: Path, routes: Path, server: TritonServer, tmp_path: Path
) -> None:
    live = tmp_path / "routes"
    live.mkdir()
    (live / "risk.yaml").write_text(ROUTE % "1")
    backend = TritonBackend(server.grpc_url)
    gate = ValidationGate(repo)
    ref = RouteTableRef(load_route_table(live, ModelCatalog.load(repo)))
    reloader = RouteReloader(
        live,
        ref,
        VersionGate(backend, timeout_s=60, validation=gate),
        Metrics(),
        load_catalog=lambda: ModelCatalog.load(repo),
    )
    try:
        # No report yet for v3: the reloader and set-weight both refuse, naming the command.
        (live / "risk.yaml").write_text(ROUTE % "3")
        result = await reloader.reload()
        assert result.result == "rejected" and "no validation report" in (result.error or "")
        with pytest.raises(RouteError, match="models validate --model risk --version 3"):
            set_weight(live, "risk", "3", 10, validation=gate)
        assert not await backend.model_ready("risk", "3", 5)  # refused before any load
        route = parse_route((routes / "risk.yaml").read_bytes(), "risk.yaml")
        report = await validate(repo, "risk", "3", route, backend, Thresholds(probes=10))
        assert report["passed"], report["checks"]
        assert [c["name"] for c in report["checks"]] == [
            "schema", "metrics", "load", "golden", "latency"
        ]  # fmt: skip
        write_report(repo, "risk", "3", report)
        assert gate.refusal("risk", "3") is None
        result = await reloader.reload()
        assert result.result == "ok", result.error
        assert set_weight(live, "risk", "3", 10, validation=gate) == live / "risk.yaml"
        result = await reloader.reload()
        assert result.result == "ok", result.error
        arms = {a.target.version: a.buckets for a in ref.current.get("risk").split.arms}
        assert arms["3"] == 1000
        for v in ("1", "2", "3"):
            assert await backend.model_ready("risk", v, 5)
    finally:
        await backend.close()
