"""Running one gateway process: the event loop, the GC settings, aiohttp's runner.

Kept apart from the composition root (`gateway.app`, which only builds) and from the worker
supervisor (`gateway.workers`, which imports this module): the CLI picks one or the other,
so nothing imports in a circle.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
from collections.abc import Callable

import structlog
from aiohttp import web

from gateway.api.grpc_server import grpc_serving
from gateway.api.middleware import GatewayProtocol
from gateway.app import build_app
from gateway.config import ServerSettings, Settings
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


def rest_listener(server: ServerSettings) -> socket.socket:
    """The REST listening socket that `serve --workers` binds once, in the supervisor, and
    hands to every worker. One socket, one accept queue: a worker that stops (a SIGHUP
    reload, a crash) leaves the connections queued on it to the others. With a socket per
    worker (SO_REUSEPORT) the kernel resets the connections still queued on the one that
    closes, which a rolling reload met as a failed request now and then."""
    family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
    return socket.create_server(
        (server.host, server.port), family=family, backlog=server.backlog, reuse_port=False
    )


class _Server(web.Server):
    """aiohttp's Server, its connections served by GatewayProtocol. Its __call__ is the
    protocol factory the sites hand the event loop; aiohttp 3.14 names RequestHandler there
    and has no setting for another class."""

    def __call__(self) -> web.RequestHandler:
        return GatewayProtocol(self, loop=self._loop, **self._kwargs)


class _AppRunner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # the app's startup, then aiohttp's Server
        # Made by the app (Application._make_handler), not by us: re-class it rather than
        # copy its construction. _Server adds no state, only its __call__.
        server.__class__ = _Server
        return server


def app_runner(
    app: web.Application,
    server: ServerSettings,
    keepalive_timeout_s: float | None = None,
) -> web.AppRunner:
    """The runner serve_one serves ``app`` with (tests start it on a port of their own)."""
    return _AppRunner(
        app,
        handle_signals=False,  # serve_one: stop accepting, let the accepted speak, then drain
        access_log=None,
        shutdown_timeout=server.shutdown_timeout_s,
        # A client that disconnects cancels its handler, and with it the Triton call and
        # its admission slot (aiohttp leaves handlers running by default).
        handler_cancellation=True,
        # Request line, header field and header count limits of aiohttp's parser (what it
        # refuses, GatewayProtocol answers); the body deadline and the connection cap are
        # middlewares (gateway/api/limits.py).
        max_line_size=server.max_line_bytes,
        max_field_size=server.max_header_bytes,
        max_headers=server.max_headers,
        # Idle connections, and ones whose request head has not arrived, close after this
        # (gateway/api/limits.py): aiohttp's default kept them an hour.
        keepalive_timeout=(
            server.keepalive_timeout_s if keepalive_timeout_s is None else keepalive_timeout_s
        ),
    )


def serve_one(
    settings: Settings,
    reuse_port: bool = False,
    on_listening: Callable[[], object] | None = None,
    sock: socket.socket | None = None,
) -> None:
    """One gateway process on a uvloop event loop; ``on_listening`` runs once it accepts.

    ``sock``: serve REST on this listening socket (a worker's share of the supervisor's)
    instead of binding server.host/port; ``reuse_port`` then concerns the gRPC port only."""
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

    def listening() -> None:
        log.info(
            "listening",
            host=settings.server.host,
            port=settings.server.port,
            tls=ssl_context is not None,
            pid=os.getpid(),
        )
        if on_listening is not None:
            on_listening()

    async def serve() -> None:
        runner = app_runner(await make_app(), settings.server)
        await runner.setup()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        try:
            site: web.BaseSite = (
                web.SockSite(runner, sock, ssl_context=ssl_context)
                if sock is not None
                else web.TCPSite(
                    runner,
                    settings.server.host,
                    settings.server.port,
                    ssl_context=ssl_context,
                    backlog=settings.server.backlog,
                    reuse_port=reuse_port or None,
                )
            )
            await site.start()
            listening()
            await stop.wait()
            # aiohttp's own shutdown closes the listener and, one loop turn later, every
            # connection without a request in progress: a client whose connection was just
            # accepted, its request still on the way, got a reset (a rolling reload under
            # load lost requests). Stop accepting first; give the accepted connections
            # server.drain_grace_s to deliver their request, which then counts as in flight
            # and is answered within shutdown_timeout_s.
            await site.stop()
            await asyncio.sleep(settings.server.drain_grace_s)
        finally:
            await runner.cleanup()

    ssl_context = rest_ssl_context(settings.server)  # TLS settings wrong: fail before binding
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(serve())
    finally:
        _cancel_remaining(loop)
        loop.run_until_complete(loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        loop.close()


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    """As web.run_app does on exit: cancel what is left and let it finish cancelling."""
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
