"""A real in-process implementation of the Backend interface, for unit tests.

It computes answers with plain functions and can be told to add latency, fail, or hang,
the way httpx's MockTransport stands in for a network.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway import errors
from gateway.types import Deadline, InferRequest, InferResponse, Tensor

ModelFn = Callable[[Mapping[str, Tensor]], dict[str, Tensor]]


@dataclass
class FakeModel:
    name: str
    fn: ModelFn
    versions: tuple[str, ...] = ("1",)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)


class FakeBackend:
    def __init__(self, models: list[FakeModel], name: str = "fake") -> None:
        self.name = name
        self.models = {m.name: m for m in models}
        self.latency_s = 0.0
        self.fail_with: errors.SwitchyardError | None = None
        self.hang = False
        self.calls: list[InferRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.cancelled = 0  # infer calls cancelled while in flight (client disconnects)
        self.broken: set[tuple[str, str]] = set()  # (model, version) that fail to load
        self.loads: list[tuple[str, Mapping[str, Any] | None]] = []

    def _model(self, model: str, version: str) -> FakeModel:
        m = self.models.get(model)
        if m is None:
            raise errors.ModelNotFound(f"unknown model {model!r}")
        if version and version not in m.versions:
            raise errors.VersionNotFound(f"model {model!r} has no version {version!r}")
        return m

    async def _behave(self, timeout_s: float) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        if self.hang or self.latency_s > timeout_s:
            await asyncio.sleep(timeout_s)
            raise errors.DeadlineExceeded("backend call ran out of time")
        if self.latency_s:
            await asyncio.sleep(self.latency_s)

    async def infer(self, request: InferRequest, deadline: Deadline) -> InferResponse:
        self.calls.append(request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self._behave(deadline.check("backend call"))
            m = self._model(request.model, request.version)
            out = m.fn({t.name: t for t in request.inputs})
            if request.outputs:
                out = {k: v for k, v in out.items() if k in request.outputs}
            return InferResponse(m.name, request.version or m.versions[-1], out, request.request_id)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1

    async def server_live(self, timeout_s: float) -> bool:
        return self.fail_with is None

    async def server_ready(self, timeout_s: float) -> bool:
        return self.fail_with is None and not self.hang

    async def model_ready(self, model: str, version: str, timeout_s: float) -> bool:
        await self._behave(timeout_s)
        try:
            self._model(model, version)
        except errors.NotFound:
            return False
        return True

    async def server_metadata(self, timeout_s: float) -> dict[str, Any]:
        return {"name": self.name, "version": "fake", "extensions": []}

    async def model_metadata(self, model: str, version: str, timeout_s: float) -> dict[str, Any]:
        m = self._model(model, version)
        return {
            "name": m.name,
            "versions": list(m.versions),
            "platform": "fake",
            "inputs": m.inputs,
            "outputs": m.outputs,
        }

    async def model_config(self, model: str, version: str, timeout_s: float) -> dict[str, Any]:
        m = self._model(model, version)
        return {"name": m.name, "backend": "fake", "max_batch_size": 0}

    # -- model control: versions listed in `broken` fail to load; others become ready --------
    async def repository_index(self, timeout_s: float) -> list[dict[str, Any]]:
        return [
            {"name": m.name, "version": v, "state": "READY"}
            for m in self.models.values()
            for v in m.versions
        ]

    async def load_model(
        self, model: str, timeout_s: float, config: Mapping[str, Any] | None = None
    ) -> None:
        self.loads.append((model, config))
        m = self.models.get(model)
        if m is None:
            raise errors.ModelNotFound(f"unknown model {model!r}")
        policy = (config or {}).get("version_policy", {}).get("specific", {})
        wanted = tuple(str(v) for v in policy.get("versions", ())) or m.versions
        bad = [v for v in wanted if (model, v) in self.broken]
        if bad:
            raise errors.BackendError(f"failed to load {model!r} version {bad[0]}")
        m.versions = tuple(dict.fromkeys((*m.versions, *wanted)))

    async def unload_model(self, model: str, timeout_s: float) -> None:
        self.models.pop(model, None)

    async def close(self) -> None:
        return None
