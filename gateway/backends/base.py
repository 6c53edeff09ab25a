"""The interface every model server behind the gateway implements (Triton, the fake)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from gateway.types import Deadline, InferRequest, InferResponse

__all__ = ["Backend", "InferRequest", "InferResponse", "ModelControl"]


class Backend(Protocol):
    """A model server: the bottom layer of the request path, with its one call shape.

    ``infer`` spends from the request's Deadline (the server is told the time left, too);
    control-plane calls take a plain timeout. Nothing the gateway awaits is unbounded.
    Implementations raise only `gateway.errors` exceptions: BackendUnavailable (retryable),
    BackendOverloaded, DeadlineExceeded, ModelNotFound/VersionNotFound, ClientError,
    BackendError.
    """

    name: str

    async def infer(self, request: InferRequest, deadline: Deadline) -> InferResponse: ...

    async def server_live(self, timeout_s: float) -> bool: ...

    async def server_ready(self, timeout_s: float) -> bool: ...

    async def model_ready(self, model: str, version: str, timeout_s: float) -> bool: ...

    async def server_metadata(self, timeout_s: float) -> dict[str, Any]: ...

    async def model_metadata(
        self, model: str, version: str, timeout_s: float
    ) -> dict[str, Any]: ...

    async def model_config(self, model: str, version: str, timeout_s: float) -> dict[str, Any]: ...

    async def close(self) -> None: ...


@runtime_checkable
class ModelControl(Protocol):
    """Loading and unloading model versions (Triton's model-control API, explicit mode).

    Separate from `Backend` so backends without model control (pools, fakes) still conform.
    """

    async def repository_index(self, timeout_s: float) -> list[dict[str, Any]]:
        """Every model version the server knows: {name, version, state, reason}."""
        ...

    async def load_model(
        self, model: str, timeout_s: float, config: Mapping[str, Any] | None = None
    ) -> None:
        """(Re)load ``model``; ``config`` overrides its config.pbtxt (e.g. version_policy)."""
        ...

    async def unload_model(self, model: str, timeout_s: float) -> None: ...
