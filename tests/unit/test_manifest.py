"""Static checks of model_repository/: manifests, hashes, export format, reproducible training."""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2] / "model_repository"
REQUIRED_KEYS = {
    "model",
    "version",
    "files",
    "training_run_id",
    "dataset",
    "metrics",
    "runtime",
    "architecture",
    "input_schema",
    "outputs",
    "decision",
    "probe",
}


def _version_dirs() -> list[Path]:
    return sorted(
        v
        for cfg in REPO.glob("*/config.pbtxt")
        for v in cfg.parent.iterdir()
        if v.is_dir() and v.name.isdigit()
    )


VERSION_DIRS = _version_dirs()
IDS = [f"{v.parent.name}/{v.name}" for v in VERSION_DIRS]


def _manifest(vdir: Path) -> dict:
    return json.loads((vdir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("switchyard_model_train", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_repository_layout():
    assert {v.parent.name for v in VERSION_DIRS} == {"risk", "risk_distilled", "digits"}
    # Triton treats every subdirectory as a model: each one must have a config.
    for sub in REPO.iterdir():
        if sub.is_dir() and sub.name not in {"__pycache__"} and not sub.name.startswith("."):
            assert (sub / "config.pbtxt").is_file(), f"{sub} would be loaded as a broken model"


@pytest.mark.parametrize("vdir", VERSION_DIRS, ids=IDS)
def test_hashes_match_and_nothing_unlisted(vdir):
    m = _manifest(vdir)
    assert m.keys() >= REQUIRED_KEYS
    assert (m["model"], m["version"]) == (vdir.parent.name, int(vdir.name))
    assert set(m["files"]) == {"model.py", "weights.npz"}
    for name, digest in m["files"].items():
        assert hashlib.sha256((vdir / name).read_bytes()).hexdigest() == digest, name
    extra = {p.name for p in vdir.iterdir()} - set(m["files"]) - {"manifest.json", "__pycache__"}
    assert not extra


@pytest.mark.parametrize("vdir", VERSION_DIRS, ids=IDS)
def test_model_py_is_the_template(vdir):
    assert (vdir / "model.py").read_bytes() == (REPO / "model_template.py").read_bytes()


@pytest.mark.parametrize("vdir", VERSION_DIRS, ids=IDS)
def test_weights_match_architecture_and_config(vdir):
    m = _manifest(vdir)
    layers = m["architecture"]["layers"]
    n_in = len(m["input_schema"]["features"])
    assert m["input_schema"]["shape"] == [n_in] == [layers[0]]
    assert len(set(m["input_schema"]["features"])) == n_in
    with np.load(vdir / "weights.npz", allow_pickle=False) as npz:
        w = {k: npz[k] for k in npz.files}
    expected = {"mean", "scale"} | {f"{p}{i}" for i in range(len(layers) - 1) for p in "Wb"}
    assert set(w) == expected
    assert w["mean"].shape == w["scale"].shape == (n_in,)
    assert np.all(w["scale"] > 0)
    for i, (a, b) in enumerate(itertools.pairwise(layers)):
        assert w[f"W{i}"].shape == (a, b) and w[f"b{i}"].shape == (b,)
    cfg = (vdir.parent / "config.pbtxt").read_text()
    assert f'name: "{m["model"]}"' in cfg
    assert re.search(rf'name: "features"\s+data_type: TYPE_FP32\s+dims: \[ {n_in} \]', cfg)
    assert re.findall(r'name: "(\w+)"\s+data_type', cfg)[1:] == m["outputs"]
    assert "max_queue_delay_microseconds: 5000" in cfg
    assert "num_versions: 10" in cfg and "KIND_CPU" in cfg


@pytest.mark.parametrize("vdir", VERSION_DIRS, ids=IDS)
def test_probe_reproduces_with_exported_weights(vdir, train):
    m = _manifest(vdir)
    with np.load(vdir / "weights.npz", allow_pickle=False) as npz:
        w = {k: npz[k] for k in npz.files}
    x = np.asarray([m["probe"]["features"]], dtype=np.float32).astype(np.float64)
    logits = train.forward(w, x)
    if m["architecture"]["output_activation"] == "sigmoid":
        score = float(train.sigmoid(logits[:, 0])[0])
    else:
        score = float(train.softmax(logits).max())
    assert abs(score - m["probe"]["expected"]["score"]) <= 1e-6


def test_risk_score_is_probability_of_malignant():
    """Sign convention: sklearn target 0 = malignant; score must be high for malignant rows."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    for vdir in VERSION_DIRS:
        m = _manifest(vdir)
        if m["dataset"]["name"] != "breast_cancer":
            continue
        with np.load(vdir / "weights.npz", allow_pickle=False) as npz:
            w = {k: npz[k] for k in npz.files}
        h = (data.data - w["mean"]) / w["scale"]
        for i in range(len(m["architecture"]["layers"]) - 1):
            h = h @ w[f"W{i}"] + w[f"b{i}"]
            h = np.maximum(h, 0) if i < len(m["architecture"]["layers"]) - 2 else h
        score = 1 / (1 + np.exp(-h[:, 0]))
        assert score[data.target == 0].mean() > 0.8 > 0.2 > score[data.target == 1].mean()


@pytest.mark.parametrize("vdir", VERSION_DIRS, ids=IDS)
def test_training_run_id_recomputes(vdir, train):
    m = _manifest(vdir)
    data = train.load(m["dataset"]["name"])
    assert data.fingerprint == m["dataset"]["fingerprint_sha256"]
    assert train.training_run_id(data, m["hyperparams"]) == m["training_run_id"]


def test_metrics_recorded():
    by_id = {i: _manifest(v)["metrics"] for i, v in zip(IDS, VERSION_DIRS, strict=True)}
    for metrics in by_id.values():
        assert metrics["holdout_accuracy"] > 0.9
    assert by_id["risk_distilled/1"]["fidelity_vs_teacher"]["teacher"] == "risk/2"
    assert by_id["risk_distilled/1"]["fidelity_vs_teacher"]["label_agreement"] > 0.9


def _same_runtime() -> bool:
    import sklearn

    runtime = _manifest(VERSION_DIRS[0])["runtime"]
    return (runtime["numpy"], runtime["sklearn"]) == (np.__version__, sklearn.__version__)


# Float64 training (lbfgs, adam, a Ridge solve) goes through OpenBLAS, whose kernels are chosen
# per CPU at load time (AVX-512 vs AVX2 ...): on another CPU the same code, data and seeds give
# weights that differ in the last bits (seen: 1e-13 on values of ~1). So the artifacts are
# byte-identical on the training machine's CPU, and elsewhere equal up to that rounding
# (`train.rounding_only`), which `make train` then keeps as committed.
def test_retraining_reproduces_the_artifacts(tmp_path, train):
    if not _same_runtime():
        pytest.skip("artifacts were trained with another numpy/scikit-learn version")
    train.main(["--out", str(tmp_path)])
    produced = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    assert produced
    committed = {
        p.relative_to(REPO)
        for p in REPO.glob("*/**/*")
        if p.is_file()
        and "__pycache__" not in p.parts
        # validation reports are the registry's record of `models validate` runs on a live
        # tritonserver, not training output
        and "validation" not in p.parts
    }
    assert committed == produced
    for rel in produced:
        new, old = (tmp_path / rel).read_bytes(), (REPO / rel).read_bytes()
        assert new == old or train.rounding_only(str(rel), new, old), rel


def test_retraining_in_place_changes_nothing(tmp_path, train, capsys):
    if not _same_runtime():
        pytest.skip("artifacts were trained with another numpy/scikit-learn version")
    repo = tmp_path / "repo"
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns("__pycache__"))
    before = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    train.main(["--out", str(repo)])
    assert capsys.readouterr().out.splitlines()[-1] == "no changes"
    assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()} == before


def test_rounding_only_rejects_real_changes(train):
    vdir = REPO / "risk" / "1"
    weights, manifest = (vdir / "weights.npz").read_bytes(), (vdir / "manifest.json").read_bytes()
    with np.load(vdir / "weights.npz") as w:
        arrays = {k: w[k].copy() for k in w.files}

    def npz(**changes: np.ndarray) -> bytes:
        return train.npz_bytes({**arrays, **changes})

    rounded = arrays["W0"] * (1 + 1e-14)
    assert train.rounding_only("weights.npz", npz(W0=rounded), weights)
    assert not train.rounding_only("weights.npz", npz(W0=arrays["W0"] * (1 + 1e-6)), weights)
    assert not train.rounding_only("weights.npz", npz(W0=arrays["W0"][:-1]), weights)
    assert not train.rounding_only("weights.npz", npz(extra=arrays["b0"]), weights)
    doc = json.loads(manifest)
    doc["files"]["weights.npz"] = "0" * 64
    doc["probe"]["expected"] = json.loads(json.dumps(doc["probe"]["expected"]))
    assert train.rounding_only("manifest.json", json.dumps(doc).encode(), manifest)
    doc["probe"]["holdout_index"] += 1
    assert not train.rounding_only("manifest.json", json.dumps(doc).encode(), manifest)
    assert not train.rounding_only("model.py", b"x", b"y")


def test_existing_versions_are_immutable(tmp_path, train):
    if not _same_runtime():
        pytest.skip("artifacts were trained with another numpy/scikit-learn version")
    train.main(["--out", str(tmp_path)])
    target = tmp_path / "risk" / "1" / "weights.npz"
    trained = target.read_bytes()
    target.write_bytes(b"changed")
    with pytest.raises(SystemExit, match="immutable"):
        train.main(["--out", str(tmp_path)])
    assert target.read_bytes() == b"changed"
    train.main(["--out", str(tmp_path), "--force"])
    assert target.read_bytes() == trained
