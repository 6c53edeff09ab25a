"""The Open Inference Protocol (KServe v2) REST surface, so stock `tritonclient.http` and other
OIP clients work through the gateway unchanged. JSON tensors and Triton's binary-tensor
extension (`Inference-Header-Content-Length`) are both supported, in requests and responses.
Infer requests are decoded by `v2_codec` (limits, hostile input) and answered by the core,
`InferenceService.infer`, like every other protocol.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.api.keys import LOG_FIELDS, REQUEST_ID, SERVICE, SETTINGS
from gateway.api.middleware import json_response
from gateway.api.v2_codec import DecodeLimits, check_parameters, decode_rest, encode_rest
from gateway.errors import (
    InvalidDeadline,
    InvalidParameter,
    NotReady,
    PayloadTooLarge,
    SwitchyardError,
)

routes = web.RouteTableDef()

HEADER_LENGTH = "Inference-Header-Content-Length"
DEADLINE_HEADER = "X-Deadline-Ms"
ENTITY_HEADER = "X-Entity-ID"


def _model_and_version(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


@routes.get("/v2")
async def server_metadata(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return json_response(await service.backend.server_metadata(service.control_timeout_s))


@routes.get("/v2/health/live")
async def server_live(request: web.Request) -> web.Response:
    return web.Response(status=200)


@routes.get("/v2/health/ready")
async def server_ready(request: web.Request) -> web.Response:
    try:
        await request.app[SERVICE].ready()
    except NotReady:
        return web.Response(status=503)
    return web.Response(status=200)


# Infer first: aiohttp tries every resource under the "/v2/models" prefix in registration
# order, a regex each, so the hot route registered last paid six failed matches per request.
@routes.post("/v2/models/{model}/infer")
@routes.post("/v2/models/{model}/versions/{version}/infer")
async def infer(request: web.Request) -> web.Response:
    service, settings = request.app[SERVICE], request.app[SETTINGS]
    model, version = _model_and_version(request)
    deadline_ms = parse_deadline_ms(
        request.headers.get(DEADLINE_HEADER), settings.routing.max_deadline_ms
    )
    max_bytes = settings.server.max_body_bytes
    if request.content_length is not None and request.content_length > max_bytes:
        raise PayloadTooLarge(
            f"body of {request.content_length} bytes exceeds the limit of {max_bytes}",
            details={"limit": max_bytes},
        )
    body = await request.read()  # aiohttp enforces client_max_size while streaming
    limits = DecodeLimits.for_body(max_bytes)
    req, want = decode_rest(
        model, version, body, request.headers.get(HEADER_LENGTH), limits, request[REQUEST_ID]
    )
    entity = request.headers.get(ENTITY_HEADER)
    if entity is not None and "entity_id" not in req.parameters:  # the body's wins
        check_parameters({"entity_id": entity}, limits, f"{ENTITY_HEADER} header: ")
        check_header_text(entity, ENTITY_HEADER)
        req = dataclasses.replace(req, parameters={**req.parameters, "entity_id": entity})
    request[LOG_FIELDS].update(model=model, version=version or "latest")
    context = {"deadline_ms": deadline_ms} if deadline_ms is not None else {}
    deadline = service.deadline_for(context, service.routes.current.routes.get(model))
    resp = await service.infer(req, deadline)
    request[LOG_FIELDS].update(version=resp.version, fallback=resp.fallback_used)
    payload, header_length = encode_rest(resp, want, req.outputs)
    if header_length is None:
        return web.Response(body=payload, content_type="application/json")
    return web.Response(
        body=payload,
        headers={HEADER_LENGTH: str(header_length), "Content-Type": "application/octet-stream"},
    )


@routes.get("/v2/models/{model}/ready")
@routes.get("/v2/models/{model}/versions/{version}/ready")
async def model_ready(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    model, version = _model_and_version(request)
    try:
        ok = await service.backend.model_ready(model, version, service.control_timeout_s)
    except SwitchyardError:
        ok = False
    return web.Response(status=200 if ok else 400)


@routes.get("/v2/models/{model}")
@routes.get("/v2/models/{model}/versions/{version}")
async def model_metadata(request: web.Request) -> web.Response:
    return await _control(request, request.app[SERVICE].backend.model_metadata)


@routes.get("/v2/models/{model}/config")
@routes.get("/v2/models/{model}/versions/{version}/config")
async def model_config(request: web.Request) -> web.Response:
    return await _control(request, request.app[SERVICE].backend.model_config)


async def _control(
    request: web.Request, call: Callable[[str, str, float], Awaitable[dict[str, Any]]]
) -> web.Response:
    """A control-plane read of the backend's, as JSON, under the control timeout."""
    model, version = _model_and_version(request)
    return json_response(await call(model, version, request.app[SERVICE].control_timeout_s))


def check_header_text(value: str, header: str) -> None:
    """A header value that becomes an id must be printable text. aiohttp decodes header bytes
    as UTF-8 with surrogateescape, so bytes that are not UTF-8 arrive as lone surrogates: they
    pass every length check, then fail wherever the id is encoded (the prediction log's hash),
    after the model has run. Control characters (a tab) are refused with them."""
    if not value.isprintable():  # lone surrogates (category Cs) are not printable either
        raise InvalidParameter(
            f"{header} must be printable UTF-8 text",
            details={"field": header},
        )


def parse_deadline_ms(raw: str | None, max_ms: int) -> float | None:
    """The X-Deadline-Ms header: a finite number of milliseconds in (0, max_ms], or absent."""
    if raw is None:
        return None
    try:
        ms = float(raw)
    except ValueError:
        ms = math.nan
    if not math.isfinite(ms) or not 0 < ms <= max_ms:
        raise InvalidDeadline(
            f"{DEADLINE_HEADER} must be a number of milliseconds in (0, {max_ms}]",
            details={"field": DEADLINE_HEADER},
        )
    return ms
