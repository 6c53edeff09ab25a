"""What each model version expects and returns, read from its `manifest.json`.

The gateway validates and orders features against this schema, so bad input is rejected with
a precise 422 before anything reaches Triton.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gateway.errors import InvalidTensor, ModelNotFound, ValidationFailed, VersionNotFound
from gateway.types import InferRequest, Tensor

#: Outputs that hold one value per row by the repository's convention (model_repository/).
SCALAR_OUTPUTS = frozenset({"score", "decision", "confidence"})
_PRIORITY_LEVELS = re.compile(rb"priority_levels\s*:\s*(\d+)")
_PLAIN_NUMBERS = frozenset({int, float})  # exact types: bool (an int subclass) is not one
_F32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True, slots=True)
class ModelSchema:
    model: str
    version: str
    tensor: str
    datatype: str
    features: tuple[str, ...]
    outputs: tuple[str, ...]
    probe: Mapping[str, Any] | None = None
    #: Triton priority levels of the model's scheduler (0: none; priorities are not sent).
    priority_levels: int = 0

    def infer_request(self, rows: np.ndarray, request_id: str, **extra: Any) -> InferRequest:
        """The backend request for validated rows (shape (n, len(features))) of this version:
        rows are independent, so the coalescer may merge it with others."""
        return InferRequest(
            model=self.model,
            version=self.version,
            inputs=(Tensor(self.tensor, self.datatype, rows),),
            outputs=self.outputs,
            request_id=request_id,
            batchable=True,
            **extra,
        )

    def fits(self, request: InferRequest) -> bool:
        """Whether a tensor request holds rows of this schema (one input, (n, features))."""
        if len(request.inputs) != 1:
            return False
        t = request.inputs[0]
        return (
            t.name == self.tensor
            and t.datatype == self.datatype
            and t.data.ndim == 2
            and t.data.shape[1] == len(self.features)
        )

    def check_finite(self, request: InferRequest) -> None:
        """Rows that fit this schema hold finite numbers, as /v1 insists (`vectorize`). The
        binary extension and gRPC's raw contents can carry NaN and inf, which the models
        refuse with an error Triton reports as INTERNAL: a server failure to the breaker,
        so one client's rows would open the breakers every client shares."""
        data = request.inputs[0].data
        if data.dtype.kind != "f":
            return
        finite = np.isfinite(data)
        if not finite.all():
            row = int(np.flatnonzero(~finite.all(axis=1))[0])
            raise InvalidTensor(
                f"input {self.tensor!r}: row {row} holds a value that is not finite (NaN or inf)",
                code="non_finite_input",
                details={"input": self.tensor, "row": row},
            )

    @property
    def scalar_outputs(self) -> bool:
        """Every output is one value per row (what a static default answer can stand in for)."""
        return bool(self.outputs) and set(self.outputs) <= SCALAR_OUTPUTS

    def vectorize(self, features: Any) -> np.ndarray:
        """Features by name (a mapping) or in schema order (a list) -> a float32 row."""
        if isinstance(features, Mapping):
            try:  # the hot path: one pass; the missing list only when one is missing
                values: Sequence[Any] = [features[n] for n in self.features]
            except KeyError:
                missing = [n for n in self.features if n not in features]
                raise ValidationFailed(
                    f"{len(missing)} feature(s) missing, e.g. {missing[0]!r}",
                    code="missing_feature",
                    details={"missing": missing},
                ) from None
            if len(features) != len(self.features):
                unknown = sorted(set(features) - set(self.features))
                raise ValidationFailed(
                    f"unknown feature(s) {unknown[:5]}",
                    code="unknown_feature",
                    details={"unknown": unknown},
                )
        elif isinstance(features, list):
            if len(features) != len(self.features):
                raise ValidationFailed(
                    f"expected {len(self.features)} features, got {len(features)}",
                    code="wrong_feature_count",
                    details={"expected": len(self.features), "got": len(features)},
                )
            values = features
        else:
            raise ValidationFailed(
                "features must be an object of name -> number, or a list of numbers",
                code="invalid_features",
            )
        if not all(type(v) in _PLAIN_NUMBERS for v in values):
            self._check_types(values)  # raises on a non-number; int/float subclasses pass
        # Fast path: every value within float32 range and their sum finite (no NaN) means the
        # cast cannot overflow and the row is finite; errstate and isfinite cost more than
        # the rest of this method.
        if (
            values
            and min(values) >= -_F32_MAX
            and max(values) <= _F32_MAX
            and math.isfinite(sum(values))
        ):
            return np.array(values, dtype=np.float64).astype(np.float32)
        with np.errstate(over="ignore"):  # overflow to inf is caught just below
            row = np.asarray(values, dtype=np.float64).astype(np.float32)
        if not np.isfinite(row).all():
            bad = next(n for n, v in zip(self.features, row, strict=True) if not math.isfinite(v))
            raise ValidationFailed(
                f"feature {bad!r} is not a finite float32 number",
                code="non_finite_feature",
                details={"feature": bad},
            )
        return row

    def _check_types(self, values: Sequence[Any]) -> None:
        for name, v in zip(self.features, values, strict=True):
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ValidationFailed(
                    f"feature {name!r} must be a number, got {type(v).__name__}",
                    code="invalid_feature_type",
                    details={"feature": name},
                )


class ModelCatalog:
    """Schemas of every model version in a Triton model repository."""

    def __init__(self, schemas: Mapping[tuple[str, str], ModelSchema]) -> None:
        self._schemas = dict(schemas)

    @classmethod
    def load(cls, repository: Path) -> ModelCatalog:
        schemas = {}
        levels: dict[str, int] = {}
        for manifest in sorted(repository.glob("*/*/manifest.json")):
            m = json.loads(manifest.read_text())
            s = m["input_schema"]
            model = manifest.parent.parent.name
            if model not in levels:
                levels[model] = _priority_levels(manifest.parent.parent / "config.pbtxt")
            schema = ModelSchema(
                model=manifest.parent.parent.name,
                version=manifest.parent.name,
                tensor=s["tensor"],
                datatype=s.get("datatype", "FP32"),
                features=tuple(s["features"]),
                outputs=tuple(m.get("outputs", ())),
                probe=m.get("probe"),
                priority_levels=levels[model],
            )
            schemas[(schema.model, schema.version)] = schema
        return cls(schemas)

    def models(self) -> set[str]:
        return {m for m, _ in self._schemas}

    def find(self, model: str, version: str) -> ModelSchema | None:
        return self._schemas.get((model, version))

    def versions(self, model: str) -> list[str]:
        return sorted((v for m, v in self._schemas if m == model), key=_version_key)

    def schema(self, model: str, version: str) -> ModelSchema:
        found = self._schemas.get((model, version))
        if found is not None:
            return found
        if model not in self.models():
            raise ModelNotFound(f"unknown model {model!r}", details={"model": model})
        raise VersionNotFound(
            f"model {model!r} has no version {version!r}",
            details={"model": model, "version": version, "available": self.versions(model)},
        )


def _priority_levels(config: Path) -> int:
    try:
        found = _PRIORITY_LEVELS.search(config.read_bytes())
    except OSError:
        return 0
    return int(found.group(1)) if found else 0


def _version_key(v: str) -> tuple[int, str]:
    return (int(v), "") if v.isdigit() else (1 << 62, v)
