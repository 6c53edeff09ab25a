"""An independent numpy forward pass over committed weights, to check served answers against."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def load_version(version_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    manifest = json.loads((version_dir / "manifest.json").read_text())
    with np.load(version_dir / "weights.npz") as npz:
        weights = {k: npz[k] for k in npz.files}
    return manifest, weights


def forward(version_dir: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """score/decision/confidence (+ probabilities for softmax models) for rows of x."""
    return reference(*load_version(version_dir), x)


def reference(
    manifest: dict[str, Any], w: dict[str, np.ndarray], x: np.ndarray
) -> dict[str, np.ndarray]:
    """The forward pass and decision rule of the manifest, from the weights alone."""
    h = (np.asarray(x, dtype=np.float64) - w["mean"]) / w["scale"]
    n_layers = len(manifest["architecture"]["layers"]) - 1
    for i in range(n_layers):
        h = h @ w[f"W{i}"] + w[f"b{i}"]
        if i < n_layers - 1:
            h = np.maximum(h, 0.0)
    decision = manifest["decision"]
    if manifest["architecture"]["output_activation"] == "sigmoid":
        score = 1.0 / (1.0 + np.exp(-h[:, 0]))
        labels = np.where(
            score < decision["approve_below"],
            decision["approve_label"],
            np.where(
                score >= decision["deny_at_or_above"],
                decision["deny_label"],
                decision["review_label"],
            ),
        )
        return {"score": score, "decision": labels, "confidence": np.maximum(score, 1 - score)}
    e = np.exp(h - h.max(axis=1, keepdims=True))
    probs = e / e.sum(axis=1, keepdims=True)
    top = probs.argmax(axis=1)
    return {
        "score": probs.max(axis=1),
        "decision": np.array([decision["labels"][i] for i in top]),
        "confidence": probs.max(axis=1),
        "probabilities": probs,
    }


def without_warmup(config: str) -> str:
    """A config.pbtxt with its top-level ``model_warmup [...]`` block cut out.

    For tests that make a model version fail to load: tritonserver 2.51 can crash (SIGSEGV)
    when a version still warming up is unloaded because a sibling version failed
    (docs/lifecycle.md, "A Triton crash to know about")."""
    start = config.find("model_warmup [")
    if start < 0:
        return config
    depth, opened = 0, config.index("[", start)
    for end in range(opened, len(config)):
        depth += {"[": 1, "]": -1}.get(config[end], 0)
        if depth == 0:
            return config[:start] + config[end + 1 :]
    return config
