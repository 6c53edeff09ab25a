"""Where things live: the artifact dir a trainer hands to `publish`, and the repository.

Artifact dir (what training produces; `publish` reads nothing else)::

    <artifact>/
      files/            the version's files, copied verbatim into model_repository/<model>/<N>/
                        (for the Python backend: model.py, weights.npz)
      training.json     training facts merged into the manifest: training_run_id, dataset,
                        metrics (holdout), hyperparams, seed, runtime, architecture,
                        preprocessing, input_schema {tensor, datatype, shape, features},
                        outputs, decision
      golden.json       {"atol": 1e-5, "cases": [{"features": [...], "expected": {...}}]}
      histograms.json   {"features": {name: {"edges": [...], "counts": [...]}}, "bins": n,
                         "source": "train"}: training histograms, bins from training quantiles

Repository, per model (`<repo>/<model>/`)::

    config.pbtxt        Triton's config (model level; `model_warmup` reads warmup/)
    warmup/             raw warm-up inputs (Triton requires them here, beside config.pbtxt)
    <N>/                immutable version folder: the files plus manifest.json
    validation/<N>.json the version's validation report

The report sits in `validation/`, not inside `<N>/`: the shipped `model.py` refuses to load a
version folder holding any file its manifest does not list, and Triton ignores non-numeric
subdirectories of a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import RegistryError

MANIFEST = "manifest.json"
FILES_DIR = "files"
TRAINING = "training.json"
GOLDEN = "golden.json"
HISTOGRAMS = "histograms.json"
VALIDATION_DIR = "validation"
WARMUP_DIR = "warmup"


@dataclass(frozen=True, slots=True)
class Artifact:
    root: Path
    training: dict[str, Any]
    golden: dict[str, Any]
    histograms: dict[str, Any]

    @property
    def files_dir(self) -> Path:
        return self.root / FILES_DIR


def read_artifact(root: Path) -> Artifact:
    """The artifact at `root`, with each part checked enough for a manifest to be built."""
    if not (root / FILES_DIR).is_dir() or not any((root / FILES_DIR).iterdir()):
        raise RegistryError(f"{root}: no {FILES_DIR}/ folder with the version's files")
    training, golden, histograms = (_json(root / n) for n in (TRAINING, GOLDEN, HISTOGRAMS))
    schema = training.get("input_schema")
    if not isinstance(schema, dict) or not schema.get("features"):
        raise RegistryError(f"{root / TRAINING}: input_schema.features is required")
    cases = golden.get("cases")
    if not isinstance(cases, list) or not cases:
        raise RegistryError(f"{root / GOLDEN}: at least one golden case is required")
    n = len(schema["features"])
    for i, case in enumerate(cases):
        if len(case.get("features", ())) != n or not case.get("expected"):
            raise RegistryError(f"{root / GOLDEN}: case {i} needs {n} features and `expected`")
    feats = histograms.get("features")
    if not isinstance(feats, dict) or set(feats) != set(schema["features"]):
        raise RegistryError(f"{root / HISTOGRAMS}: one histogram per input feature is required")
    for name, h in feats.items():
        edges, counts = h.get("edges", []), h.get("counts", [])
        if len(edges) != len(counts) + 1 or edges != sorted(edges):
            raise RegistryError(f"{root / HISTOGRAMS}: {name}: edges must be sorted, counts + 1")
    return Artifact(root, training, golden, histograms)


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{path}: {exc}") from exc
    if not isinstance(data, dict):
        raise RegistryError(f"{path}: expected a JSON object")
    return data


def version_dirs(repo: Path, model: str) -> list[Path]:
    """The model's version folders, oldest first (numeric names only, as Triton reads them)."""
    mdir = repo / model
    if not (mdir / "config.pbtxt").is_file():
        raise RegistryError(f"{mdir}: not a model (no config.pbtxt)")
    found = [p for p in mdir.iterdir() if p.is_dir() and p.name.isdigit() and p.name[0] != "0"]
    return sorted(found, key=lambda p: int(p.name))


def models(repo: Path) -> list[str]:
    return sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))


def report_path(repo: Path, model: str, version: str) -> Path:
    return repo / model / VALIDATION_DIR / f"{version}.json"


def read_manifest(vdir: Path) -> dict[str, Any]:
    return _json(vdir / MANIFEST)
