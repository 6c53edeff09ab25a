"""Running one gateway process: the event loop, the GC settings, aiohttp's runner.

Kept apart from the composition root (`gateway.app`, which only builds) and from the worker
supervisor (`gateway.workers`, which imports this module): the CLI picks one or the other,
so nothing imports in a circle.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Callable

import structlog
from aiohttp import web

from gateway.api.grpc_server import grpc_serving
from gateway.app import build_app
from gateway.config import Settings
from gateway.log import configure_logging
from gateway.tls import rest_ssl_context

log = structlog.get_logger(__name__)


#: Allocations between young-generation collections (CPython's default is 700). A /v1
#: request allocates a few hundred objects, so the default collects every 2-3 requests.
GC_GEN0_THRESHOLD = 10_000


def tune_gc() -> None:
    """Once the app is built: move what startup allocated (modules, catalog, routes) out of
    the collector's reach, and collect young objects less often. Measured in-process on
    /v1/predict: garbage collection ~50 -> ~12 us of CPU per request (docs/benchmarks.md)."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def serve_one(
    settings: Settings, reuse_port: bool = False, on_listening: Callable[[], object] | None = None
) -> None:
    """One gateway process on a uvloop event loop; ``on_listening`` runs once it accepts."""
    configure_logging(settings.log.level, settings.log.json)
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop = asyncio.new_event_loop()

    async def make_app() -> web.Application:
        app = build_app(settings)  # inside the loop: grpc.aio channels bind to it
        # The OIP gRPC front door (server.grpc_port), last: it starts after, and stops
        # before, everything it calls into.
        app.cleanup_ctx.append(grpc_serving(settings, reuse_port=reuse_port))
        tune_gc()
        return app

    def listening(_: str) -> None:
        log.info(
            "listening",
            host=settings.server.host,
            port=settings.server.port,
            tls=ssl_context is not None,
            pid=os.getpid(),
        )
        if on_listening is not None:
            on_listening()

    ssl_context = rest_ssl_context(settings.server)  # TLS settings wrong: fail before binding
    web.run_app(
        make_app(),
        host=settings.server.host,
        port=settings.server.port,
        ssl_context=ssl_context,
        access_log=None,
        shutdown_timeout=settings.server.shutdown_timeout_s,
        reuse_port=reuse_port or None,
        # A client that disconnects cancels its handler, and with it the Triton call and its
        # admission slot (aiohttp leaves handlers running by default).
        handler_cancellation=True,
        # Request line, header field and header count limits of aiohttp's parser; the body
        # deadline and the connection cap are middlewares (gateway/api/limits.py).
        backlog=settings.server.backlog,
        max_line_size=settings.server.max_line_bytes,
        max_field_size=settings.server.max_header_bytes,
        max_headers=settings.server.max_headers,
        print=listening,
        loop=loop,
    )
