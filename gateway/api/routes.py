"""The /v1 JSON prediction API and the health, readiness and metrics endpoints."""

from __future__ import annotations

import os

import structlog
from aiohttp import web

from gateway.api.keys import LOG_FIELDS, METRICS, REQUEST_ID, SERVICE, SETTINGS
from gateway.api.middleware import json_response
from gateway.api.schemas import parse_batch, parse_predict, read_json
from gateway.errors import SwitchyardError

routes = web.RouteTableDef()


@routes.post("/v1/predict")
async def predict(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    body = await read_json(request, settings.server.max_body_bytes, settings.server.max_json_depth)
    req = parse_predict(body, settings.routing.max_deadline_ms, default_id=request[REQUEST_ID])
    if req.request_id != request[REQUEST_ID]:  # the body names the prediction's id
        request[REQUEST_ID] = req.request_id
        structlog.contextvars.bind_contextvars(request_id=req.request_id)
    request[LOG_FIELDS]["model"] = req.model_name
    pred = await request.app[SERVICE].predict(req)
    request[LOG_FIELDS].update(
        version=pred.model_version, arm=pred.arm, fallback=pred.fallback_used
    )
    return json_response(pred.to_dict())


@routes.post("/v1/predict:batch")
async def predict_batch(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    body = await read_json(request, settings.server.max_body_bytes, settings.server.max_json_depth)
    reqs = parse_batch(body, settings.server.max_batch_items, settings.routing.max_deadline_ms)
    request[LOG_FIELDS].update(model=reqs[0].model_name, batch=len(reqs))
    answers = await request.app[SERVICE].predict_batch(reqs)
    # An item whose own deadline ran out gets its error in its place; the others stand.
    return json_response(
        {
            "predictions": [
                {"request_id": r.request_id, **a.to_dict(r.request_id)}
                if isinstance(a, SwitchyardError)
                else a.to_dict()
                for r, a in zip(reqs, answers, strict=True)
            ]
        }
    )


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    # pid: which worker answered (serve --workers N); cheap, and handy behind SO_REUSEPORT.
    return json_response({"status": "ok", "pid": os.getpid()})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    targets = await service.ready()
    return json_response({"status": "ready", "targets": targets})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].render_for(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})
