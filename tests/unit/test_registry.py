"""The model registry on a copy of the shipped `risk` model: publish, list, verify, retire."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gateway.cli import main
from gateway.errors import RegistryError
from gateway.registry import publish as publish_mod
from gateway.registry.digest import sha256_file, version_digest
from gateway.registry.inventory import list_versions, retire, verify_version
from gateway.registry.publish import publish
from tests.registry_artifacts import (
    MODEL_REPOSITORY,
    model_repo,
    risk_artifact,
    risk_built,
    trainer,
)

ROUTE = """model: risk
champion: {target: risk, version: "2"}
challengers:
  - {target: risk, version: "1", weight: 10, sticky: entity_id}
shadow:
  - {target: risk, version: "%s", sample: 0.2}
slo: {p99_ms: 100}
"""


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return risk_artifact(tmp_path_factory.mktemp("artifact") / "risk", c=0.5)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return model_repo(tmp_path)


def routes(tmp: Path, shadow: str = "2") -> Path:
    d = tmp / "routes"
    d.mkdir(exist_ok=True)
    (d / "risk.yaml").write_text(ROUTE % shadow)
    return d


def test_publish_writes_the_next_version_with_its_manifest(repo: Path, artifact: Path) -> None:
    done = publish(repo, "risk", artifact, run_id="run-42")
    assert (done.version, done.created, done.path) == (3, True, repo / "risk" / "3")
    m = json.loads((done.path / "manifest.json").read_text())
    files = {p.name: sha256_file(p) for p in done.path.iterdir() if p.name != "manifest.json"}
    assert (
        m["files"]
        == files
        == {
            "model.py": sha256_file(MODEL_REPOSITORY / "model_template.py"),
            "weights.npz": sha256_file(artifact / "files" / "weights.npz"),
        }
    )
    assert m["digest"] == done.digest == version_digest(files)
    assert (m["model"], m["version"], m["training_run_id"]) == ("risk", 3, "run-42")
    assert m["dataset"]["name"] == "breast_cancer" and m["hyperparams"]["C"] == 0.5
    assert (
        m["runtime"]["backend"] == "python" and "nvidia-pytriton" in m["runtime"]["backend_version"]
    )
    assert m["preprocessing"]["type"] == "standardize"
    assert len(m["input_schema"]["features"]) == 30
    with np.load(done.path / "weights.npz") as npz:
        assert m["memory"]["bytes"] == sum(npz[k].nbytes for k in npz.files)
    assert m["golden"]["cases"] and m["probe"]["features"] == m["golden"]["cases"][0]["features"]
    n_train = m["dataset"]["n_train"]
    for name in m["input_schema"]["features"]:
        h = m["histograms"]["features"][name]
        assert sum(h["counts"]) == n_train and h["edges"] == sorted(h["edges"])
        assert max(h["counts"]) < 0.2 * n_train  # quantile bins: about a tenth each
    assert not (repo / "risk" / ".publish").exists()


def test_identical_content_names_the_existing_version(repo: Path, artifact: Path, capsys) -> None:
    publish(repo, "risk", artifact)
    before = sorted(p.name for p in (repo / "risk").iterdir())
    args = ["models", "publish", str(artifact), "--model", "risk", "--repository", str(repo)]
    assert main(args) == 0
    assert "identical to risk/3" in capsys.readouterr().out
    assert sorted(p.name for p in (repo / "risk").iterdir()) == before


def test_the_shipped_versions_are_recognised_by_content(repo: Path, tmp_path: Path) -> None:
    art = tmp_path / "v2"
    shutil.copytree(risk_artifact(tmp_path / "any"), art)
    shutil.copyfile(MODEL_REPOSITORY / "risk/2/weights.npz", art / "files" / "weights.npz")
    done = publish(repo, "risk", art)
    assert (done.version, done.created) == (2, False)


def test_publish_never_overwrites_and_a_failed_copy_leaves_nothing(
    repo: Path, artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = sorted(p.name for p in (repo / "risk").iterdir())
    with pytest.raises(RegistryError, match="next one is 3"):
        publish(repo, "risk", artifact, version=2)
    calls = []

    def failing_copy(src: Path, dst: Path) -> None:
        calls.append(src)
        raise OSError("disk full")

    monkeypatch.setattr(publish_mod.shutil, "copyfile", failing_copy)
    with pytest.raises(RegistryError, match="disk full"):
        publish(repo, "risk", artifact)
    assert calls
    assert sorted(p.name for p in (repo / "risk").iterdir()) == before
    assert "3" not in before


def test_list_shows_digest_and_where_each_version_is_live(
    repo: Path, artifact: Path, tmp_path: Path, capsys
) -> None:
    publish(repo, "risk", artifact)
    d = routes(tmp_path, shadow="3")
    got = {v.version: v for v in list_versions(repo, "risk", d)}
    assert got[2].live == ("risk.yaml: champion",)
    assert got[1].live == ("risk.yaml: challenger 10%",)
    assert got[3].live == ("risk.yaml: shadow 0.2",)
    assert got[3].digest.startswith("sha256:") and len({v.digest for v in got.values()}) == 3
    assert main(["models", "list", "--repository", str(repo), "--routes-dir", str(d)]) == 0
    out = capsys.readouterr().out
    assert "risk/2" in out and "champion" in out and "unvalidated" in out


def test_verify_names_the_tampered_file(repo: Path, artifact: Path, capsys) -> None:
    publish(repo, "risk", artifact)
    args = ["models", "verify", "--model", "risk", "--repository", str(repo)]
    assert main(args) == 0
    weights = repo / "risk" / "3" / "weights.npz"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    (repo / "risk" / "1" / "extra.bin").write_bytes(b"x")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{weights}: sha256" in err and "tampered" in err
    assert "extra.bin: present but not listed" in err
    assert verify_version(repo / "risk" / "2") == []


def test_the_committed_repository_verifies() -> None:
    assert main(["models", "verify", "--repository", str(MODEL_REPOSITORY)]) == 0


def test_retire_keeps_the_last_ten_and_every_routed_version(
    repo: Path, artifact: Path, tmp_path: Path
) -> None:
    for i in range(12):  # versions 3..14, each with distinct content
        art = tmp_path / f"a{i}"
        shutil.copytree(artifact, art)
        (art / "files" / "notes.txt").write_text(f"build {i}\n")
        assert publish(repo, "risk", art).version == 3 + i
    d = routes(tmp_path, shadow="3")  # routes name 1 (challenger), 2 (champion), 3 (shadow)
    with pytest.raises(RegistryError, match="at least the last 10"):
        retire(repo, "risk", d, keep=5)
    assert retire(repo, "risk", d, dry_run=True) == [4]
    assert (repo / "risk" / "4").is_dir()
    assert retire(repo, "risk", d) == [4]
    left = sorted(int(p.name) for p in (repo / "risk").iterdir() if p.name.isdigit())
    assert left == [1, 2, 3, *range(5, 15)]
    assert retire(repo, "risk", d) == []


def test_export_artifact_is_what_train_py_builds(tmp_path: Path) -> None:
    train = trainer()
    built = risk_built()
    art = train.export_artifact(built, tmp_path / "a")
    golden = json.loads((art / "golden.json").read_text())
    assert golden["cases"][0]["features"] == train.pick_probe(built)["features"]
    with np.load(art / "files" / "weights.npz") as npz:
        logits = train.forward(
            {k: npz[k] for k in npz.files}, np.array([golden["cases"][1]["features"]])
        )
    assert (
        abs(float(train.sigmoid(logits[:, 0])[0]) - golden["cases"][1]["expected"]["score"]) < 1e-9
    )


def test_retire_refuses_when_a_route_file_is_broken(repo: Path, tmp_path: Path, capsys) -> None:
    d = routes(tmp_path)
    (d / "risk.yaml").write_text("model: risk\nchampion: [not, a, target]\n")
    args = ["models", "retire", "--repository", str(repo), "--routes-dir", str(d)]
    assert main(args) == 1
    assert "champion" in capsys.readouterr().err
    assert (repo / "risk" / "1").is_dir() and (repo / "risk" / "2").is_dir()
