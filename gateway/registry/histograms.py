"""Training feature histograms with bins from training quantiles.

Quantile edges put about the same share of the training rows in every bin, which is what a PSI
against live inputs needs (no empty reference bins for the usual data). Trainers build them with
`quantile_histograms` and put the result in the artifact's `histograms.json`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def quantile_histograms(x: np.ndarray, names: Sequence[str], bins: int = 10) -> dict[str, Any]:
    """One histogram per column of `x` (rows = training samples), edges at its quantiles."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(names):
        raise ValueError(f"expected {len(names)} columns, got shape {x.shape}")
    out: dict[str, Any] = {}
    for j, name in enumerate(names):
        edges = np.unique(np.quantile(x[:, j], np.linspace(0.0, 1.0, bins + 1)))
        if len(edges) < 2:  # a constant feature: one bin around its value
            edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
        counts, _ = np.histogram(x[:, j], bins=edges)
        out[name] = {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}
    return {"source": "train", "bins": bins, "features": out}


def score_histogram(scores: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """The holdout score distribution, in the shape of one feature's histogram: a trainer puts
    it at `histograms.json` `score` and the gateway's prediction drift compares with it."""
    return quantile_histograms(np.asarray(scores).reshape(-1, 1), ["score"], bins)["features"][
        "score"
    ]
