"""Reproducible training for every model in the Switchyard model repository.

    python model_repository/train.py            # (re)build everything in place
    python model_repository/train.py --out DIR  # build into another directory (tests)
    python model_repository/train.py --force    # allow changing an existing version's bytes
    python model_repository/train.py --candidate DIR [--risk-c C]
                                                # a new `risk` candidate (logistic regression
                                                # with regularisation C) as an artifact dir for
                                                # `python -m gateway models publish`; the
                                                # repository is not touched

Re-running rewrites every artifact byte-identically on the same CPU (fixed seeds, no timestamps,
fixed zip metadata in weights.npz). On another CPU, OpenBLAS picks other kernels and float64
weights can differ in the last bits; such a rebuild (weights within rtol 1e-9) keeps the
committed files. Existing version folders are immutable: if a rebuild would change one beyond
that (e.g. another scikit-learn version), the script stops unless --force is given.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import sklearn
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

if TYPE_CHECKING:
    from gateway.progress import Progress

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "model_template.py"

SEED = 20240611
SPLIT_SEED = 42
HOLDOUT_FRACTION = 0.25
MAX_BATCH_SIZE = 256
PREFERRED_BATCH_SIZES = (32, 128)
MAX_QUEUE_DELAY_US = 5000
NUM_VERSIONS = 10
EXPORT_ATOL = 1e-5
RISK_DECISION = {
    "type": "threshold",
    "approve_below": 0.3,
    "deny_at_or_above": 0.7,
    "approve_label": "approve",
    "review_label": "review",
    "deny_label": "deny",
}
DISTILL_PROB_CLIP = 1e-4


# ----------------------------------------------------------------------------- data


@dataclass
class Dataset:
    name: str
    source: str
    feature_names: list[str]
    x_train: np.ndarray
    x_hold: np.ndarray
    y_train: np.ndarray
    y_hold: np.ndarray
    fingerprint: str  # sha256 of the raw X/y bytes


def snake(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def load(name: str) -> Dataset:
    if name == "breast_cancer":
        bunch = load_breast_cancer()
        features = [snake(f) for f in bunch.feature_names]
    elif name == "digits":
        bunch = load_digits()
        features = [f"pixel_{i}" for i in range(bunch.data.shape[1])]
    else:
        raise ValueError(name)
    x = np.ascontiguousarray(bunch.data, dtype=np.float64)
    y = np.ascontiguousarray(bunch.target, dtype=np.int64)
    fp = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()
    x_tr, x_ho, y_tr, y_ho = train_test_split(
        x, y, test_size=HOLDOUT_FRACTION, stratify=y, random_state=SPLIT_SEED
    )
    return Dataset(name, f"sklearn.datasets.load_{name}", features, x_tr, x_ho, y_tr, y_ho, fp)


# ----------------------------------------------------------------------------- export format


def forward(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Numpy forward pass of the exported format: returns the final-layer logits (float64)."""
    h = (np.asarray(x, dtype=np.float64) - weights["mean"]) / weights["scale"]
    n = sum(1 for k in weights if k.startswith("W"))
    for i in range(n):
        h = h @ weights[f"W{i}"] + weights[f"b{i}"]
        if i < n - 1:
            h = np.maximum(h, 0.0)
    return h


def sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Like np.savez, but with fixed zip metadata so the bytes are reproducible."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def export_layers(scaler: StandardScaler, coefs, intercepts, negate_last: bool):
    weights = {
        "mean": scaler.mean_.astype(np.float64),
        "scale": scaler.scale_.astype(np.float64),
    }
    for i, (w, b) in enumerate(zip(coefs, intercepts, strict=True)):
        w = np.asarray(w, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64).reshape(-1)
        if negate_last and i == len(coefs) - 1:
            # sklearn's binary logit is log-odds of target==1 (benign); we export P(target==0).
            w, b = -w, -b
        weights[f"W{i}"] = w
        weights[f"b{i}"] = b
    return weights


# ----------------------------------------------------------------------------- models


@dataclass
class Built:
    model: str
    version: int
    data: Dataset
    hyperparams: dict
    weights: dict[str, np.ndarray]
    output_activation: str
    decision: dict
    metrics: dict
    extra_dataset: dict = field(default_factory=dict)


def risk_score_reference(est, x_std: np.ndarray) -> np.ndarray:
    return est.predict_proba(x_std)[:, 0]  # P(target == 0) == P(malignant)


def binary_metrics(y_malignant: np.ndarray, score: np.ndarray) -> dict:
    return {
        "holdout_accuracy": round(float(accuracy_score(y_malignant, score >= 0.5)), 6),
        "holdout_roc_auc": round(float(roc_auc_score(y_malignant, score)), 6),
        "holdout_log_loss": round(float(log_loss(y_malignant, score, labels=[0, 1])), 6),
    }


def check_export(weights, x, reference, activation):
    logits = forward(weights, x)
    got = sigmoid(logits[:, 0]) if activation == "sigmoid" else softmax(logits)
    err = float(np.max(np.abs(got - reference)))
    assert err < EXPORT_ATOL, f"exported forward pass differs from sklearn by {err}"


def train_risk_v1(data: Dataset) -> Built:
    hp = {
        "estimator": "LogisticRegression",
        "C": 1.0,
        "max_iter": 5000,
        "solver": "lbfgs",
    }
    scaler = StandardScaler().fit(data.x_train)
    est = LogisticRegression(
        C=hp["C"], max_iter=hp["max_iter"], solver=hp["solver"], random_state=SEED
    ).fit(scaler.transform(data.x_train), data.y_train)
    return _built_risk(1, data, hp, scaler, est, [est.coef_.T], [est.intercept_])


def _built_risk(version: int, data: Dataset, hp: dict, scaler, est, coefs, intercepts) -> Built:
    """Export a fitted risk classifier and check it against scikit-learn on both splits."""
    w = export_layers(scaler, coefs, intercepts, negate_last=True)
    for x in (data.x_train, data.x_hold):
        check_export(w, x, risk_score_reference(est, scaler.transform(x)), "sigmoid")
    score = sigmoid(forward(w, data.x_hold)[:, 0])
    metrics = binary_metrics(data.y_hold == 0, score)
    return Built("risk", version, data, hp, w, "sigmoid", RISK_DECISION, metrics)


def _risk_mlp(data: Dataset, hp: dict):
    scaler = StandardScaler().fit(data.x_train)
    est = MLPClassifier(
        hidden_layer_sizes=tuple(hp["hidden_layer_sizes"]),
        activation="relu",
        solver=hp["solver"],
        alpha=hp["alpha"],
        max_iter=hp["max_iter"],
        random_state=SEED,
    ).fit(scaler.transform(data.x_train), data.y_train)
    return scaler, est


RISK_V2_HP = {
    "estimator": "MLPClassifier",
    "hidden_layer_sizes": [16],
    "activation": "relu",
    "solver": "adam",
    "alpha": 0.1,
    "max_iter": 2000,
}


def train_risk_v2(data: Dataset) -> Built:
    scaler, est = _risk_mlp(data, RISK_V2_HP)
    return _built_risk(2, data, dict(RISK_V2_HP), scaler, est, est.coefs_, est.intercepts_)


def band(score: np.ndarray) -> np.ndarray:
    d = RISK_DECISION
    return np.where(score < d["approve_below"], 0, np.where(score >= d["deny_at_or_above"], 2, 1))


def train_risk_distilled_v1(data: Dataset, teacher: Built) -> Built:
    """Ridge regression on the teacher's clipped logit of P(malignant), over standardized inputs.

    The student is a logistic model: sigmoid(student logit) approximates the teacher's score.
    Trained on teacher outputs over the training set only (no true labels are used).
    """
    hp = {
        "estimator": "Ridge",
        "alpha": 1.0,
        "target": "teacher_logit",
        "teacher": {"model": teacher.model, "version": teacher.version},
        "teacher_prob_clip": DISTILL_PROB_CLIP,
    }
    scaler = StandardScaler().fit(data.x_train)
    p_t = np.clip(
        sigmoid(forward(teacher.weights, data.x_train)[:, 0]),
        DISTILL_PROB_CLIP,
        1 - DISTILL_PROB_CLIP,
    )
    target = np.log(p_t) - np.log1p(-p_t)
    est = Ridge(alpha=hp["alpha"]).fit(scaler.transform(data.x_train), target)
    w = export_layers(
        scaler,
        [est.coef_.reshape(-1, 1)],
        [np.array([est.intercept_])],
        negate_last=False,
    )
    for x in (data.x_train, data.x_hold):
        check_export(w, x, sigmoid(est.predict(scaler.transform(x))), "sigmoid")
    score = sigmoid(forward(w, data.x_hold)[:, 0])
    teacher_score = sigmoid(forward(teacher.weights, data.x_hold)[:, 0])
    metrics = binary_metrics(data.y_hold == 0, score)
    metrics["fidelity_vs_teacher"] = {
        "teacher": f"{teacher.model}/{teacher.version}",
        "split": "holdout",
        "label_agreement": round(float(np.mean((score >= 0.5) == (teacher_score >= 0.5))), 6),
        "decision_agreement": round(float(np.mean(band(score) == band(teacher_score))), 6),
        "mean_abs_score_diff": round(float(np.mean(np.abs(score - teacher_score))), 6),
        "max_abs_score_diff": round(float(np.max(np.abs(score - teacher_score))), 6),
    }
    return Built("risk_distilled", 1, data, hp, w, "sigmoid", RISK_DECISION, metrics)


def train_digits_v1(data: Dataset) -> Built:
    hp = {
        "estimator": "MLPClassifier",
        "hidden_layer_sizes": [32],
        "activation": "relu",
        "solver": "lbfgs",
        "alpha": 1e-2,
        "max_iter": 2000,
    }
    scaler = StandardScaler().fit(data.x_train)
    est = MLPClassifier(
        hidden_layer_sizes=(32,),
        activation="relu",
        solver=hp["solver"],
        alpha=hp["alpha"],
        max_iter=hp["max_iter"],
        random_state=SEED,
    ).fit(scaler.transform(data.x_train), data.y_train)
    assert list(est.classes_) == list(range(10))
    w = export_layers(scaler, est.coefs_, est.intercepts_, negate_last=False)
    for x in (data.x_train, data.x_hold):
        check_export(w, x, est.predict_proba(scaler.transform(x)), "softmax")
    probs = softmax(forward(w, data.x_hold))
    metrics = {
        "holdout_accuracy": round(float(accuracy_score(data.y_hold, probs.argmax(1))), 6),
        "holdout_log_loss": round(float(log_loss(data.y_hold, probs, labels=list(range(10)))), 6),
    }
    decision = {"type": "argmax", "labels": [str(i) for i in range(10)]}
    return Built("digits", 1, data, hp, w, "softmax", decision, metrics)


# ----------------------------------------------------------------------------- artifacts


def training_run_id(data: Dataset, hyperparams: dict) -> str:
    """sha256 prefix of (dataset identity + split + hyperparameters + seed)."""
    payload = {
        "dataset": {
            "name": data.name,
            "fingerprint": data.fingerprint,
            "split_seed": SPLIT_SEED,
            "holdout_fraction": HOLDOUT_FRACTION,
        },
        "hyperparams": hyperparams,
        "seed": SEED,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def outputs_for(b: Built) -> list[str]:
    base = ["score", "decision", "confidence"]
    return base + (["probabilities"] if b.output_activation == "softmax" else [])


def pick_probe(b: Built) -> dict:
    """First holdout row whose score is clear of decision boundaries (robust health check)."""
    for case in golden_rows(b):
        return case
    raise RuntimeError(f"no probe row found for {b.model}")


def golden_rows(b: Built):
    """Holdout rows whose score is clear of decision boundaries, in order, with their answers."""
    x32 = b.data.x_hold.astype(np.float32)
    logits = forward(b.weights, x32.astype(np.float64))
    for i in range(len(x32)):
        if b.output_activation == "sigmoid":
            s = float(sigmoid(logits[i : i + 1, 0])[0])
            d = b.decision
            if min(abs(s - d["approve_below"]), abs(s - d["deny_at_or_above"])) < 0.02:
                continue
            label = int(band(np.array([s]))[0])
            decision = [d["approve_label"], d["review_label"], d["deny_label"]][label]
        else:
            p = softmax(logits[i : i + 1])[0]
            top2 = np.sort(p)[-2:]
            if top2[1] - top2[0] < 0.1:
                continue
            s, decision = float(p.max()), b.decision["labels"][int(p.argmax())]
        yield {
            "holdout_index": i,
            "features": [float(v) for v in x32[i]],
            "expected": {"score": s, "decision": decision},
            "atol": EXPORT_ATOL,
        }


def manifest_for(b: Built, files: dict[str, str]) -> dict:
    layers = [int(b.weights["W0"].shape[0])] + [
        int(b.weights[f"W{i}"].shape[1]) for i in range(sum(k.startswith("W") for k in b.weights))
    ]
    return {
        "model": b.model,
        "version": b.version,
        "files": files,
        "training_run_id": training_run_id(b.data, b.hyperparams),
        "dataset": {
            "name": b.data.name,
            "source": b.data.source,
            "fingerprint_sha256": b.data.fingerprint,
            "n_train": len(b.data.y_train),
            "n_holdout": len(b.data.y_hold),
            "split": "stratified",
            "holdout_fraction": HOLDOUT_FRACTION,
            "split_seed": SPLIT_SEED,
        },
        "hyperparams": b.hyperparams,
        "seed": SEED,
        "metrics": b.metrics,
        "runtime": {
            "backend": "python",
            "numpy": np.__version__,
            "sklearn": sklearn.__version__,
        },
        "architecture": {
            "layers": layers,
            "hidden_activation": "relu",
            "output_activation": b.output_activation,
        },
        "input_schema": {
            "tensor": "features",
            "datatype": "FP32",
            "shape": [len(b.data.feature_names)],
            "features": b.data.feature_names,
        },
        "outputs": outputs_for(b),
        "decision": b.decision,
        "probe": pick_probe(b),
    }


def config_pbtxt(name: str, n_in: int, n_classes: int | None) -> str:
    outputs = [
        ("score", "TYPE_FP32", 1),
        ("decision", "TYPE_STRING", 1),
        ("confidence", "TYPE_FP32", 1),
    ]
    if n_classes:
        outputs.append(("probabilities", "TYPE_FP32", n_classes))
    out_txt = ",\n".join(
        f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: [ {d} ]\n  }}' for n, t, d in outputs
    )
    preferred = ", ".join(str(s) for s in PREFERRED_BATCH_SIZES)
    return (
        f"# Generated by model_repository/train.py -- edit there, not here.\n"
        f'name: "{name}"\n'
        f'backend: "python"\n'
        f"max_batch_size: {MAX_BATCH_SIZE}\n"
        f"version_policy: {{ latest: {{ num_versions: {NUM_VERSIONS} }} }}\n"
        f'input [\n  {{\n    name: "features"\n    data_type: TYPE_FP32\n'
        f"    dims: [ {n_in} ]\n  }}\n]\n"
        f"output [\n{out_txt}\n]\n"
        f"dynamic_batching {{\n  preferred_batch_size: [ {preferred} ]\n"
        f"  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}\n}}\n"
        f"instance_group [\n  {{\n    kind: KIND_CPU\n    count: 1\n  }}\n]\n"
    )


def build_all(progress: Progress | None = None) -> list[Built]:
    with warnings.catch_warnings(), _progress(progress).task("training", 4, "model") as task:
        warnings.simplefilter("error", ConvergenceWarning)  # an unconverged model is a bug
        # sklearn 1.5 passes `iprint` to L-BFGS-B, which newer SciPy deprecates: harmless noise.
        warnings.filterwarnings(
            "ignore", message=r".*`disp` and `iprint` options", category=DeprecationWarning
        )
        bc, digits = load("breast_cancer"), load("digits")

        def trained(name: str, fit, *data) -> Built:
            task.note(name)
            built = fit(*data)
            task.advance()
            return built

        risk2 = trained("risk/2", train_risk_v2, bc)
        return [
            trained("risk/1", train_risk_v1, bc),
            risk2,
            trained("risk_distilled/1", train_risk_distilled_v1, bc, risk2),
            trained("digits/1", train_digits_v1, digits),
        ]


def _progress(progress: Progress | None) -> Progress:
    from gateway.progress import QUIET

    return QUIET if progress is None else progress


def render(
    built: list[Built], workdir: Path, progress: Progress | None = None
) -> tuple[dict[str, bytes], dict[str, Path]]:
    """Every artifact as relative path -> bytes, and each version's artifact dir (in `workdir`).

    Manifests and warm-up come from the registry's code (gateway/registry), the same that
    `python -m gateway models publish` runs: what is written here is what a publish writes."""
    from gateway.registry.digest import hash_tree
    from gateway.registry.layout import read_artifact
    from gateway.registry.manifest import build_manifest
    from gateway.registry.warmup import render_warmup

    files: dict[str, bytes] = {}
    artifacts: dict[str, Path] = {}
    rendering = _progress(progress).track(built, "rendering", "version", note=_name)
    for b in rendering:  # in version order: a model's config and warm-up come from its latest
        n_layers = sum(k.startswith("W") for k in b.weights)
        n_out = int(b.weights[f"W{n_layers - 1}"].shape[1])
        config = config_pbtxt(
            b.model,
            len(b.data.feature_names),
            n_out if b.output_activation == "softmax" else None,
        )
        vdir = f"{b.model}/{b.version}"
        art = read_artifact(export_artifact(b, workdir / vdir))
        manifest = build_manifest(art, b.model, b.version, hash_tree(art.files_dir), config)
        block, warm = render_warmup(manifest, max(PREFERRED_BATCH_SIZES))
        for rel in [r for r in files if r.startswith(f"{b.model}/{WARMUP}/")]:
            del files[rel]
        files[f"{b.model}/config.pbtxt"] = (config + block).encode()
        files.update({f"{b.model}/{WARMUP}/{name}": data for name, data in warm.items()})
        for name in manifest["files"]:
            files[f"{vdir}/{name}"] = (art.files_dir / name).read_bytes()
        files[f"{vdir}/manifest.json"] = (json.dumps(manifest, indent=2) + "\n").encode()
        if (b.model, b.version) in PREDATES_SCORE_HISTOGRAM:
            files[f"{b.model}/{SCORE_REFERENCE}/{b.version}.json"] = score_reference(b, manifest)
        artifacts[vdir] = art.root
    return files, artifacts


def _name(b: Built) -> str:
    return f"{b.model}/{b.version}"


WARMUP = "warmup"


ROUNDING_RTOL, ROUNDING_ATOL = 1e-9, 1e-12


def _close(a: object, b: object) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return bool(np.isclose(a, b, rtol=ROUNDING_RTOL, atol=ROUNDING_ATOL))
    return a == b


def rounding_only(rel: str, new: bytes, old: bytes) -> bool:
    """True when a rebuilt artifact differs from the committed one only by CPU float rounding."""
    name = Path(rel).name
    if name == "weights.npz":
        try:
            with np.load(io.BytesIO(new)) as a, np.load(io.BytesIO(old)) as b:
                return sorted(a.files) == sorted(b.files) and all(
                    a[k].dtype == b[k].dtype
                    and a[k].shape == b[k].shape
                    and np.allclose(a[k], b[k], rtol=ROUNDING_RTOL, atol=ROUNDING_ATOL)
                    for k in a.files
                )
        except (OSError, ValueError, zipfile.BadZipFile):
            return False  # not an npz at all: a real change
    if Path(rel).parent.name == SCORE_REFERENCE:
        # bound to the version's digest (over the weights' hash); the histogram may round
        try:
            a, b = json.loads(new), json.loads(old)
        except ValueError:
            return False
        a.pop("digest", None), b.pop("digest", None)
        return _close(a, b)
    if name == "manifest.json":
        # The weights' hash differs with the bytes; the weights themselves are checked above.
        try:
            a, b = json.loads(new), json.loads(old)
        except ValueError:
            return False
        a["files"]["weights.npz"] = b["files"]["weights.npz"] = None
        a.pop("digest", None), b.pop("digest", None)  # over the weights' hash, checked above
        return _close(a, b)
    return False


def _kept_within_rounding(rel: str, files: dict[str, bytes], out: Path) -> bool:
    """A version's weights and manifest go together: both equal or rounding-only, or neither."""
    vdir = Path(rel).parent
    if Path(rel).name not in {"weights.npz", "manifest.json"}:
        return False
    for name in ("weights.npz", "manifest.json"):
        new, old_path = files[f"{vdir}/{name}"], out / vdir / name
        if not old_path.exists():
            return False
        old = old_path.read_bytes()
        if new != old and not rounding_only(name, new, old):
            return False
    return True


def _is_versioned(rel: str) -> bool:
    parts = Path(rel).parts
    return len(parts) == 3 and parts[1].isdigit()


def write(
    files: dict[str, bytes],
    out: Path,
    force: bool,
    artifacts: dict[str, Path] | None = None,
    progress: Progress | None = None,
) -> list[str]:
    """Write what changed; a version folder that does not exist yet is published through the
    registry (`gateway.registry.publish`: atomic, never over an existing one)."""
    changed = []
    files = _bind_score_references(files, out)
    for rel, data in files.items():
        path = out / rel
        is_versioned = _is_versioned(rel)
        if path.exists() and path.read_bytes() == data:
            continue
        if (
            path.exists()
            and Path(rel).parent.name == SCORE_REFERENCE
            and rounding_only(rel, data, path.read_bytes())
        ):
            continue
        if path.exists() and is_versioned and not force and _kept_within_rounding(rel, files, out):
            continue  # the committed weights and their manifest stay, byte for byte
        if path.exists() and is_versioned and not force:
            raise SystemExit(
                f"refusing to change immutable version artifact {path} (bytes differ); "
                "add a new version instead, or pass --force"
            )
        changed.append(rel)
    new_versions = sorted(
        {str(Path(rel).parent) for rel in changed if _is_versioned(rel)}
        - {str(Path(rel).parent) for rel in changed if (out / rel).parent.exists()},
        key=lambda v: (Path(v).parent.name, int(Path(v).name)),
    )
    if artifacts is None:
        new_versions = []
    shown = _progress(progress)
    for rel in shown.track(changed, "writing", "file", note=str):  # model-level files first:
        if str(Path(rel).parent) in new_versions:  # publish reads the config
            continue
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
            tmp.write(files[rel])
        Path(tmp.name).chmod(0o644)
        Path(tmp.name).replace(path)
    for vdir in new_versions:  # publish draws its own progress, closed before it logs
        _publish(out, vdir, files, artifacts or {}, shown)
    return changed


def _bind_score_references(files: dict[str, bytes], out: Path) -> dict[str, bytes]:
    """A score reference names the digest of the version as it is in `out`: a version kept
    within rounding keeps its committed manifest, and so its committed digest."""
    bound = dict(files)
    for rel, data in files.items():
        model_dir, parent = Path(rel).parent.parent, Path(rel).parent.name
        manifest = out / model_dir / Path(rel).stem / "manifest.json"
        if parent != SCORE_REFERENCE or not manifest.exists():
            continue
        doc = json.loads(data)
        doc["digest"] = json.loads(manifest.read_text())["digest"]
        bound[rel] = (json.dumps(doc, indent=2) + "\n").encode()
    return bound


def _publish(
    out: Path, vdir: str, files: dict[str, bytes], artifacts: dict[str, Path], progress: Progress
) -> None:
    from gateway.registry.publish import publish

    model, version = Path(vdir).parent.name, int(Path(vdir).name)
    done = publish(out, model, artifacts[vdir], version=version, progress=progress)
    manifest = (done.path / "manifest.json").read_bytes()
    if not done.created or manifest != files[f"{vdir}/manifest.json"]:
        raise SystemExit(f"{vdir}: the registry published other bytes than train.py rendered")


# ----------------------------------------------------------------------------- registry artifact

GOLDEN_CASES = 8
HISTOGRAM_BINS = 10


# Versions published before artifacts carried a holdout score histogram: their manifests are
# immutable, so their score reference for prediction drift cannot be added to them.
PREDATES_SCORE_HISTOGRAM = {("risk", 1), ("risk", 2), ("risk_distilled", 1), ("digits", 1)}


SCORE_REFERENCE = "score_reference"  # gateway/drift/reference.py reads it


def score_reference(b: Built, manifest: dict) -> bytes:
    """The holdout score histogram of a version whose manifest predates it, beside the version
    and bound to its digest (prediction drift for the shipped versions)."""
    from gateway.registry.histograms import score_histogram

    doc = {
        "model": b.model,
        "version": b.version,
        "digest": manifest["digest"],
        "source": "holdout",
        "score": score_histogram(holdout_scores(b), HISTOGRAM_BINS),
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


def holdout_scores(b: Built) -> np.ndarray:
    """The score the served model returns for each holdout row (float32 inputs, as served)."""
    logits = forward(b.weights, b.data.x_hold.astype(np.float32).astype(np.float64))
    if b.output_activation == "sigmoid":
        return sigmoid(logits[:, 0])
    return softmax(logits).max(axis=1)


def export_artifact(b: Built, dest: Path) -> Path:
    """Write `b` as an artifact dir for `python -m gateway models publish` (layout in
    gateway/registry/layout.py): files/, training.json, golden.json, histograms.json (training
    feature histograms and, for prediction drift, the holdout score histogram)."""
    from gateway.registry.histograms import quantile_histograms, score_histogram

    manifest = manifest_for(b, {})
    (dest / "files").mkdir(parents=True, exist_ok=True)
    (dest / "files" / "model.py").write_bytes(TEMPLATE.read_bytes())
    (dest / "files" / "weights.npz").write_bytes(npz_bytes(b.weights))
    keep = ("training_run_id", "dataset", "hyperparams", "seed", "metrics", "runtime",
            "architecture", "input_schema", "outputs", "decision")  # fmt: skip
    training = {k: manifest[k] for k in keep}
    training["runtime"] = {k: v for k, v in training["runtime"].items() if k != "backend"}
    training["preprocessing"] = {
        "type": "standardize",
        "where": "weights.npz mean/scale, applied inside model.py",
    }
    cases = [{k: v for k, v in c.items() if k != "atol"} for c in golden_rows(b)]
    golden = {"atol": EXPORT_ATOL, "cases": cases[:GOLDEN_CASES]}
    hist = quantile_histograms(b.data.x_train, b.data.feature_names, HISTOGRAM_BINS)
    if (b.model, b.version) not in PREDATES_SCORE_HISTOGRAM:
        hist["score"] = score_histogram(holdout_scores(b), HISTOGRAM_BINS)
    for name, doc in (("training", training), ("golden", golden), ("histograms", hist)):
        (dest / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    return dest


def train_risk_candidate(data: Dataset, c: float, version: int = 0) -> Built:
    """The risk recipe of v1 (standardize + logistic regression) with another C: how a new
    version is trained for `models publish`, which assigns its number (`version` only labels
    the Built)."""
    hp = {"estimator": "LogisticRegression", "C": c, "max_iter": 5000, "solver": "lbfgs"}
    scaler = StandardScaler().fit(data.x_train)
    est = LogisticRegression(C=c, max_iter=5000, solver="lbfgs", random_state=SEED).fit(
        scaler.transform(data.x_train), data.y_train
    )
    return _built_risk(version, data, hp, scaler, est, [est.coef_.T], [est.intercept_])


def candidate(dest: Path, c: float) -> int:
    if dest.exists() and any(dest.iterdir()):
        raise SystemExit(f"{dest} exists and is not empty; give a new directory")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        warnings.filterwarnings(
            "ignore", message=r".*`disp` and `iprint` options", category=DeprecationWarning
        )
        b = train_risk_candidate(load("breast_cancer"), c)
    export_artifact(b, dest)
    print(f"risk candidate (C={c}): {json.dumps(b.metrics, sort_keys=True)}")
    print(f"artifact: {dest}  (publish: python -m gateway models publish {dest} --model risk)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="model repository to write")
    parser.add_argument(
        "--force",
        action="store_true",
        help="allow rewriting existing version folders with different bytes",
    )
    parser.add_argument(
        "--candidate",
        type=Path,
        metavar="DIR",
        help="write a new risk candidate's artifact dir here instead (nothing else is written)",
    )
    parser.add_argument(
        "--risk-c", type=float, default=0.5, help="the candidate's regularisation C (small: weaker)"
    )
    from gateway.progress import Progress, add_flag

    add_flag(parser)
    args = parser.parse_args(argv)
    if args.candidate is not None:
        return candidate(args.candidate, args.risk_c)
    progress = Progress.for_stream(flag=args.progress)  # stderr; stdout stays the summary
    built = build_all(progress)
    with tempfile.TemporaryDirectory() as workdir:
        files, artifacts = render(built, Path(workdir), progress)
        changed = write(files, args.out, args.force, artifacts, progress)
    for b in built:
        print(f"{b.model}/{b.version}: {json.dumps(b.metrics, sort_keys=True)}")
    print(f"{len(changed)} file(s) written to {args.out}" if changed else "no changes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
