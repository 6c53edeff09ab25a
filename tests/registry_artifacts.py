"""Real artifacts for registry tests, trained with model_repository/train.py (seconds).

`trainer()` loads train.py as a module; `risk_artifact` trains a logistic-regression `risk`
model with the given C (small C: a weaker model) and writes its artifact dir, exactly as a
training job hands it to `models publish`.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = REPO_ROOT / "model_repository"


def trainer() -> ModuleType:
    name = "switchyard_model_train"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, MODEL_REPOSITORY / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


def risk_built(c: float = 1.0, version: int = 3) -> Any:
    with warnings.catch_warnings():
        # as in train.build_all: sklearn 1.5 passes `iprint` to L-BFGS-B, newer SciPy warns
        warnings.filterwarnings(
            "ignore", message=r".*`disp` and `iprint` options", category=DeprecationWarning
        )
        return _risk_built(c, version)


def _risk_built(c: float, version: int) -> Any:
    train = trainer()
    data = train.load("breast_cancer")
    if c == 1.0:
        return train.train_risk_v1(data)
    return train.train_risk_candidate(data, c, version)  # the same recipe, another C


def risk_artifact(dest: Path, c: float = 1.0) -> Path:
    return trainer().export_artifact(risk_built(c), dest)


def model_repo(tmp: Path, models: tuple[str, ...] = ("risk",), reports: bool = False) -> Path:
    """A copy of the shipped models (config + versions) to publish into; without the committed
    validation reports unless `reports`, so a test decides which version has one."""
    repo = tmp / "model_repository"
    skip = ("__pycache__",) if reports else ("__pycache__", "validation")
    for model in models:
        shutil.copytree(
            MODEL_REPOSITORY / model, repo / model, ignore=shutil.ignore_patterns(*skip)
        )
    return repo
