"""Version readiness: a route may send traffic to a version only once it is proven to work.

With `routing.require_validation` on, a version first needs a passing validation report
(`gateway.registry.report.ValidationGate`, written by `models validate`); without one the table
is refused before anything is loaded. Then proof is two steps: the server reports the version
READY (after loading it through Triton's model-control API if it is missing; with `model_warmup`
READY also means warm), and the manifest's probe -- a known input with its
expected score and decision -- gives the expected answer. A route table naming a version that
fails either step is rejected whole, so the previous table keeps serving.

Loading adds the version with a config override whose `version_policy` lists the versions
already loaded plus the new one, so the versions serving now are never unloaded. (Triton keeps
the loaded model serving when such a reload fails.)
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from gateway.backends.base import Backend, ModelControl
from gateway.catalog import ModelCatalog
from gateway.errors import SwitchyardError
from gateway.routing.table import RouteError, RouteTable
from gateway.types import Deadline, Target

if TYPE_CHECKING:
    from gateway.registry.report import ValidationGate

log = structlog.get_logger(__name__)


class VersionGate:
    def __init__(
        self,
        backend: Backend,
        *,
        load_versions: bool = True,
        timeout_s: float = 60.0,
        control_timeout_s: float = 2.0,
        validation: ValidationGate | None = None,
    ) -> None:
        self.backend = backend
        self.validation = validation  # None: no report required (routing.require_validation)
        self.load_versions = load_versions and isinstance(backend, ModelControl)
        self.timeout_s = timeout_s
        self.control_timeout_s = control_timeout_s

    async def check(self, table: RouteTable, live: RouteTable, catalog: ModelCatalog) -> None:
        """Raise RouteError unless every target new in ``table`` (not in ``live``, which is
        already serving) is ready and passes its probe."""
        new = sorted(table.targets() - live.targets(), key=str)
        if not new:
            return
        if self.validation is not None:  # before any load: a refused version never warms up
            self.validation.require(new)
        try:
            async with asyncio.timeout(self.timeout_s):
                for target in new:
                    await self._ensure_ready(target, catalog)
        except TimeoutError:
            raise RouteError(
                f"versions {', '.join(map(str, new))} not ready within {self.timeout_s:g} s"
            ) from None

    async def _ensure_ready(self, target: Target, catalog: ModelCatalog) -> None:
        await self.ensure_loaded(target)
        await self.probe(target, catalog)
        log.info("version_ready", target=str(target))

    async def ensure_loaded(self, target: Target) -> None:
        """READY on the server, loaded through model control if missing; else RouteError.

        Triton's load returns only after the version's `model_warmup` ran (a model with warm-up
        is not READY before), so READY here also means warm."""
        if not await self._ready(target) and self.load_versions:
            await self._load(target)
        if not await self._ready(target):
            raise RouteError(f"{target} is not READY on {self.backend.name}")

    async def _ready(self, target: Target) -> bool:
        try:
            return await self.backend.model_ready(
                target.model, target.version, self.control_timeout_s
            )
        except SwitchyardError:
            return False

    async def _load(self, target: Target) -> None:
        assert isinstance(self.backend, ModelControl)
        control: ModelControl = self.backend
        override: dict[str, Any] | None = None
        versions: list[str] = []
        try:
            index = await control.repository_index(self.control_timeout_s)
            loaded = _ready_versions(index, target.model)
            if loaded:  # add to the serving versions; a bare load would apply config.pbtxt's
                config = await self.backend.model_config(target.model, "", self.control_timeout_s)
                versions = sorted({*loaded, target.version}, key=_version_key)
                numbers = [int(v) if v.isdigit() else v for v in versions]
                override = {**config, "version_policy": {"specific": {"versions": numbers}}}
        except SwitchyardError as exc:
            raise RouteError(f"{target}: cannot read the server's models: {exc.message}") from exc
        log.info("version_loading", target=str(target), versions=versions)
        try:
            await control.load_model(target.model, self.timeout_s, override)
        except SwitchyardError as exc:
            raise RouteError(f"{target} failed to load: {exc.message}") from exc

    async def probe(self, target: Target, catalog: ModelCatalog) -> None:
        """Known input -> expected output, from the version's manifest `probe`."""
        schema = catalog.schema(target.model, target.version)
        probe = schema.probe
        if not probe:
            log.warning("version_without_probe", target=str(target))
            return
        row = schema.vectorize(list(probe["features"])).reshape(1, -1)
        request = schema.infer_request(row, f"probe-{target}")
        try:
            resp = await self.backend.infer(request, Deadline.after(self.control_timeout_s))
        except SwitchyardError as exc:
            raise RouteError(f"{target} probe failed: {exc.message}") from exc
        got = {k: _scalar(t.data) for k, t in resp.outputs.items()}
        expected: dict[str, Any] = dict(probe.get("expected", {}))
        atol = float(probe.get("atol", 1e-5))
        for key, want in expected.items():
            have = got.get(key)
            ok = (
                isinstance(have, float) and math.isclose(have, float(want), abs_tol=atol)
                if isinstance(want, int | float)
                else have == want
            )
            if not ok:
                raise RouteError(f"{target} probe mismatch: {key} = {have!r}, expected {want!r}")


def _scalar(data: np.ndarray) -> Any:
    v = data.ravel()[0]
    if isinstance(v, bytes):
        return v.decode()
    return float(v) if isinstance(v, np.floating | float) else v


def _ready_versions(index: Iterable[dict[str, Any]], model: str) -> list[str]:
    return [
        str(m["version"])
        for m in index
        if m.get("name") == model and m.get("state") == "READY" and m.get("version")
    ]


def _version_key(v: str) -> tuple[int, str]:
    return (int(v), "") if v.isdigit() else (1 << 62, v)
