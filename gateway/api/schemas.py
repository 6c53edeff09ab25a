"""Parsing and validating /v1 request bodies into service value objects."""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from gateway.errors import ClientError, MalformedJSON, PayloadTooLarge
from gateway.service import PredictRequest

_PREDICT_FIELDS = {"request_id", "entity_id", "model_name", "features", "feature_refs", "context"}
_MAX_ID = 128


async def read_json(request: web.Request, max_bytes: int) -> Any:
    if request.content_length is not None and request.content_length > max_bytes:
        raise PayloadTooLarge(
            f"body of {request.content_length} bytes exceeds the limit of {max_bytes}",
            details={"limit": max_bytes},
        )
    body = await request.read()  # aiohttp enforces client_max_size while streaming
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedJSON(f"body is not valid JSON: {exc}") from None


def _opt_str(body: Mapping[str, Any], key: str, where: str) -> str | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or not v or len(v) > _MAX_ID:
        raise ClientError(
            f"{where}{key} must be a non-empty string of at most {_MAX_ID} characters",
            code="invalid_field",
            details={"field": key},
        )
    return v


def parse_predict(
    body: Any, max_deadline_ms: int, where: str = "", default_id: str | None = None
) -> PredictRequest:
    if not isinstance(body, dict):
        raise ClientError(
            f"{where}a prediction request must be a JSON object", code="invalid_request"
        )
    unknown = sorted(set(body) - _PREDICT_FIELDS)
    if unknown:
        raise ClientError(
            f"{where}unknown field(s) {unknown}", code="unknown_field", details={"fields": unknown}
        )
    model = body.get("model_name")
    if not isinstance(model, str) or not model:
        raise ClientError(f"{where}model_name is required", code="missing_field",
                          details={"field": "model_name"})  # fmt: skip
    refs = body.get("feature_refs") or []
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise ClientError(f"{where}feature_refs must be a list of strings", code="invalid_field",
                          details={"field": "feature_refs"})  # fmt: skip
    if body.get("features") is None and not refs:
        raise ClientError(f"{where}features (or feature_refs) is required", code="missing_field",
                          details={"field": "features"})  # fmt: skip
    context = body.get("context") or {}
    if not isinstance(context, dict):
        raise ClientError(f"{where}context must be an object", code="invalid_field",
                          details={"field": "context"})  # fmt: skip
    deadline = context.get("deadline_ms")
    if deadline is not None and (
        isinstance(deadline, bool)
        or not isinstance(deadline, int | float)
        or not math.isfinite(deadline)
        or not 0 < deadline <= max_deadline_ms
    ):
        raise ClientError(
            f"{where}context.deadline_ms must be a number in (0, {max_deadline_ms}]",
            code="invalid_field",
            details={"field": "context.deadline_ms"},
        )
    return PredictRequest(
        request_id=_opt_str(body, "request_id", where) or default_id or uuid.uuid4().hex,
        model_name=model,
        features=body.get("features"),
        entity_id=_opt_str(body, "entity_id", where),
        feature_refs=tuple(refs),
        context=context,
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
