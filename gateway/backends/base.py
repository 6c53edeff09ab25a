"""The interface every model server behind the gateway implements (Triton, the fake)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

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
