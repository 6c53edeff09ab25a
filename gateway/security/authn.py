"""Who is calling, and may they call this: keys -> Principal, endpoints -> scopes.

One protocol-independent check, `Authenticator.authenticate(presented, scope)`, serves REST
(`Authorization: Bearer <key>` or `X-API-Key`) and gRPC (`authorization` metadata) alike.

    scope     endpoints
    predict   /v1/predict, /v1/predict:batch, /v2/models/.../infer, gRPC ModelInfer
    feedback  /v1/feedback
    admin     /admin/*, /metrics (auth.protect_metrics), any path not listed here
    read      /v2 metadata (auth.protect_metadata)
    (open)    /healthz, /readyz, /v2/health/*, /openapi.json, gRPC ServerLive/ServerReady

Unlisted paths need `admin`: a new endpoint is closed until someone decides otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import Forbidden, Unauthorized
from gateway.security.keys import SCOPES, KeyFile

#: /openapi.json: the contract a client needs before it has a key; it holds no data.
OPEN_PATHS = frozenset(
    {"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/openapi.json"}
)


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    scopes: frozenset[str]
    tenant: str | None = None
    #: Requests per second for this key; None: not limited.
    rate: float | None = None
    burst: int | None = None


#: Who calls when auth is off, or on an open endpoint: every scope, no limit.
ANONYMOUS = Principal("anonymous", frozenset(SCOPES))


def required_scope(
    path: str, protect_metrics: bool = False, protect_metadata: bool = False
) -> str | None:
    """The scope ``path`` needs; None: open to anyone."""
    if path in OPEN_PATHS or path.startswith("/v2/health/"):
        return None
    if path in ("/v1/predict", "/v1/predict:batch"):
        return "predict"
    if path == "/v1/feedback":
        return "feedback"
    if path.startswith("/v2"):
        if path.startswith("/v2/models/") and path.endswith("/infer"):
            return "predict"
        return "read" if protect_metadata else None
    if path == "/metrics":
        return "admin" if protect_metrics else None
    return "admin"


#: gRPC (inference.GRPCInferenceService) methods that are always open.
GRPC_OPEN = frozenset({"ServerLive", "ServerReady"})


def grpc_scope(method: str, protect_metadata: bool = False) -> str | None:
    """The scope a gRPC method needs, by its short name (``ModelInfer``) or full path
    (``/inference.GRPCInferenceService/ModelInfer``); same rules as REST."""
    name = method.rsplit("/", 1)[-1]
    if name in GRPC_OPEN:
        return None
    if name in ("ModelInfer", "ModelStreamInfer"):
        return "predict"
    if name in ("ServerMetadata", "ModelMetadata", "ModelReady", "ModelConfig"):
        return "read" if protect_metadata else None
    return "admin"  # repository control, statistics, shared memory: operators only


def presented_key(authorization: str | None, api_key: str | None = None) -> str | None:
    """The key in an ``Authorization: Bearer`` value, else in ``X-API-Key``."""
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return authorization.strip()  # a malformed header is a wrong key, not a missing one
    return api_key.strip() if api_key else None


class Authenticator:
    """``keys`` returns the current key file (the reloader swaps it under us)."""

    def __init__(self, keys: Callable[[], KeyFile], enabled: bool = True) -> None:
        self.keys = keys
        self.enabled = enabled

    def authenticate(self, presented: str | None, scope: str | None) -> Principal:
        """The caller behind ``presented`` (a bare key, or an ``Authorization`` value such as
        ``Bearer sk_...``), if it holds ``scope``. Raises Unauthorized (401) for no key or an
        unknown one, Forbidden (403) for a valid key without the scope. Error messages never
        repeat the key."""
        if not self.enabled or scope is None:
            return ANONYMOUS
        key = presented_key(presented)
        if not key:
            raise Unauthorized("an API key is required: Authorization: Bearer <key>")
        record = self.keys().lookup(key)
        if record is None:
            raise Unauthorized("invalid API key")
        if scope not in record.scopes:
            raise Forbidden(
                f"key {record.id!r} lacks the {scope!r} scope",
                details={"key_id": record.id, "required_scope": scope},
            )
        return Principal(record.id, record.scopes, record.tenant, record.rate, record.burst)
