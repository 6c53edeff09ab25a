"""The manifest `publish` writes beside a version's files.

Everything a later step needs without re-running training: the sha256 of every file and the
version digest, the training run and its dataset, the backend and its version, preprocessing
and input schema, the memory footprint measured at publish, golden inputs with their expected
outputs (the first is also the readiness `probe`), and the training feature histograms.
No timestamps: the same artifact gives the same manifest.
"""

from __future__ import annotations

import importlib.metadata
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from gateway.progress import QUIET, Progress
from gateway.registry.digest import version_digest
from gateway.registry.layout import Artifact

# training.json keys in manifest order; anything else the trainer adds follows them.
_TRAINING_KEYS = (
    "training_run_id",
    "dataset",
    "hyperparams",
    "seed",
    "metrics",
    "runtime",
    "architecture",
    "preprocessing",
    "input_schema",
    "outputs",
    "decision",
)


def build_manifest(
    artifact: Artifact,
    model: str,
    version: int,
    files: dict[str, str],
    config_pbtxt: str,
    run_id: str | None = None,
    progress: Progress = QUIET,
) -> dict[str, Any]:
    """The manifest of `artifact` published as `model/version` (`files`: path -> sha256)."""
    t = artifact.training
    doc: dict[str, Any] = {"model": model, "version": version, "files": dict(sorted(files.items()))}
    doc["digest"] = version_digest(files)
    for key in _TRAINING_KEYS:
        if key in t:
            doc[key] = t[key]
    doc.update({k: v for k, v in t.items() if k not in doc})
    if run_id is not None:
        doc["training_run_id"] = run_id
    doc["runtime"] = {**runtime(config_pbtxt), **dict(t.get("runtime", {}))}
    cases = artifact.golden["cases"]
    atol = float(artifact.golden.get("atol", 1e-5))
    doc["probe"] = {**cases[0], "atol": atol}
    doc["golden"] = {"atol": atol, "cases": cases}
    doc["memory"] = memory_footprint(
        artifact.files_dir, progress, f"{model}/{version}: measuring memory"
    )
    doc["histograms"] = artifact.histograms
    return doc


def runtime(config_pbtxt: str) -> dict[str, str]:
    """Backend (from config.pbtxt) and the server build that runs it (the pytriton wheel)."""
    m = re.search(r'^\s*(backend|platform)\s*:\s*"([^"]+)"', config_pbtxt, re.MULTILINE)
    try:
        server = (
            f"tritonserver from nvidia-pytriton {importlib.metadata.version('nvidia-pytriton')}"
        )
    except importlib.metadata.PackageNotFoundError:
        server = "unknown"
    return {"backend": m.group(2) if m else "unknown", "backend_version": server}


def memory_footprint(
    files_dir: Path, progress: Progress = QUIET, desc: str = "measuring memory"
) -> dict[str, Any]:
    """Bytes the weights take once loaded: every array of every `.npz`, loaded with numpy and
    summed (`nbytes`); files of other formats count with their size on disk."""
    arrays = other = 0
    paths = sorted(p for p in files_dir.rglob("*") if p.is_file())
    for path in progress.track(paths, desc, "file", note=lambda p: p.name):
        if path.suffix == ".npz":
            try:
                with np.load(path, allow_pickle=False) as npz:
                    arrays += sum(int(npz[k].nbytes) for k in npz.files)
                continue
            except (OSError, ValueError, zipfile.BadZipFile):
                pass  # not a loadable npz: count its size like any other file
        if path.suffix not in {".py", ".json", ".txt", ".md"}:
            other += path.stat().st_size
    return {
        "bytes": arrays + other,
        "method": "publish: nbytes of every loaded .npz array + size of other weight files",
    }
