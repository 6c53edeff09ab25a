"""The checks behind a validation report, run against a real tritonserver.

    schema   input tensor, datatype and feature names in order equal the route champion's
    metrics  holdout metrics no worse than the champion's beyond a margin
    load     the version loads (explicit model control; READY also means warm, see warmup.py)
    golden   every golden input reproduces its expected output within the manifest's atol
    latency  p99 over K sequential requests stays under the route's `slo.p99_ms`

The static checks (schema, metrics) run first: a version failing one is never loaded into the
serving Triton (a load reloads the model's serving versions too); its live checks are reported
"not run", as are golden and latency for a version that does not load. Not run is not passed.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gateway.backends.triton import TritonBackend
from gateway.catalog import ModelCatalog
from gateway.errors import SwitchyardError
from gateway.registry.layout import read_manifest
from gateway.registry.publish import manifest_digest
from gateway.routing.readiness import VersionGate
from gateway.routing.table import Route, RouteError, Target
from gateway.types import Deadline

NOT_RUN = "not run"


@dataclass(frozen=True, slots=True)
class Thresholds:
    #: higher-is-better metrics (accuracy, AUC) may fall at most this much below the champion
    metric_margin: float = 0.005
    #: lower-is-better metrics (`*loss*`) may rise at most this fraction above the champion's
    loss_margin: float = 0.10
    #: requests in the latency probe
    probes: int = 50
    timeout_s: float = 60.0


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    passed: bool
    detail: str


def baseline_of(route: Route, model: str) -> Target:
    """What a new version of `model` is compared with on holdout metrics: the version the
    route runs in the same role. A fallback (a distilled model, meant to be smaller and a
    little less accurate) is held to the route's current fallback, not to the champion."""
    fallback = route.fallback.target
    if route.champion.model != model and fallback is not None and fallback.model == model:
        return fallback
    return route.champion


async def validate(
    repo: Path, model: str, version: str, route: Route, backend: TritonBackend, t: Thresholds
) -> dict[str, Any]:
    """Run every check; the report (passed or not) as a dict ready for `write_report`."""
    manifest = read_manifest(repo / model / version)
    champion = read_manifest(repo / route.champion.model / route.champion.version)
    base = baseline_of(route, model)
    baseline = read_manifest(repo / base.model / base.version)
    role = "champion" if base == route.champion else "fallback"
    checks = [
        check_schema(manifest, champion, route),
        check_metrics(manifest, baseline, base, t, role),
    ]
    static_ok = all(c.passed for c in checks)
    loaded = False
    if static_ok:
        try:
            await VersionGate(backend, timeout_s=t.timeout_s).ensure_loaded(Target(model, version))
            checks.append(Check("load", True, f"READY on {backend.name}"))
            loaded = True
        except RouteError as exc:
            checks.append(Check("load", False, str(exc)))
    if loaded:
        schema = ModelCatalog.load(repo).schema(model, version)
        rows = np.asarray([c["features"] for c in manifest["golden"]["cases"]], np.float32)
        checks.append(await check_golden(backend, schema, manifest, rows, t))
        checks.append(await check_latency(backend, schema, rows, route, t))
    else:
        why = "the version did not load" if static_ok else "a static check failed"
        live = ("golden", "latency") if static_ok else ("load", "golden", "latency")
        checks += [Check(n, False, f"{NOT_RUN}: {why}") for n in live]
    return {
        "model": model,
        "version": version,
        "digest": manifest_digest(manifest),
        "passed": all(c.passed for c in checks),
        "checks": [asdict(c) for c in checks],
        "route": route.source,
        "policy_version": route.policy_version,
        "champion": str(route.champion),
        "baseline": str(base),
        "server": backend.name,
        "thresholds": asdict(t),
        "validated_at": time.time(),
    }


def check_schema(manifest: dict[str, Any], champion: dict[str, Any], route: Route) -> Check:
    mine, theirs = manifest["input_schema"], champion["input_schema"]
    for key in ("tensor", "datatype"):
        if mine.get(key) != theirs.get(key):
            return Check("schema", False, f"{key} {mine.get(key)!r} != {theirs.get(key)!r}")
    a, b = list(mine["features"]), list(theirs["features"])
    if a == b:
        return Check("schema", True, f"{len(a)} features, same names and order as {route.champion}")
    if len(a) != len(b):
        return Check("schema", False, f"{len(a)} features, the route's champion has {len(b)}")
    i = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
    return Check(
        "schema",
        False,
        f"feature {i} is {a[i]!r}, the route's champion {route.champion} has {b[i]!r}",
    )


def check_metrics(
    manifest: dict[str, Any],
    champion: dict[str, Any],
    against: Target,
    t: Thresholds,
    role: str = "champion",
) -> Check:
    """Holdout metrics against `against` (the champion, or the route's fallback for a new
    fallback version: `baseline_of`), whose manifest is `champion`."""
    mine, theirs = manifest.get("metrics", {}), champion.get("metrics", {})
    common = sorted(
        k for k in mine.keys() & theirs.keys()
        if isinstance(mine[k], int | float) and isinstance(theirs[k], int | float)
    )  # fmt: skip
    if not common:
        return Check("metrics", False, f"no holdout metric in common with {against}")
    worse = []
    for k in common:
        new, old = float(mine[k]), float(theirs[k])
        if "loss" in k:
            if new > old * (1 + t.loss_margin):
                worse.append(f"{k} {new:g} > {old:g} + {t.loss_margin:.0%}")
        elif new < old - t.metric_margin:
            worse.append(f"{k} {new:g} < {old:g} - {t.metric_margin:g}")
    if worse:
        return Check("metrics", False, f"worse than {role} {against}: " + "; ".join(worse))
    return Check("metrics", True, f"{', '.join(common)} within margin of {against}")


async def check_golden(
    backend: TritonBackend, schema: Any, manifest: dict[str, Any], rows: np.ndarray, t: Thresholds
) -> Check:
    golden = manifest["golden"]
    atol = float(golden.get("atol", 1e-5))
    try:
        resp = await backend.infer(
            schema.infer_request(rows, "validate-golden"), Deadline.after(t.timeout_s)
        )
    except SwitchyardError as exc:
        return Check("golden", False, f"inference failed: {exc.message}")
    for i, case in enumerate(golden["cases"]):
        for key, want in case["expected"].items():
            if key not in resp.outputs:
                return Check("golden", False, f"case {i}: output {key!r} missing")
            have = resp.outputs[key].data.reshape(len(rows), -1)[i]
            v = have[0]
            got = v.decode() if isinstance(v, bytes) else v
            ok = (
                math.isclose(float(got), float(want), abs_tol=atol)
                if isinstance(want, int | float)
                else got == want
            )
            if not ok:
                return Check(
                    "golden", False, f"case {i}: {key} = {got!r}, expected {want!r} ± {atol:g}"
                )
    return Check("golden", True, f"{len(rows)} golden inputs reproduce within {atol:g}")


async def check_latency(
    backend: TritonBackend, schema: Any, rows: np.ndarray, route: Route, t: Thresholds
) -> Check:
    slo = route.slo.p99_ms
    times = []
    for i in range(t.probes):
        request = schema.infer_request(rows[i % len(rows)].reshape(1, -1), f"validate-latency-{i}")
        start = time.perf_counter()
        try:
            await backend.infer(request, Deadline.after(t.timeout_s))
        except SwitchyardError as exc:
            return Check("latency", False, f"probe {i} failed: {exc.message}")
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    p99 = times[max(0, math.ceil(0.99 * len(times)) - 1)]
    detail = f"p99 {p99:.2f} ms over {len(times)} requests"
    if slo is None:
        return Check("latency", True, detail + f" (the route {route.source} sets no slo.p99_ms)")
    if p99 > slo:
        return Check("latency", False, f"{detail} > slo.p99_ms {slo:g}")
    return Check("latency", True, f"{detail} <= slo.p99_ms {slo:g}")
