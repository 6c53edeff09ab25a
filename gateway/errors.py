"""Every failure the gateway can answer with, in one tree.

Each class carries its HTTP status and a stable machine-readable ``code``; one middleware
(`gateway.api.middleware`) turns any of them into a response, so handlers never catch.
Foreign exceptions (grpc, tritonclient, redis) are translated at their boundary.

    SwitchyardError                      500 internal_error
    ├── ClientError                      400 invalid_request
    │   ├── MalformedJSON                400 malformed_json
    │   ├── Unauthorized                 401 unauthorized
    │   ├── NotFound                     404 not_found
    │   │   ├── ModelNotFound            404 model_not_found
    │   │   └── VersionNotFound          404 version_not_found
    │   ├── PayloadTooLarge              413 payload_too_large
    │   ├── ValidationFailed             422 invalid_features (code varies per field error)
    │   └── RateLimited                  429 rate_limited
    ├── BackendError                     502 backend_error
    ├── ServiceUnavailable               503 unavailable (+ Retry-After)
    │   ├── BackendUnavailable           503 backend_unavailable
    │   ├── Overloaded                   503 overloaded
    │   ├── NotReady                     503 not_ready
    │   ├── FeatureStoreUnavailable      503 feature_store_unavailable
    │   ├── FeedbackUnavailable          503 feedback_store_unavailable
    │   └── StreamUnavailable            503 log_store_unavailable (internal: triggers spooling)
    ├── DeadlineExceeded                 504 deadline_exceeded
    └── RegistryError                    409 registry_error (model registry CLI: publish ...)
"""

from __future__ import annotations

from typing import Any, ClassVar


class SwitchyardError(Exception):
    status: ClassVar[int] = 500
    default_code: ClassVar[str] = "internal_error"

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


class MalformedJSON(ClientError):
    default_code = "malformed_json"


class Unauthorized(ClientError):
    status = 401
    default_code = "unauthorized"


class NotFound(ClientError):
    status = 404
    default_code = "not_found"


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class VersionNotFound(NotFound):
    default_code = "version_not_found"


class PayloadTooLarge(ClientError):
    status = 413
    default_code = "payload_too_large"


class ValidationFailed(ClientError):
    status = 422
    default_code = "invalid_features"


class RateLimited(ClientError):
    status = 429
    default_code = "rate_limited"


class BackendError(SwitchyardError):
    """The backend answered, but with an error that is not the caller's fault."""

    status = 502
    default_code = "backend_error"


class ServiceUnavailable(SwitchyardError):
    status = 503
    default_code = "unavailable"


class BackendUnavailable(ServiceUnavailable):
    """Connection refused, server gone, model not loaded: worth a retry elsewhere."""

    default_code = "backend_unavailable"


class Overloaded(ServiceUnavailable):
    default_code = "overloaded"


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


class RegistryError(SwitchyardError):
    """A model-registry operation refused: bad artifact, version exists, tampered file."""

    status = 409
    default_code = "registry_error"
