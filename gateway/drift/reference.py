"""The training distribution a version is compared with, read from its manifest.

`manifest.json` carries `histograms` (gateway/registry/histograms.py): per feature, the edges
at training quantiles and the training counts. A score histogram of the holdout set, when the
trainer wrote one (`histograms.score`, same shape), is the reference for prediction drift;
without it the version has feature drift only.

Versions published before artifacts carried a score histogram cannot gain one: a manifest is
part of the version's immutable content. For them the trainer writes the holdout score
histogram beside the versions, `<model>/score_reference/<N>.json`, naming the version's digest;
it counts only while the digest matches the manifest (a folder outside the version, like
`validation/`, which Triton ignores).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class Reference:
    features: tuple[str, ...]  # row order (the input schema)
    #: Inner edges per feature, padded with +inf to one width: a value's bin is the number of
    #: inner edges <= it, so values outside the training range land in the outer bins.
    inner: np.ndarray  # (n_features, max_bins - 1)
    expected: np.ndarray  # (n_features, max_bins): training shares, 0 in padded bins
    nbins: np.ndarray  # (n_features,)
    score_inner: np.ndarray | None = None  # (score_bins - 1,)
    score_expected: np.ndarray | None = None


def _hist(doc: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    edges = np.asarray(doc["edges"], dtype=np.float64)
    counts = np.asarray(doc["counts"], dtype=np.float64)
    if len(edges) != len(counts) + 1 or len(counts) < 1:
        raise ValueError("a histogram needs len(edges) == len(counts) + 1")
    total = counts.sum()
    return edges[1:-1], counts / total if total > 0 else np.full(len(counts), 1 / len(counts))


def reference_from_manifest(manifest: dict[str, Any]) -> Reference | None:
    """The reference of one version; None when its manifest has no feature histograms."""
    hists = (manifest.get("histograms") or {}).get("features")
    names = (manifest.get("input_schema") or {}).get("features")
    if not hists or not names or any(n not in hists for n in names):
        return None
    parts = [_hist(hists[n]) for n in names]
    width = max(len(e) for e, _ in parts) + 1
    inner = np.full((len(names), width - 1), np.inf)
    expected = np.zeros((len(names), width))
    for j, (edges, share) in enumerate(parts):
        inner[j, : len(edges)] = edges
        expected[j, : len(share)] = share
    nbins = np.array([len(s) for _, s in parts])
    score = (manifest.get("histograms") or {}).get("score")
    s_inner, s_expected = _hist(score) if score else (None, None)
    return Reference(tuple(names), inner, expected, nbins, s_inner, s_expected)


SCORE_REFERENCE_DIR = "score_reference"


def load_reference(repository: Path, model: str, version: str) -> Reference | None:
    path = repository / model / version / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
        if not (manifest.get("histograms") or {}).get("score"):
            score = _sidecar_score(repository / model, version, manifest.get("digest"))
            if score is not None:
                manifest = {**manifest, "histograms": {**manifest["histograms"], "score": score}}
        return reference_from_manifest(manifest)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no manifest or an unusable one: this version is not tracked


def _sidecar_score(model_dir: Path, version: str, digest: object) -> dict[str, Any] | None:
    """The holdout score histogram kept beside a version, if it names this content."""
    try:
        doc = json.loads((model_dir / SCORE_REFERENCE_DIR / f"{version}.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("digest") != digest or digest is None:
        return None  # written for other bytes: no reference rather than a wrong one
    score = doc.get("score")
    return score if isinstance(score, dict) else None
