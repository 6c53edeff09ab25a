"""`POST /v1/feedback {"request_id", "label"}`: ground truth for later accuracy joins.

202: stored. 200: the same label was already there. 404 unknown_request_id: no answer with
that id reached the prediction log. 409 label_conflict: the id already has another label.
"""

from __future__ import annotations

from aiohttp import web

from gateway.api.keys import REQUEST_ID, SETTINGS
from gateway.api.middleware import json_response
from gateway.api.schemas import parse_feedback, read_json
from gateway.errors import FeedbackUnavailable
from gateway.predlog.feedback import LabelStore
from gateway.security.rest import principal_of

#: Set by the composition root when Redis is configured.
LABELS = web.AppKey("labels", LabelStore)

routes = web.RouteTableDef()


@routes.post("/v1/feedback")
async def feedback(request: web.Request) -> web.Response:
    server = request.app[SETTINGS].server
    body = await read_json(request, server.max_body_bytes, server.max_json_depth)
    rid, label = parse_feedback(body)
    request[REQUEST_ID] = rid
    store = request.app.get(LABELS)
    if store is None:
        raise FeedbackUnavailable("feedback needs Redis (redis.url), which is not configured")
    by = principal_of(request).key_id  # who wrote it: a key id, or "anonymous" (auth off)
    if await store.put(rid, label, by=by):
        return json_response({"request_id": rid, "label": label, "status": "stored"}, status=202)
    # The same label again (a client retry): nothing changes.
    return json_response({"request_id": rid, "label": label, "status": "unchanged"}, status=200)
