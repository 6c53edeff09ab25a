"""Bounds on a request beyond its size: how deeply its JSON nests, how slowly its body may
arrive (slowloris), and how many connections one process serves.

Body: a client that sends its headers and then trickles the body would hold a connection
and a handler for as long as it likes; `body_deadline` reads the whole body within
`server.body_read_timeout_s` (the handler then reads it from memory), else 408
`request_timeout` and the connection closes. Connections: aiohttp accepts every connection;
`connection_gate` answers a request arriving on a connection past `server.max_connections`
(counted in accept order) with 503 `overloaded` and closes it, so the first N keep working.

orjson refuses nesting past 1024 levels; our bodies need a handful (a batch of predict bodies
with a context is 4). Deep nesting costs every later walk over the value (validation, the
prediction log's copy), so bodies nesting past `server.max_json_depth` get 400
`json_too_deep`. The check is cheap where it matters: a body with fewer brackets than the
limit cannot nest past it, and is never walked (one C-speed count per bracket kind);
only bodies with more brackets are walked, and the walk visits containers only where it must.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.errors import ClientError, Overloaded, PayloadTooLarge, RequestTimeout

#: Paths a connection past the cap may still call: probes must not fail under a flood.
_PROBES = frozenset({"/healthz", "/readyz"})


def json_depth_exceeds(value: Any, max_depth: int) -> bool:
    """Whether ``value`` (parsed JSON) nests lists/objects more than ``max_depth`` deep."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            return True
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


def check_depth(raw: bytes, value: Any, max_depth: int) -> None:
    """Raise 400 json_too_deep when the parsed ``value`` of ``raw`` nests past ``max_depth``."""
    if not isinstance(value, dict | list) or max_depth <= 0:
        return
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return  # fewer openers than the limit: cannot nest deeper (brackets in strings only add)
    if json_depth_exceeds(value, max_depth):
        raise ClientError(
            f"JSON nests deeper than {max_depth} levels",
            code="json_too_deep",
            details={"limit": max_depth},
        )


def body_deadline(timeout_s: float, max_bytes: int) -> Middleware:
    """Read a request's body within ``timeout_s`` of its headers, before the handler."""

    @web.middleware
    async def read_body(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.body_exists and timeout_s > 0:
            if request.content_length is not None and request.content_length > max_bytes:
                raise PayloadTooLarge(
                    f"body of {request.content_length} bytes exceeds the limit of {max_bytes}",
                    details={"limit": max_bytes},
                )
            try:
                async with asyncio.timeout(timeout_s):
                    await request.read()  # cached: the handler's read() returns it
            except TimeoutError:
                request.protocol.force_close()  # the rest of the body is never read
                raise RequestTimeout(
                    f"the body did not arrive within {timeout_s} s of the headers",
                    details={"limit_s": timeout_s},
                ) from None
        return await handler(request)

    return read_body


def connection_gate(max_connections: int) -> Middleware:
    """503 (and close) for requests on connections accepted after the first ``max_connections``
    still open. Cheap while under the cap: one len() of aiohttp's connection list."""

    @web.middleware
    async def gate(request: web.Request, handler: Handler) -> web.StreamResponse:
        # aiohttp keeps its open connections, in accept order, on the handler's server.
        connections = getattr(getattr(request.protocol, "_manager", None), "connections", ())
        if (
            max_connections > 0
            and len(connections) > max_connections
            and request.path not in _PROBES
            and _position(connections, request.protocol) >= max_connections
        ):
            request.protocol.force_close()
            raise Overloaded(
                f"this process serves at most {max_connections} connections",
                retry_after_s=1,
                details={"limit": max_connections},
            )
        return await handler(request)

    return gate


def _position(connections: Any, protocol: object) -> int:
    for i, conn in enumerate(connections):
        if conn is protocol:
            return i
    return len(connections)
