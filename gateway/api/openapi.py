"""`GET /openapi.json`: the OpenAPI 3.1 document of this deployment's REST surface.

Generated, never written by hand: bodies come from the pydantic models that /v1 requests are
validated with (`gateway.api.schemas`), the error bodies from `gateway.errors` (ErrorBody,
V2ErrorBody), the OIP shapes from `gateway.api.v2_schemas`; the bounds that are settings
(deadline ceiling, batch size) and the security of each operation (`auth.*`, through
`required_scope`, the same function the guard asks) come from this process's settings.
Public under auth: it describes the surface, holds no data, and a client needs it before it
has a key. tests/unit/test_openapi.py checks real responses against it;
tests/integration/test_api_fuzz.py runs schemathesis from it against a live gateway.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel, TypeAdapter

from gateway.api import schemas, v2_schemas
from gateway.api.keys import SETTINGS
from gateway.config import Settings
from gateway.errors import ErrorBody, V2ErrorBody
from gateway.security.authn import required_scope

PATH = "/openapi.json"
_REF = "#/components/schemas/{model}"

routes = web.RouteTableDef()


class Healthz(BaseModel):
    status: Literal["ok"]
    pid: int


class Readyz(BaseModel):
    status: Literal["ready"]
    targets: dict[str, bool]


class AdminRoutes(BaseModel):
    routes: dict[str, dict[str, Any]]
    last_reload: dict[str, Any] | None
    shadow: dict[str, Any]
    servers: dict[str, Any]


class StatusView(BaseModel):
    generated_at: float
    pid: int
    routes: list[dict[str, Any]]
    canaries: list[dict[str, Any]]
    servers: Any
    fallback: Any
    drift: dict[str, Any]
    reloads: dict[str, Any]
    audit: dict[str, Any]


@dataclass(frozen=True)
class DocParams:
    """What of the settings the document depends on (hashable: one document per value)."""

    max_deadline_ms: int
    max_batch_items: int
    auth: bool
    protect_metrics: bool
    protect_metadata: bool

    @classmethod
    def of(cls, s: Settings) -> DocParams:
        a = s.auth
        return cls(s.routing.max_deadline_ms, s.server.max_batch_items, a.enabled,
                   a.protect_metrics, a.protect_metadata)  # fmt: skip


@routes.get(PATH)
async def openapi_json(request: web.Request) -> web.Response:
    body = document_bytes(DocParams.of(request.app[SETTINGS]))
    return web.Response(body=body, content_type="application/json")


@functools.cache
def document_bytes(params: DocParams) -> bytes:
    return orjson.dumps(build_document(params))


# (model, mode): request bodies in validation mode, responses as serialized.
_COMPONENTS: list[tuple[Any, Literal["validation", "serialization"]]] = [
    (schemas.PredictBody, "validation"),
    (schemas.BatchBody, "validation"),
    (schemas.FeedbackBody, "validation"),
    (schemas.Prediction, "serialization"),
    (schemas.BatchResponse, "serialization"),
    (schemas.FeedbackResponse, "serialization"),
    (ErrorBody, "serialization"),
    (V2ErrorBody, "serialization"),
    (v2_schemas.InferRequest, "validation"),
    (v2_schemas.InferResponse, "serialization"),
    (v2_schemas.ServerMetadata, "serialization"),
    (v2_schemas.ModelMetadata, "serialization"),
    (Healthz, "serialization"),
    (Readyz, "serialization"),
    (AdminRoutes, "serialization"),
    (StatusView, "serialization"),
]


def components() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tp, mode in _COMPONENTS:
        schema = TypeAdapter(tp).json_schema(ref_template=_REF, mode=mode)
        out.update(schema.pop("$defs", {}))
        out[tp.__name__] = schema
    return out


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _json(name_or_schema: str | dict[str, Any]) -> dict[str, Any]:
    schema = _ref(name_or_schema) if isinstance(name_or_schema, str) else name_or_schema
    return {"application/json": {"schema": schema}}


_REASONS = {
    400: "invalid request", 401: "no key or an unknown key", 403: "the key lacks the scope",
    404: "not found", 408: "the body did not arrive in time", 409: "conflict",
    413: "payload too large", 422: "features do not fit the model",
    429: "this caller is over its rate", 502: "the backend failed",
    503: "no capacity, backend unavailable, or not ready",
    504: "the request's deadline passed",
}  # fmt: skip


def _errors(path: str, statuses: list[int]) -> dict[str, Any]:
    body = "V2ErrorBody" if path.startswith("/v2") else "ErrorBody"
    return {str(s): {"description": _REASONS[s], "content": _json(body)} for s in statuses}


_PARAM = {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"}
_VERSION = {"type": "string", "pattern": "^[1-9][0-9]{0,8}$"}


def _path_params(path: str) -> list[dict[str, Any]]:
    out = []
    if "{model}" in path:
        out.append({"name": "model", "in": "path", "required": True, "schema": _PARAM})
    if "{version}" in path:
        out.append({"name": "version", "in": "path", "required": True, "schema": _VERSION})
    return out


def build_document(p: DocParams) -> dict[str, Any]:
    comps = components()
    # Settings-dependent bounds the models cannot carry.
    deadline = comps["PredictContext"]["properties"]["deadline_ms"]
    for branch in deadline.get("anyOf", [deadline]):
        if branch.get("type") == "number":
            branch["maximum"] = p.max_deadline_ms
    batch_list = {"type": "array", "items": _ref("PredictBody"), "minItems": 1,
                  "maxItems": p.max_batch_items}  # fmt: skip
    comps["BatchBody"]["properties"]["requests"]["maxItems"] = p.max_batch_items
    served = [400, 404, 408, 413, 422, 502, 503, 504]
    ops: dict[str, dict[str, Any]] = {
        "/v1/predict": {
            "post": {
                "summary": "One prediction",
                "requestBody": {"required": True, "content": _json("PredictBody")},
                "responses": {
                    "200": {"description": "the answer", "content": _json("Prediction")},
                    **_errors("/v1", served),
                },
            }
        },
        "/v1/predict:batch": {
            "post": {
                "summary": "Several predictions in one call (a list, or {requests: [...]})",
                "requestBody": {
                    "required": True,
                    "content": _json({"oneOf": [batch_list, _ref("BatchBody")]}),
                },
                "responses": {
                    "200": {
                        "description": "one answer (or error) per item, in order",
                        "content": _json("BatchResponse"),
                    },
                    **_errors("/v1", served),
                },
            }
        },
        "/v1/feedback": {
            "post": {
                "summary": "The ground-truth label for an answered request id (write-once)",
                "requestBody": {"required": True, "content": _json("FeedbackBody")},
                "responses": {
                    "202": {"description": "stored", "content": _json("FeedbackResponse")},
                    "200": {
                        "description": "the same label again",
                        "content": _json("FeedbackResponse"),
                    },
                    **_errors("/v1", [400, 404, 408, 409, 413, 503]),
                },
            }
        },
        "/v2": {"get": _get("Server metadata", "ServerMetadata", "/v2", [502, 503, 504])},
        "/v2/health/live": {"get": _empty("Process up", [200])},
        "/v2/health/ready": {"get": _empty("Every routed primary target ready", [200, 503])},
        "/healthz": {"get": _get("Process up", "Healthz", "/", [])},
        "/readyz": {
            "get": _get("Routes loaded and every primary target ready", "Readyz", "/", [503])
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/admin/routes": {"get": _get("The live route table", "AdminRoutes", "/", [])},
        "/admin/ui.json": {"get": _get("The status page's data", "StatusView", "/", [])},
        "/admin/ui": {
            "get": {
                "summary": "The status page",
                "responses": {
                    "200": {
                        "description": "HTML",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        PATH: {
            "get": {
                "summary": "This document",
                "responses": {
                    "200": {"description": "OpenAPI 3.1", "content": _json({"type": "object"})}
                },
            }
        },
    }
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        ops[base] = {"get": _get("Model metadata", "ModelMetadata", base, [400, 404, 502, 503,
                                                                          504])}  # fmt: skip
        ops[f"{base}/ready"] = {"get": _empty("Model version ready (400: not ready)", [200, 400])}
        ops[f"{base}/config"] = {
            "get": _get("Model configuration", {"type": "object"}, base, [400, 404, 502, 503, 504])
        }
        ops[f"{base}/infer"] = {"post": _infer(base, p)}
    for path, methods in ops.items():
        for op in methods.values():
            params = _path_params(path) + op.pop("_headers", [])
            if params:
                op["parameters"] = params
            op.setdefault("tags", [_tag(path)])
            scope = required_scope(path, p.protect_metrics, p.protect_metadata)
            if p.auth and scope is not None:
                op["security"] = [{"bearer": []}, {"apiKey": []}]
                op["x-required-scope"] = scope
                op["responses"].update(_errors(path, [401, 403, 429]))
            else:
                op["security"] = []
    return {
        "openapi": "3.1.0",
        "info": {"title": "Switchyard gateway", "version": "1",
                 "description": "Errors: {error: {code, message, details?, request_id}} "
                                "(/v2: {error, code}); 429: this caller is over its rate, "
                                "503: the gateway has no capacity."},
        "paths": ops,
        "components": {
            "schemas": comps,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
    }  # fmt: skip


def _tag(path: str) -> str:
    for prefix, tag in (("/v1", "v1"), ("/v2", "v2"), ("/admin", "admin")):
        if path.startswith(prefix):
            return tag
    return "health"


def _get(summary: str, body: str | dict[str, Any], path: str, errs: list[int]) -> dict[str, Any]:
    return {
        "summary": summary,
        "responses": {"200": {"description": "ok", "content": _json(body)}, **_errors(path, errs)},
    }


def _empty(summary: str, statuses: list[int]) -> dict[str, Any]:
    return {"summary": summary, "responses": {str(s): {"description": "no body"}
                                              for s in statuses}}  # fmt: skip


def _infer(path: str, p: DocParams) -> dict[str, Any]:
    deadline = {"type": "number", "exclusiveMinimum": 0, "maximum": p.max_deadline_ms}
    return {
        "summary": "OIP inference, JSON form (Triton's binary-tensor extension is accepted too)",
        "_headers": [
            {"name": "X-Deadline-Ms", "in": "header", "required": False, "schema": deadline},
        ],
        "requestBody": {"required": True, "content": _json("InferRequest")},
        "responses": {
            "200": {"description": "outputs", "content": _json("InferResponse")},
            **_errors(path, [400, 404, 408, 413, 422, 502, 503, 504]),
        },
    }
