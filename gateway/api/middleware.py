"""The one place errors become responses, and the one access-log line per request (errors
and slow requests always; fast successes within `log.access`'s budget)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway import errors
from gateway.access_log import AccessLogPolicy, AccessSampler
from gateway.api.keys import LOG_FIELDS, REQUEST_ID, TRACING
from gateway.request_ids import RequestIds

log = structlog.get_logger("gateway.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

REQUEST_ID_HEADER = "X-Request-ID"

_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def _error_response(request: web.Request, exc: errors.SwitchyardError) -> web.Response:
    request_id = request.get(REQUEST_ID)
    headers = {REQUEST_ID_HEADER: request_id} if request_id else {}
    headers.update(exc.headers())  # Retry-After, WWW-Authenticate, X-RateLimit-*
    if request.path.startswith("/v2"):
        # KServe v2 / Triton clients read a string under "error"; the code rides alongside.
        body: dict[str, Any] = {"error": exc.message, "code": exc.code}
    else:
        body = dict(exc.to_dict(request_id))
    return json_response(body, exc.status, headers)


def request_context(
    access: AccessSampler | None = None, ids: Callable[[], str] | None = None
) -> Middleware:
    """The middleware that binds the request id, times the request, maps every failure to a
    JSON error and writes the access line (every line, or as `access` samples them)."""
    sampler = access or AccessSampler(AccessLogPolicy())
    new_id = ids or RequestIds()

    @web.middleware
    async def context(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = request.headers.get(REQUEST_ID_HEADER) or new_id()
        request[REQUEST_ID] = request_id
        request[LOG_FIELDS] = {}
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            response.headers.setdefault(REQUEST_ID_HEADER, request[REQUEST_ID])
            return response
        except errors.SwitchyardError as exc:
            status = exc.status
            request[LOG_FIELDS]["error"] = exc.code
            return _error_response(request, exc)
        except web.HTTPException as exc:
            status = exc.status
            if exc.status < 400:
                raise
            code = _HTTP_CODES.get(exc.status, "http_error")
            mapped = errors.SwitchyardError(exc.reason, code=code)
            mapped.status = exc.status  # type: ignore[misc]
            request[LOG_FIELDS]["error"] = code
            return _error_response(request, mapped)
        except Exception:
            log.exception("unhandled_error", path=request.path)
            request[LOG_FIELDS]["error"] = "internal_error"
            return _error_response(request, errors.SwitchyardError("internal error"))
        finally:
            latency_ms = (time.perf_counter() - started) * 1000
            if request.path not in _UNLOGGED and sampler.keep(status, latency_ms):
                log.info(
                    "request",
                    method=request.method,
                    path=request.path,
                    status=status,
                    latency_ms=round(latency_ms, 3),
                    **request[LOG_FIELDS],
                )

    return context


#: Probes and scrapes: frequent, and counted elsewhere; never an access line.
_UNLOGGED = frozenset(("/metrics", "/healthz"))


#: Paths whose requests get a span: the prediction APIs (not probes, metrics, admin).
_TRACED_PATHS = ("/v1/", "/v2/")


@web.middleware
async def trace_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The adapter's span, a child of the caller's W3C ``traceparent`` when it sent one.
    Installed (outermost) only when tracing is on: off, requests never pass through here."""
    tracing = request.app[TRACING]
    if tracing is None or not request.path.startswith(_TRACED_PATHS):
        return await handler(request)
    resource = request.match_info.route.resource
    name = f"{request.method} {resource.canonical if resource is not None else request.path}"
    headers = request.headers
    with tracing.server_span(
        name, headers.get("traceparent"), headers.get("tracestate"), {"http.route": name}
    ) as span:
        response = await handler(request)
        span.set_attribute("http.response.status_code", response.status)
        return response
