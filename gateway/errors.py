"""Every failure the gateway can answer with, in one tree.

Each class carries its HTTP status and a stable machine-readable ``code``; one middleware
(`gateway.api.middleware`) turns any of them into a response, so handlers never catch.
Foreign exceptions (grpc, tritonclient, redis) are translated at their boundary. Response
headers an error needs (`Retry-After`, `WWW-Authenticate`, `X-RateLimit-*`) come from its
`headers()`, so the middleware never special-cases a class.

    SwitchyardError                      500 internal_error
    ├── ClientError                      400 invalid_request
    │   ├── BadRequest                   400 bad_request (what the HTTP parser refuses)
    │   ├── MalformedJSON                400 malformed_json
    │   ├── InvalidField                 400 invalid_field
    │   │   └── InvalidDeadline          400 invalid_deadline
    │   ├── InvalidTensor                400 invalid_tensor
    │   ├── InvalidParameter             400 invalid_parameter
    │   ├── Unauthorized                 401 unauthenticated (+ WWW-Authenticate: Bearer)
    │   ├── Forbidden                    403 forbidden (the key lacks the endpoint's scope)
    │   ├── NotFound                     404 not_found
    │   │   ├── ModelNotFound            404 model_not_found
    │   │   ├── VersionNotFound          404 version_not_found
    │   │   └── UnknownRequestId         404 unknown_request_id (feedback for no answer)
    │   ├── Conflict                     409 conflict
    │   │   ├── LabelConflict            409 label_conflict
    │   │   └── RegistryError            409 registry_error (model registry CLI: publish ...)
    │   ├── RequestTimeout               408 request_timeout (the body came too slowly)
    │   ├── PayloadTooLarge              413 payload_too_large
    │   ├── HeaderTooLarge               431 header_too_large (request line, header, count)
    │   ├── ValidationFailed             422 invalid_features (code varies per field error)
    │   └── RateLimited                  429 rate_limited (+ Retry-After, X-RateLimit-*)
    ├── BackendError                     502 backend_error               [server, ladder]
    ├── ServiceUnavailable               503 unavailable (+ Retry-After)
    │   ├── BackendUnavailable           503 backend_unavailable         [retry, server, ladder]
    │   │   ├── CircuitOpen              503 circuit_open                [ladder: breaker_open]
    │   │   └── NoReadyServer            503 backend_unavailable     [ladder: no_ready_server]
    │   ├── Overloaded                   503 overloaded (gateway sheds: the caller sees it)
    │   │   └── BackendOverloaded        503 overloaded       [server, ladder: overloaded]
    │   ├── NotReady                     503 not_ready
    │   ├── FeatureStoreUnavailable      503 feature_store_unavailable
    │   ├── FeedbackUnavailable          503 feedback_store_unavailable
    │   ├── StreamUnavailable            503 log_store_unavailable (internal: triggers spooling)
    │   └── ArchiveUnavailable           503 unavailable (prediction archive storage; CLI only)
    └── DeadlineExceeded                 504 deadline_exceeded  [ladder: deadline; server*]

Traits, as class attributes, read by the layers instead of matching messages:
- ``retryable``: the pool may try again, on another server when it has one [retry];
- ``server_failure``: the breaker of the (server, model) that raised it counts a failure
  [server]; a DeadlineExceeded counts only when the attempt had at least the timeout floor
  (the route's SLO p99, or a configured minimum): a client's short deadline says nothing of
  the server;
- ``fallback_reason``: the fallback ladder answers instead, counted under this reason
  [ladder]; None: the caller must see the error (bad input, the gateway shedding load).
- ``grpc_status``: the grpc.StatusCode name the OIP gRPC server answers with
  (`gateway.api.grpc_server`), what Triton answers for the same failure; a class without its
  own inherits its parent's (ClientError INVALID_ARGUMENT, NotFound NOT_FOUND, Unauthorized
  UNAUTHENTICATED, Forbidden PERMISSION_DENIED, PayloadTooLarge / RateLimited / Overloaded
  RESOURCE_EXHAUSTED, ServiceUnavailable UNAVAILABLE, DeadlineExceeded DEADLINE_EXCEEDED,
  anything else INTERNAL).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, NotRequired

# pydantic (the OpenAPI document, gateway.api.openapi) reads these on Python 3.11 only
# from typing_extensions.
from typing_extensions import TypedDict


class ErrorDetail(TypedDict):
    """What `SwitchyardError.to_dict` puts under "error": the /v1 and admin error body."""

    code: str
    message: str
    details: NotRequired[dict[str, Any]]
    request_id: str | None


class ErrorBody(TypedDict):
    error: ErrorDetail


class V2ErrorBody(TypedDict):
    """The /v2 (KServe v2, Triton) error body: clients read a string under "error"."""

    error: str
    code: str


class SwitchyardError(Exception):
    status: ClassVar[int] = 500
    default_code: ClassVar[str] = "internal_error"
    retryable: ClassVar[bool] = False
    server_failure: ClassVar[bool] = False
    fallback_reason: ClassVar[str | None] = None
    #: A grpc.StatusCode name; a string so this module needs no grpc import.
    grpc_status: ClassVar[str] = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: dict[str, Any] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.details = details or {}
        self.retry_after_s = retry_after_s
        #: Extra response headers, set by whoever raises (e.g. the rate limiter's X-RateLimit-*).
        self.extra_headers: dict[str, str] = {}

    def headers(self) -> dict[str, str]:
        """Response headers this error adds: Retry-After when set, then its own."""
        out: dict[str, str] = {}
        if self.retry_after_s is not None:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        out.update(self.extra_headers)
        return out

    def to_dict(self, request_id: str | None) -> ErrorBody:
        body: ErrorDetail
        if self.details:
            body = {"code": self.code, "message": self.message, "details": self.details,
                    "request_id": request_id}  # fmt: skip
        else:
            body = {"code": self.code, "message": self.message, "request_id": request_id}
        return {"error": body}


class ClientError(SwitchyardError):
    status = 400
    default_code = "invalid_request"
    grpc_status = "INVALID_ARGUMENT"


class BadRequest(ClientError):
    """A request the HTTP parser refuses (answered by `gateway.api.middleware`'s protocol,
    before any middleware runs)."""

    default_code = "bad_request"


class MalformedJSON(ClientError):
    default_code = "malformed_json"


class InvalidField(ClientError):
    """A request field of the wrong type or out of range (``details.field`` names it)."""

    default_code = "invalid_field"


class InvalidDeadline(InvalidField):
    default_code = "invalid_deadline"


class InvalidTensor(ClientError):
    """An OIP input tensor that cannot be decoded: name, datatype, shape or data."""

    default_code = "invalid_tensor"


class InvalidParameter(ClientError):
    """An OIP ``parameters`` map that is not string keys to scalar values."""

    default_code = "invalid_parameter"


class Unauthorized(ClientError):
    """No key, or a key the key file does not hold (unknown, revoked)."""

    status = 401
    default_code = "unauthenticated"
    grpc_status = "UNAUTHENTICATED"

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "WWW-Authenticate": 'Bearer realm="switchyard"'}


class Forbidden(ClientError):
    """A valid key without the scope the endpoint needs."""

    status = 403
    default_code = "forbidden"
    grpc_status = "PERMISSION_DENIED"


class NotFound(ClientError):
    status = 404
    default_code = "not_found"
    grpc_status = "NOT_FOUND"


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class VersionNotFound(NotFound):
    default_code = "version_not_found"


class UnknownRequestId(NotFound):
    """Feedback for a request id this deployment has no (logged) answer for."""

    default_code = "unknown_request_id"


class Conflict(ClientError):
    status = 409
    default_code = "conflict"


class LabelConflict(Conflict):
    """The request id already carries a different label; labels are write-once."""

    default_code = "label_conflict"


class RequestTimeout(ClientError):
    """The client sent headers but not its body within server.body_read_timeout_s."""

    status = 408
    default_code = "request_timeout"
    grpc_status = "DEADLINE_EXCEEDED"


class PayloadTooLarge(ClientError):
    status = 413
    default_code = "payload_too_large"
    # What grpc itself answers for a message over the size limit.
    grpc_status = "RESOURCE_EXHAUSTED"


class HeaderTooLarge(ClientError):
    """The request line, a header field or the number of headers is past the server's
    limits (server.max_line_bytes, max_header_bytes, max_headers)."""

    status = 431
    default_code = "header_too_large"
    grpc_status = "RESOURCE_EXHAUSTED"


class ValidationFailed(ClientError):
    status = 422
    default_code = "invalid_features"


class RateLimited(ClientError):
    status = 429
    default_code = "rate_limited"
    grpc_status = "RESOURCE_EXHAUSTED"


class BackendError(SwitchyardError):
    """The backend answered, but with an error that is not the caller's fault."""

    status = 502
    default_code = "backend_error"
    server_failure = True
    fallback_reason = "error"


class ServiceUnavailable(SwitchyardError):
    status = 503
    default_code = "unavailable"
    grpc_status = "UNAVAILABLE"


class BackendUnavailable(ServiceUnavailable):
    """Connection refused, server gone, model not loaded: worth a retry elsewhere."""

    default_code = "backend_unavailable"
    retryable = True
    server_failure = True
    fallback_reason = "error"


class CircuitOpen(BackendUnavailable):
    """The breaker for this (server, model) refuses calls; the caller goes to its fallback."""

    default_code = "circuit_open"
    retryable = False  # retrying an open breaker only spends the deadline
    server_failure = False  # raised before any server was called
    fallback_reason = "breaker_open"


class NoReadyServer(BackendUnavailable):
    """Every server that serves the model failed its health check: fail fast to fallback.
    Clients see the same code as any unavailable backend."""

    retryable = False
    server_failure = False
    fallback_reason = "no_ready_server"


class Overloaded(ServiceUnavailable):
    """The gateway sheds the call (admission): no capacity, say so to the caller."""

    default_code = "overloaded"
    grpc_status = "RESOURCE_EXHAUSTED"


class BackendOverloaded(Overloaded):
    """The server said RESOURCE_EXHAUSTED (its queue is full): an overload signal from that
    server, so its breaker counts it and the ladder may answer from elsewhere."""

    server_failure = True
    fallback_reason = "overloaded"


class NotReady(ServiceUnavailable):
    default_code = "not_ready"


class FeatureStoreUnavailable(ServiceUnavailable):
    default_code = "feature_store_unavailable"


class FeedbackUnavailable(ServiceUnavailable):
    default_code = "feedback_store_unavailable"


class StreamUnavailable(ServiceUnavailable):
    """Redis refused or timed out; the prediction log spools the batch instead."""

    default_code = "log_store_unavailable"


class ArchiveUnavailable(ServiceUnavailable):
    """The prediction archive's storage failed, or its fsspec protocol is not installed.
    Never on the request path (the archiver CLI), so it keeps its parent's code."""


class DeadlineExceeded(SwitchyardError):
    status = 504
    default_code = "deadline_exceeded"
    server_failure = True  # only when the attempt had the timeout floor (the pool checks)
    fallback_reason = "deadline"
    grpc_status = "DEADLINE_EXCEEDED"


class RegistryError(Conflict):
    """A model-registry operation refused: bad artifact, version exists, tampered file."""

    status = 409
    default_code = "registry_error"
    grpc_status = "FAILED_PRECONDITION"
