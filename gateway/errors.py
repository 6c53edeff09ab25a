"""Every failure the gateway can answer with, in one tree.

Each class carries its HTTP status and a stable machine-readable ``code``; one middleware
(`gateway.api.middleware`) turns any of them into a response, so handlers never catch.
Foreign exceptions (grpc, tritonclient, redis) are translated at their boundary.

    SwitchyardError                  500 internal_error             INTERNAL
    ├── ClientError                  400 invalid_request            INVALID_ARGUMENT
    │   ├── MalformedJSON            400 malformed_json             INVALID_ARGUMENT
    │   ├── InvalidField             400 invalid_field              INVALID_ARGUMENT
    │   │   └── InvalidDeadline      400 invalid_deadline           INVALID_ARGUMENT
    │   ├── InvalidTensor            400 invalid_tensor             INVALID_ARGUMENT
    │   ├── InvalidParameter         400 invalid_parameter          INVALID_ARGUMENT
    │   ├── Unauthorized             401 unauthorized               UNAUTHENTICATED
    │   ├── NotFound                 404 not_found                  NOT_FOUND
    │   │   ├── ModelNotFound        404 model_not_found            NOT_FOUND
    │   │   └── VersionNotFound      404 version_not_found          NOT_FOUND
    │   ├── PayloadTooLarge          413 payload_too_large          RESOURCE_EXHAUSTED
    │   ├── ValidationFailed         422 invalid_features*           INVALID_ARGUMENT
    │   └── RateLimited              429 rate_limited               RESOURCE_EXHAUSTED
    ├── BackendError                 502 backend_error              INTERNAL
    ├── ServiceUnavailable           503 unavailable (Retry-After)  UNAVAILABLE
    │   ├── BackendUnavailable       503 backend_unavailable        UNAVAILABLE
    │   ├── Overloaded               503 overloaded                 RESOURCE_EXHAUSTED
    │   ├── NotReady                 503 not_ready                  UNAVAILABLE
    │   ├── FeatureStoreUnavailable  503 feature_store_unavailable  UNAVAILABLE
    │   ├── FeedbackUnavailable      503 feedback_store_unavailable UNAVAILABLE
    │   └── StreamUnavailable        503 log_store_unavailable*     UNAVAILABLE
    └── DeadlineExceeded             504 deadline_exceeded          DEADLINE_EXCEEDED

* invalid_features: the code varies per field error. log_store_unavailable is internal: it
  makes the prediction log spool.

The third column, ``grpc_status``, is the grpc.StatusCode name the OIP gRPC server answers
with (`gateway.api.grpc_server`), what Triton answers for the same failure; a class without
its own inherits its parent's.
"""

from __future__ import annotations

from typing import Any, ClassVar


class SwitchyardError(Exception):
    status: ClassVar[int] = 500
    default_code: ClassVar[str] = "internal_error"
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

    def to_dict(self, request_id: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        body["request_id"] = request_id
        return {"error": body}


class ClientError(SwitchyardError):
    status = 400
    default_code = "invalid_request"
    grpc_status = "INVALID_ARGUMENT"


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
    status = 401
    default_code = "unauthorized"
    grpc_status = "UNAUTHENTICATED"


class NotFound(ClientError):
    status = 404
    default_code = "not_found"
    grpc_status = "NOT_FOUND"


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class VersionNotFound(NotFound):
    default_code = "version_not_found"


class PayloadTooLarge(ClientError):
    status = 413
    default_code = "payload_too_large"
    # What grpc itself answers for a message over the size limit.
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


class ServiceUnavailable(SwitchyardError):
    status = 503
    default_code = "unavailable"
    grpc_status = "UNAVAILABLE"


class BackendUnavailable(ServiceUnavailable):
    """Connection refused, server gone, model not loaded: worth a retry elsewhere."""

    default_code = "backend_unavailable"


class Overloaded(ServiceUnavailable):
    default_code = "overloaded"
    grpc_status = "RESOURCE_EXHAUSTED"


class NotReady(ServiceUnavailable):
    default_code = "not_ready"


class FeatureStoreUnavailable(ServiceUnavailable):
    default_code = "feature_store_unavailable"


class FeedbackUnavailable(ServiceUnavailable):
    default_code = "feedback_store_unavailable"


class StreamUnavailable(ServiceUnavailable):
    """Redis refused or timed out; the prediction log spools the batch instead."""

    default_code = "log_store_unavailable"


class DeadlineExceeded(SwitchyardError):
    status = 504
    default_code = "deadline_exceeded"
    grpc_status = "DEADLINE_EXCEEDED"
