"""The one place errors become responses, and the one access-log line per request (errors
and slow requests always; fast successes within `log.access`'s budget).

Requests aiohttp's parser refuses never reach a middleware: aiohttp answers them itself, in
`RequestHandler.handle_error`. `GatewayProtocol` (the protocol `gateway.serving` serves with)
answers them here too, in the same JSON shape: 431 `header_too_large` past the request line,
header field or header count limits (server.max_line_bytes, max_header_bytes, max_headers),
else 400 `bad_request`. aiohttp's own answer quoted the offending bytes back and logged them
at ERROR with a traceback (a key read from a CRLF file, its header line ending in a stray CR,
went whole to stderr); ours repeats nothing, and logs one line without the exception.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.typedefs import Middleware

from gateway import errors
from gateway.access_log import AccessLogPolicy, AccessSampler
from gateway.api.keys import LOG_FIELDS, REQUEST_ID, TRACING
from gateway.request_ids import RequestIds, is_client_request_id

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
        sent = request.headers.get(REQUEST_ID_HEADER)
        # The id is echoed in a header and in JSON bodies and logs: an id that is not visible
        # ASCII (header bytes that are not UTF-8 arrive as lone surrogates, which orjson
        # refuses) crashed the error mapper itself. Such an id gets a fresh one instead, and
        # the access line says so.
        request[LOG_FIELDS] = {}
        if sent and is_client_request_id(sent):
            request_id = sent
        else:
            request_id = new_id()
            if sent:
                request[LOG_FIELDS]["request_id_replaced"] = True
        request[REQUEST_ID] = request_id
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


class GatewayProtocol(web.RequestHandler):
    """aiohttp's HTTP protocol, answering what it answers itself (requests its parser
    refuses, a failure that escapes every middleware) as `request_context` answers errors."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's message and its exception's text quote the request's bytes: never used.
        if request.writer.output_size > 0:  # as aiohttp: too late for another answer
            raise ConnectionError("a response is under way; cannot answer with an error")
        if isinstance(exc, HttpProcessingError):
            error = self._parser_error(exc)
            # A TLS hello or a scanner's probe on the plaintext port: expected on a public
            # port, so not a warning each (aiohttp logs these at debug too).
            report = log.debug if isinstance(exc, BadHttpMethod) else log.warning
            report(
                "bad_http_request",
                status=error.status,
                code=error.code,
                error=type(exc).__name__,
                peer=request.remote,
            )
        else:
            error = (
                errors.DeadlineExceeded("the request timed out")
                if status == 504
                else errors.SwitchyardError("internal error")
            )
            log.error("unhandled_error", exc_info=exc)  # our own fault: its traceback
        response = json_response(error.to_dict(None), error.status)
        response.force_close()
        return response

    def _parser_error(self, exc: HttpProcessingError) -> errors.SwitchyardError:
        # "Too many headers received" has no class of its own in aiohttp.
        if isinstance(exc, LineTooLong) or exc.message == "Too many headers received":
            return errors.HeaderTooLarge(
                "the request line or a header is too long, or there are too many headers",
                details={
                    "max_line_bytes": self.max_line_size,
                    "max_header_bytes": self.max_field_size,
                    "max_headers": self.max_headers,
                },
            )
        return errors.BadRequest("malformed HTTP request")


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
