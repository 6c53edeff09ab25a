"""Triton Python-backend model shared by every Switchyard model version.

Single source of truth: ``train.py`` copies this file verbatim into each version folder as
``model.py`` (each version folder is immutable and self-contained). It lives as a plain file at
the top of ``model_repository/``; Triton only treats subdirectories as models, so it is ignored.

The network is described by ``weights.npz`` (``mean``, ``scale``, ``W0, b0, W1, b1, ...`` with
``W`` shaped (in, out), ReLU hidden layers) and ``manifest.json`` (output activation, decision
rule, file hashes). Computation is numpy only.
"""

import hashlib
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

MANIFEST = "manifest.json"
ALLOWED_UNLISTED = {MANIFEST, "__pycache__"}


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 16), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_version_dir(version_dir):
    """Check the manifest's sha256 of every listed file and that nothing unlisted is present."""
    manifest_path = os.path.join(version_dir, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise RuntimeError(f"integrity check failed: {manifest_path} is missing")
    with open(manifest_path, "rb") as fh:
        manifest = json.loads(fh.read())
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not listed:
        raise RuntimeError(f"integrity check failed: {manifest_path} lists no files")
    problems = []
    for name, expected in sorted(listed.items()):
        path = os.path.join(version_dir, name)
        if os.path.basename(name) != name or not os.path.isfile(path):
            problems.append(f"{name}: listed in manifest but missing")
            continue
        actual = _sha256(path)
        if actual != expected:
            problems.append(f"{name}: sha256 {actual} != manifest {expected}")
    for name in sorted(os.listdir(version_dir)):
        if name not in listed and name not in ALLOWED_UNLISTED:
            problems.append(f"{name}: present but not listed in manifest")
    if problems:
        raise RuntimeError(f"integrity check failed for {version_dir}: " + "; ".join(problems))
    return manifest


def _sigmoid(z):
    # exp(-log(1 + exp(-z))): stable for large |z|.
    return np.exp(-np.logaddexp(0.0, -z))


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class TritonPythonModel:
    def initialize(self, args):
        version_dir = os.path.join(args["model_repository"], str(args["model_version"]))
        manifest = verify_version_dir(version_dir)
        self.name = manifest["model"]
        with np.load(os.path.join(version_dir, "weights.npz"), allow_pickle=False) as npz:
            self.mean = npz["mean"].astype(np.float64)
            self.scale = npz["scale"].astype(np.float64)
            n_layers = len(manifest["architecture"]["layers"]) - 1
            self.layers = [
                (npz[f"W{i}"].astype(np.float64), npz[f"b{i}"].astype(np.float64))
                for i in range(n_layers)
            ]
        self.n_in = self.mean.shape[0]
        self.activation = manifest["architecture"]["output_activation"]
        self.decision = manifest["decision"]
        self.labels = np.array([s.encode() for s in self.decision.get("labels", [])], dtype=object)
        if self.activation not in ("sigmoid", "softmax"):
            raise RuntimeError(f"unsupported output_activation {self.activation!r}")

    def _forward(self, x):
        h = (x.astype(np.float64) - self.mean) / self.scale
        last = len(self.layers) - 1
        for i, (w, b) in enumerate(self.layers):
            h = h @ w + b
            if i < last:
                h = np.maximum(h, 0.0)
        return h

    def _postprocess(self, logits):
        out = {}
        if self.activation == "sigmoid":
            score = _sigmoid(logits[:, 0])
            d = self.decision
            decision = np.where(
                score < d["approve_below"],
                d["approve_label"].encode(),
                np.where(
                    score >= d["deny_at_or_above"],
                    d["deny_label"].encode(),
                    d["review_label"].encode(),
                ),
            ).astype(object)
            confidence = np.maximum(score, 1.0 - score)
        else:
            probs = _softmax(logits)
            idx = probs.argmax(axis=1)
            score = probs[np.arange(probs.shape[0]), idx]
            decision = self.labels[idx]
            confidence = score
            out["probabilities"] = probs.astype(np.float32)
        out["score"] = score.astype(np.float32).reshape(-1, 1)
        out["decision"] = np.asarray(decision, dtype=object).reshape(-1, 1)
        out["confidence"] = confidence.astype(np.float32).reshape(-1, 1)
        return out

    def execute(self, requests):
        # Dynamic batching hands several requests at once: one forward pass over all of them.
        inputs, errors = [], []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "features").as_numpy()
            x = x.reshape(-1, self.n_in)
            if not np.all(np.isfinite(x)):
                errors.append(pb_utils.TritonError("features must be finite (no NaN/inf)"))
                inputs.append(x[:0])
            else:
                errors.append(None)
                inputs.append(x)
        sizes = [x.shape[0] for x in inputs]
        outputs = self._postprocess(self._forward(np.concatenate(inputs, axis=0)))
        responses, start = [], 0
        for size, error in zip(sizes, errors, strict=True):
            if error is not None:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            stop = start + size
            tensors = [pb_utils.Tensor(k, v[start:stop]) for k, v in outputs.items()]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start = stop
        return responses

    def finalize(self):
        self.layers = []
