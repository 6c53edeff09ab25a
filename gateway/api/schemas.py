"""The /v1 bodies as pydantic models: what requests are validated with, and what the OpenAPI
document (`gateway.api.openapi`) is generated from, so the two cannot drift.

Validation keeps the API's stable error codes: a pydantic error is mapped to the code the
field has always had (`unknown_field`, `missing_field`, `invalid_field`), checked in the
order the fields were always checked, so one body gets the same code as before. Features stay
free-form here (`Any` while validating): the model's manifest checks them, with its own 422
codes (`wrong_feature_count`, `invalid_feature_type`...); the schema still documents them.
"""

from __future__ import annotations

import math
import uuid
from typing import Annotated, Any, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema

from gateway.api.limits import check_depth
from gateway.errors import ClientError, ErrorBody, MalformedJSON, PayloadTooLarge
from gateway.service import PredictRequest

MAX_ID = 128  # request_id, entity_id, model_name, each feature_ref
MAX_LABEL = 256
MAX_REFS = 64
MAX_CONTEXT_KEYS = 64
MAX_CONTEXT_STRING = 1024

_Id = Annotated[str, Field(min_length=1, max_length=MAX_ID)]
#: A request id is echoed in the X-Request-ID header: visible ASCII only (a control
#: character there made aiohttp drop the connection unanswered; found by schemathesis).
_RequestId = Annotated[str, Field(min_length=1, max_length=MAX_ID, pattern=r"^[!-~]+$")]
_Number = {"type": "number"}
_FEATURES_SCHEMA = {
    "description": "A row in the model's feature order, or feature name -> number; the "
    "model's manifest checks it (422 wrong_feature_count, missing_feature, ...).",
    "oneOf": [
        {"type": "array", "items": _Number},
        {"type": "object", "additionalProperties": _Number},
    ],
}


class PredictContext(BaseModel):
    """Routing context: segment keys, and the request's own deadline."""

    model_config = ConfigDict(extra="allow", strict=True)
    deadline_ms: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="at most routing.max_deadline_ms"
    )


class PredictBody(BaseModel):
    """`POST /v1/predict`."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "anyOf": [
                {"required": ["features"], "properties": {"features": {"not": {"type": "null"}}}},
                {"required": ["feature_refs"], "properties": {"feature_refs": {"minItems": 1}}},
            ]
        },
    )
    request_id: _RequestId | None = None
    entity_id: _Id | None = None
    model_name: _Id
    features: Annotated[Any, WithJsonSchema(_FEATURES_SCHEMA)] = None
    feature_refs: Annotated[list[_Id], Field(max_length=MAX_REFS)] | None = None
    context: (
        Annotated[
            PredictContext,
            Field(
                json_schema_extra={
                    "maxProperties": MAX_CONTEXT_KEYS,
                    "additionalProperties": {"maxLength": MAX_CONTEXT_STRING},
                }
            ),
        ]
        | None
    ) = None


class BatchBody(BaseModel):
    """`POST /v1/predict:batch`: a JSON list of predict bodies, or this object."""

    model_config = ConfigDict(extra="allow")
    requests: list[PredictBody] = Field(min_length=1)


class FeedbackBody(BaseModel):
    """`POST /v1/feedback`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    request_id: _RequestId
    label: Annotated[str, Field(min_length=1, max_length=MAX_LABEL)] | float | bool


class Prediction(BaseModel):
    """One answer (`gateway.service.Prediction.to_dict`)."""

    request_id: str
    model_name: str
    model_version: str
    policy_version: str
    score: float | None
    decision: str | None
    confidence: float | None
    explanations_ref: str | None
    fallback_used: Literal["fallback_model", "cache", "default"] | None
    latency_ms: float
    outputs: dict[str, Any] | None = None


class BatchItemError(BaseModel):
    """A batch item whose own deadline ran out; the other items stand."""

    request_id: str
    error: ErrorBody


class BatchResponse(BaseModel):
    predictions: list[Prediction | BatchItemError]


class FeedbackResponse(BaseModel):
    request_id: str
    label: str | float | bool
    status: Literal["stored", "unchanged"]


async def read_json(request: web.Request, max_bytes: int, max_depth: int = 32) -> Any:
    if request.content_length is not None and request.content_length > max_bytes:
        raise PayloadTooLarge(
            f"body of {request.content_length} bytes exceeds the limit of {max_bytes}",
            details={"limit": max_bytes},
        )
    body = await request.read()  # aiohttp enforces client_max_size while streaming
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedJSON(f"body is not valid JSON: {exc}") from None
    check_depth(body, max_depth)
    return value


# The order the fields were always checked in: the first failing one names the error.
_ORDER = ("model_name", "feature_refs", "features", "context", "request_id", "entity_id")


def _client_error(where: str, field: str, exc_loc: tuple[Any, ...], max_ms: int) -> ClientError:
    if field == "model_name":
        return ClientError(f"{where}model_name is required (a string of at most {MAX_ID})",
                           code="missing_field", details={"field": "model_name"})  # fmt: skip
    if field == "feature_refs":
        return ClientError(f"{where}feature_refs must be a list of strings", code="invalid_field",
                           details={"field": "feature_refs"})  # fmt: skip
    if field == "features":
        return ClientError(f"{where}features (or feature_refs) is required", code="missing_field",
                           details={"field": "features"})  # fmt: skip
    if field == "context" and exc_loc[1:2] == ("deadline_ms",):
        return ClientError(
            f"{where}context.deadline_ms must be a number in (0, {max_ms}]",
            code="invalid_field",
            details={"field": "context.deadline_ms"},
        )
    if field == "context":
        return ClientError(
            f"{where}context must be an object of at most {MAX_CONTEXT_KEYS} entries, "
            f"strings of at most {MAX_CONTEXT_STRING} characters",
            code="invalid_field",
            details={"field": "context"},
        )
    return ClientError(
        f"{where}{field} must be a non-empty string of at most {MAX_ID} characters",
        code="invalid_field",
        details={"field": field},
    )


def _context_problem(context: Any, max_deadline_ms: int) -> tuple[Any, ...] | None:
    """What the model cannot say: the configured deadline ceiling, the size bounds."""
    if not isinstance(context, dict):
        return None  # the model reports it
    deadline = context.get("deadline_ms")
    if (
        isinstance(deadline, int | float)
        and not isinstance(deadline, bool)
        and math.isfinite(deadline)
        and deadline > max_deadline_ms
    ):
        return ("context", "deadline_ms")
    if len(context) > MAX_CONTEXT_KEYS or any(
        len(k) > MAX_ID or (isinstance(v, str) and len(v) > MAX_CONTEXT_STRING)
        for k, v in context.items()
    ):
        return ("context",)
    return None


def parse_predict(
    body: Any, max_deadline_ms: int, where: str = "", default_id: str | None = None
) -> PredictRequest:
    if not isinstance(body, dict):
        raise ClientError(
            f"{where}a prediction request must be a JSON object", code="invalid_request"
        )
    problems: list[tuple[Any, ...]] = []
    try:
        PredictBody.model_validate(body)
    except ValidationError as exc:
        errs = exc.errors()
        unknown = sorted({str(e["loc"][0]) for e in errs if e["type"] == "extra_forbidden"})
        if unknown:
            raise ClientError(f"{where}unknown field(s) {unknown}", code="unknown_field",
                              details={"fields": unknown}) from None  # fmt: skip
        problems = [tuple(e["loc"]) for e in errs]
    if body.get("features") is None and not body.get("feature_refs"):
        problems.append(("features",))
    if (ctx := _context_problem(body.get("context"), max_deadline_ms)) is not None:
        problems.append(ctx)
    if problems:
        loc = min(problems, key=lambda p: _ORDER.index(str(p[0])))
        raise _client_error(where, str(loc[0]), loc, max_deadline_ms)
    return PredictRequest(
        request_id=body.get("request_id") or default_id or uuid.uuid4().hex,
        model_name=body["model_name"],
        features=body.get("features"),
        entity_id=body.get("entity_id"),
        feature_refs=tuple(body.get("feature_refs") or ()),
        context=body.get("context") or {},
    )


def parse_batch(body: Any, max_items: int, max_deadline_ms: int) -> list[PredictRequest]:
    """A JSON list of predict requests, or {"requests": [...]}."""
    items = body.get("requests") if isinstance(body, dict) else body
    if not isinstance(items, list) or not items:
        raise ClientError(
            "a batch is a non-empty list of prediction requests", code="invalid_request"
        )
    if len(items) > max_items:
        raise PayloadTooLarge(f"batch of {len(items)} exceeds the limit of {max_items}",
                              details={"limit": max_items})  # fmt: skip
    reqs = [parse_predict(b, max_deadline_ms, f"requests[{i}]: ") for i, b in enumerate(items)]
    ids = [r.request_id for r in reqs]
    if len(set(ids)) != len(ids):
        raise ClientError(
            "request_id values in a batch must be unique", code="duplicate_request_id"
        )
    return reqs


def parse_feedback(body: Any) -> tuple[str, str | int | float]:
    """The (request_id, label) of a `POST /v1/feedback` body."""
    if not isinstance(body, dict) or set(body) - {"request_id", "label"}:
        raise ClientError("feedback is {request_id, label}", code="invalid_request")
    try:
        FeedbackBody.model_validate(body)
    except ValidationError as exc:
        field = (
            "request_id" if any(e["loc"][:1] == ("request_id",) for e in exc.errors()) else "label"
        )
        if field == "request_id":
            raise ClientError("request_id must be a non-empty string", code="invalid_field",
                              details={"field": "request_id"}) from None  # fmt: skip
        raise ClientError("label must be a non-empty string, a number or a boolean",
                          code="invalid_field", details={"field": "label"}) from None  # fmt: skip
    return body["request_id"], body["label"]
