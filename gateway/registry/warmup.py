"""Triton `model_warmup` generated from a version's golden inputs.

Triton runs every warm-up sample on each model instance while loading, and does not report the
version READY before they completed ("When the ModelWarmup property is defined in a model
configuration, Triton will not show the model as being ready for inference until model warmup
has completed", Triton docs, model_configuration.md, "Model Warmup"). So the gate's READY
check (`VersionGate.ensure_loaded`) already means warm: nothing else to wait for.

`config.pbtxt` and `warmup/` are per model, not per version (Triton reads `input_data_file`
from `<model>/warmup/`), so every version warms up with the same inputs: the golden inputs of
the version that generated them, valid for all since the config fixes the input tensor. One
sample per golden row (Triton repeats a sample's single row `batch_size` times), plus one at the
largest preferred batch size so the batched path is warm too.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gateway.registry.layout import WARMUP_DIR

_NUMPY = {"FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64}


def warmup_files(cases: Sequence[Mapping[str, Any]], datatype: str = "FP32") -> dict[str, bytes]:
    """`golden_<i>` -> one golden row as raw little-endian bytes, row-major (Triton's format)."""
    dtype = np.dtype(_NUMPY[datatype]).newbyteorder("<")
    return {
        f"golden_{i}": np.asarray(case["features"], dtype=dtype).tobytes()
        for i, case in enumerate(cases)
    }


def model_warmup_pbtxt(
    tensor: str, datatype: str, n_features: int, files: Sequence[str], batch_size: int
) -> str:
    """The `model_warmup [...]` block of config.pbtxt for the given warm-up files."""
    samples = [(name, name, 1) for name in files]
    if batch_size > 1 and files:
        samples.append((f"golden_batch_{batch_size}", files[0], batch_size))
    entries = ",\n".join(
        f'  {{\n    name: "{name}"\n    batch_size: {batch}\n    inputs {{\n'
        f'      key: "{tensor}"\n      value: {{\n        data_type: TYPE_{datatype}\n'
        f"        dims: [ {n_features} ]\n"
        f'        input_data_file: "{file}"\n      }}\n    }}\n  }}'
        for name, file, batch in samples
    )
    return f"model_warmup [\n{entries}\n]\n"


def render_warmup(manifest: Mapping[str, Any], batch_size: int) -> tuple[str, dict[str, bytes]]:
    """(config block, warmup/ files) from a manifest's golden inputs and input schema."""
    schema = manifest["input_schema"]
    datatype = schema.get("datatype", "FP32")
    files = warmup_files(manifest["golden"]["cases"], datatype)
    block = model_warmup_pbtxt(
        schema["tensor"], datatype, len(schema["features"]), sorted(files, key=_index), batch_size
    )
    return block, files


def ensure_warmup(model_dir: Path, manifest: Mapping[str, Any]) -> bool:
    """Give a model without warm-up one, from this version's goldens; True if it was added.

    A model that has warm-up keeps it (its inputs fit every version); files land before the
    config names them, each replaced atomically."""
    config = model_dir / "config.pbtxt"
    text = config.read_text()
    if "model_warmup" in text or not manifest.get("golden"):
        return False
    preferred = re.search(r"preferred_batch_size:\s*\[([^\]]*)\]", text)
    sizes = [int(s) for s in preferred.group(1).replace(",", " ").split()] if preferred else []
    block, files = render_warmup(manifest, max(sizes, default=1))
    (model_dir / WARMUP_DIR).mkdir(exist_ok=True)
    for name, data in files.items():
        _atomic_write(model_dir / WARMUP_DIR / name, data)
    _atomic_write(config, (text.rstrip("\n") + "\n" + block).encode())
    return True


def _index(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
