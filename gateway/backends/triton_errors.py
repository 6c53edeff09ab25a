"""Triton's errors, by status, as the gateway's exception tree: one table for both transports.

Triton gives an error the same status on either wire (its HTTP status is its gRPC status's
twin), so the HTTP transport maps its status to the gRPC code and both classify here.
"""

from __future__ import annotations

import grpc

from gateway import errors

#: Triton's HTTP statuses as the gRPC codes it gives the same errors.
HTTP_STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def classify(
    code: grpc.StatusCode, detail: str, where: dict[str, str], label: str = ""
) -> errors.SwitchyardError:
    """The gateway's error for a Triton failure; ``label`` names an unmapped status in the
    message (default: the gRPC code's name)."""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return errors.DeadlineExceeded("backend call ran out of time", details=where)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return errors.BackendUnavailable(f"backend unavailable: {detail}", details=where)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return errors.BackendOverloaded(f"backend overloaded: {detail}", details=where)
    if code == grpc.StatusCode.NOT_FOUND or "unknown model" in detail:
        return errors.ModelNotFound(detail, details=where)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        if "not found" in detail and "version" in detail:
            return errors.VersionNotFound(detail, details=where)
        return errors.ClientError(detail, code="invalid_tensor", details=where)
    return errors.BackendError(f"backend error ({label or code.name}): {detail}", details=where)
