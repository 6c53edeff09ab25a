"""The composition root: Settings -> a wired aiohttp application. Nothing else builds objects
that live as long as the app; modules receive what they need from here."""

from __future__ import annotations

from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from gateway.api import oip
from gateway.api import routes as v1
from gateway.api.keys import METRICS, SERVICE, SETTINGS
from gateway.api.middleware import request_context
from gateway.backends.base import Backend
from gateway.backends.triton import TritonBackend
from gateway.catalog import ModelCatalog
from gateway.clock import Clock, monotonic
from gateway.config import Settings
from gateway.log import configure_logging
from gateway.metrics import Metrics
from gateway.predlog.spool import SpoolLog
from gateway.routing.table import RouteTableRef, load_route_table
from gateway.service import InferenceService

log = structlog.get_logger(__name__)


def build_app(
    settings: Settings, backend: Backend | None = None, clock: Clock = monotonic
) -> web.Application:
    """Wire every component from settings. Tests pass a FakeBackend and a fake clock."""
    metrics = Metrics()
    catalog = ModelCatalog.load(settings.routing.model_repository)
    table = load_route_table(settings.routing.routes_dir, catalog)
    backend = backend or TritonBackend(settings.triton.grpc_url, name="triton")
    p = settings.predlog
    spool = SpoolLog(p.spool_dir, metrics, p.buffer_size, p.flush_interval_s, p.fsync)
    service = InferenceService(
        routes=RouteTableRef(table),
        catalog=catalog,
        backend=backend,
        predlog=spool,
        metrics=metrics,
        default_deadline_ms=settings.routing.default_deadline_ms,
        max_deadline_ms=settings.routing.max_deadline_ms,
        control_timeout_s=settings.triton.control_timeout_s,
        clock=clock,
    )

    app = web.Application(
        middlewares=[request_context], client_max_size=settings.server.max_body_bytes
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[SERVICE] = service
    app.add_routes(v1.routes)
    app.add_routes(oip.routes)

    async def predlog_ctx(_: web.Application) -> AsyncIterator[None]:
        await spool.start()
        yield
        await spool.close()

    async def backend_ctx(_: web.Application) -> AsyncIterator[None]:
        yield
        await backend.close()

    app.cleanup_ctx.extend([predlog_ctx, backend_ctx])
    log.info("app_built", routes=sorted(table.routes), triton=settings.triton.grpc_url)
    return app


def serve(settings: Settings) -> None:
    """Run the gateway until SIGINT/SIGTERM (blocking)."""
    configure_logging(settings.log.level, settings.log.json)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass

    async def make_app() -> web.Application:
        return build_app(settings)  # inside the loop: grpc.aio channels bind to it

    web.run_app(
        make_app(),
        host=settings.server.host,
        port=settings.server.port,
        access_log=None,
        shutdown_timeout=settings.server.shutdown_timeout_s,
        print=lambda msg: log.info(
            "listening", host=settings.server.host, port=settings.server.port
        ),
    )
