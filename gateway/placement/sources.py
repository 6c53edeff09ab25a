"""What the planner reads: model footprints, route SLOs, and the GPUs.

Footprint of a model version: `memory_footprint_bytes` from its `manifest.json` (the GPU
memory one loaded instance of that version takes, CUDA context included). A manifest without
it gets an *estimate*: a CUDA context plus twice the artifact bytes (weights, and as much
again for activations and workspace); the plan says which models are estimated. A model's
instance footprint sums the versions Triton loads under its `version_policy`.

Latency class: the tightest `slo.p99_ms` of the routes that *answer* with the model (champion,
challengers, segments). Shadows never answer, and fallback models are the cheap always-loaded
rung, so neither makes a model strict.

GPUs: an inventory YAML (a list of `{index, name, memory_bytes}`) or, without one, pynvml.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from gateway.placement.plan import FootprintSource, Gpu, ModelDemand, PlacementError

#: A CUDA context with a framework loaded (torch, the Python backend stub) is ~300-600 MiB.
DEFAULT_CONTEXT_BYTES = 512 << 20


def read_inventory(path: Path) -> list[Gpu]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PlacementError(f"cannot read inventory {path}: {exc}") from exc
    if isinstance(data, Mapping):
        data = data.get("gpus")
    if not isinstance(data, list) or not data:
        raise PlacementError(f"{path}: expected a list of {{index, name, memory_bytes}}")
    gpus = []
    for i, item in enumerate(data):
        try:
            gpu = Gpu(int(item["index"]), str(item["name"]), int(item["memory_bytes"]))
        except (TypeError, KeyError, ValueError) as exc:
            raise PlacementError(f"{path}: GPU #{i}: needs index, name, memory_bytes") from exc
        if gpu.memory_bytes <= 0 or gpu.index < 0:
            raise PlacementError(f"{path}: GPU #{i}: index >= 0 and memory_bytes > 0")
        gpus.append(gpu)
    return gpus


def detect_gpus(nvml: Any = None) -> list[Gpu]:
    """The GPUs pynvml sees; [] without a driver or a GPU."""
    if nvml is None:
        try:
            with warnings.catch_warnings():  # pynvml>=12 warns on import (see gateway/gpu.py)
                warnings.simplefilter("ignore", FutureWarning)
                import pynvml
        except ImportError:
            return []
        nvml = pynvml
    try:
        nvml.nvmlInit()
    except Exception:  # NVMLError and its many subclasses: no usable driver
        return []
    try:
        gpus = []
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            name = nvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else str(name)
            gpus.append(Gpu(i, name, int(nvml.nvmlDeviceGetMemoryInfo(h).total)))
        return gpus
    finally:
        nvml.nvmlShutdown()


def route_p99(routes_dir: Path) -> dict[str, float]:
    """Triton model -> tightest p99_ms of the routes answering with it."""
    from gateway.routing.table import RouteError, load_route_table

    try:
        table = load_route_table(routes_dir)
    except RouteError as exc:
        raise PlacementError(str(exc)) from exc
    out: dict[str, float] = {}
    for route in table.routes.values():
        if route.slo.p99_ms is None:
            continue
        answering = {route.champion} | {s.target for s in route.segments}
        if route.split is not None:
            answering |= {a.target for a in route.split.arms}
        for t in answering:
            out[t.model] = min(out.get(t.model, float("inf")), float(route.slo.p99_ms))
    return out


def load_demands(
    repository: Path,
    p99: Mapping[str, float],
    loads: Mapping[str, float] | None = None,
    instances: Mapping[str, int] | None = None,
    context_bytes: int = DEFAULT_CONTEXT_BYTES,
) -> list[ModelDemand]:
    """One `ModelDemand` per model folder (with a config.pbtxt) of the repository."""
    loads, instances = loads or {}, instances or {}
    demands = []
    for cfg_path in sorted(repository.glob("*/config.pbtxt")):
        model_dir = cfg_path.parent
        cfg = _parse_config(cfg_path)
        versions = loaded_versions(model_dir, cfg)
        if not versions:
            continue  # nothing Triton would load
        sizes, sources = [], set()
        for v in versions:
            size, source = version_footprint(model_dir / v, context_bytes)
            sizes.append(size)
            sources.add(source)
        count = instances.get(model_dir.name) or sum(g.count or 1 for g in cfg.instance_group) or 1
        footprint: FootprintSource = sources.pop() if len(sources) == 1 else "mixed"
        demands.append(
            ModelDemand(
                name=model_dir.name,
                instance_bytes=sum(sizes),
                instances=count,
                footprint=footprint,
                p99_ms=p99.get(model_dir.name),
                load=loads.get(model_dir.name),
                versions=tuple(versions),
            )
        )
    unknown = sorted((set(loads) | set(instances)) - {d.name for d in demands})
    if unknown:
        raise PlacementError(f"--load/--instances name models not in {repository}: {unknown}")
    return demands


def version_footprint(version_dir: Path, context_bytes: int) -> tuple[int, FootprintSource]:
    manifest_path = version_dir / "manifest.json"
    manifest: dict[str, Any] = {}
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise PlacementError(f"{manifest_path}: unreadable manifest: {exc}") from exc
    declared = manifest.get("memory_footprint_bytes")
    if declared is not None:
        if isinstance(declared, bool) or not isinstance(declared, int) or declared <= 0:
            raise PlacementError(f"{manifest_path}: memory_footprint_bytes must be an int > 0")
        return declared, "manifest"
    names = list(manifest.get("files") or {}) or [
        p.name for p in version_dir.iterdir() if p.is_file() and p.name != "manifest.json"
    ]
    artifacts = sum((version_dir / n).stat().st_size for n in names if (version_dir / n).is_file())
    return context_bytes + 2 * artifacts, "estimate"


def loaded_versions(model_dir: Path, cfg: Any) -> list[str]:
    """The version folders Triton loads under the config's version_policy."""
    present = sorted((p.name for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()),
                     key=int)  # fmt: skip
    policy = cfg.version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return present
    if kind == "specific":
        wanted = {str(v) for v in policy.specific.versions}
        return [v for v in present if v in wanted]
    n = policy.latest.num_versions if kind == "latest" else 1
    return present[-max(n, 1) :] if present else []


def _parse_config(path: Path) -> Any:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except (OSError, text_format.ParseError) as exc:
        raise PlacementError(f"{path}: {exc}") from exc
