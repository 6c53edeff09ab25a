"""The interface every model server behind the gateway implements (Triton, the fake)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from gateway.tensors import Tensor


@dataclass(frozen=True, slots=True)
class InferRequest:
    model: str
    version: str  # "" lets the server pick (its version policy's latest)
    inputs: tuple[Tensor, ...]
    outputs: tuple[str, ...] = ()  # empty: every output of the model
    request_id: str = ""
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InferResponse:
    model: str
    version: str
    outputs: Mapping[str, Tensor]
    request_id: str = ""
    #: What the gateway adds to an OIP response's ``parameters``: policy_version,
    #: fallback_used, request_id. Empty straight from a backend.
    parameters: Mapping[str, Any] = field(default_factory=dict)


class Backend(Protocol):
    """A model server. Every call takes a timeout: nothing the gateway awaits is unbounded.

    Implementations raise only `gateway.errors` exceptions: BackendUnavailable (retryable),
    DeadlineExceeded, ModelNotFound/VersionNotFound, ClientError, BackendError.
    """

    name: str

    async def infer(self, request: InferRequest, timeout_s: float) -> InferResponse: ...

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
