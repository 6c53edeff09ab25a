"""The composition root: Settings -> a wired aiohttp application. Nothing else builds objects
that live as long as the app; modules receive what they need from here."""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import AsyncIterator, Callable

import structlog
from aiohttp import web

from gateway.api import admin, feedback, oip
from gateway.api import routes as v1
from gateway.api.grpc_server import grpc_serving
from gateway.api.keys import METRICS, SERVICE, SETTINGS
from gateway.api.middleware import request_context
from gateway.backends.base import Backend
from gateway.backends.pool import BackendPool, PoolMember
from gateway.backends.triton import TritonBackend
from gateway.catalog import ModelCatalog
from gateway.clock import Clock, monotonic
from gateway.config import Settings
from gateway.log import configure_logging
from gateway.metrics import MULTIPROC_ENV, Metrics
from gateway.observability import build_observability
from gateway.resilience.cache import PredictionCache
from gateway.resilience.fallback import FallbackLadder
from gateway.routing.readiness import VersionGate
from gateway.routing.reload import RouteReloader
from gateway.routing.shadow import ShadowDispatcher
from gateway.routing.table import RouteTableRef, load_route_table
from gateway.service import InferenceService

log = structlog.get_logger(__name__)


def build_app(
    settings: Settings, backend: Backend | None = None, clock: Clock = monotonic
) -> web.Application:
    """Wire every component from settings. Tests pass a FakeBackend and a fake clock."""
    metrics = Metrics(multiprocess_dir=os.environ.get(MULTIPROC_ENV))
    catalog = ModelCatalog.load(settings.routing.model_repository)
    table = load_route_table(settings.routing.routes_dir, catalog)
    pool = build_pool(settings, metrics, clock) if backend is None else None
    if isinstance(backend, BackendPool) and backend.metrics is None:
        backend.metrics = metrics  # a pool built by a test reports into this app's registry
    backend = backend or pool
    assert backend is not None
    obs = build_observability(settings, metrics, clock)  # Redis, prediction log, features
    r = settings.routing
    shadow = ShadowDispatcher(
        backend,
        catalog,
        metrics,
        max_in_flight=r.shadow_max_in_flight,
        timeout_s=r.shadow_timeout_s,
    )
    service = InferenceService(
        routes=RouteTableRef(table),
        catalog=catalog,
        backend=backend,
        predlog=obs.predlog,
        features=obs.features,
        log_policies=obs.policies,
        metrics=metrics,
        default_deadline_ms=settings.routing.default_deadline_ms,
        max_deadline_ms=settings.routing.max_deadline_ms,
        control_timeout_s=settings.triton.control_timeout_s,
        clock=clock,
        shadow=shadow,
        batching=settings.batching,
    )
    res = settings.resilience
    cache = PredictionCache(
        max_entries=res.cache_max_entries,
        redis_url=settings.redis.url,
        redis_timeout_s=res.cache_redis_timeout_s,
        clock=clock,
    )
    service.fallback = FallbackLadder(
        backend=backend,
        catalog=lambda: service.catalog,
        cache=cache,
        metrics=metrics,
        policy=res.fallback,
        clock=clock,
    )
    reloader = _route_reloader(settings, service, shadow, metrics)

    app = web.Application(
        middlewares=[request_context], client_max_size=settings.server.max_body_bytes
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[SERVICE] = service
    app.add_routes(v1.routes)
    app.add_routes(oip.routes)
    app.add_routes(admin.routes)
    app.add_routes(feedback.routes)
    if obs.labels is not None:
        app[feedback.LABELS] = obs.labels
    app[admin.RELOADER] = reloader
    if isinstance(backend, BackendPool):
        app[admin.POOL] = backend

    async def predlog_ctx(_: web.Application) -> AsyncIterator[None]:
        await obs.start()
        yield
        await obs.close()  # flushes the prediction log

    async def backend_ctx(_: web.Application) -> AsyncIterator[None]:
        yield
        if service.coalescer is not None:
            await service.coalescer.close()
        await backend.close()

    async def routing_ctx(_: web.Application) -> AsyncIterator[None]:
        await reloader.start(sighup=settings.routing.reload_on_sighup)
        yield
        await reloader.stop()
        await shadow.close()  # before the backend closes under the copies in flight

    async def resilience_ctx(_: web.Application) -> AsyncIterator[None]:
        # Health checks, the fallback models' warm-up probe, batched cache writes to Redis.
        t = settings.triton
        assert service.fallback is not None
        jobs = [
            service.fallback.run_warmer(service.routes, t.control_timeout_s),
            cache.run_flusher(),
        ]
        if pool is not None:
            jobs.append(pool.run_health_checks(t.health_interval_s, t.health_timeout_s))
        tasks = [asyncio.create_task(job) for job in jobs]
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await cache.close()

    app.cleanup_ctx.extend([predlog_ctx, backend_ctx, routing_ctx, resilience_ctx])
    log.info("app_built", routes=sorted(table.routes), triton=settings.triton.grpc_url)
    return app


def build_pool(settings: Settings, metrics: Metrics, clock: Clock = monotonic) -> BackendPool:
    """The configured Triton servers as one Backend with breakers, retries and admission."""
    res = settings.resilience
    members = [
        PoolMember(spec.name, TritonBackend(spec.grpc_url, name=spec.name), frozenset(spec.models))
        for spec in settings.triton.server_specs()
    ]
    return BackendPool(
        members,
        breaker_policy=res.breaker,
        retry_policy=res.retry,
        admission=res.admission,
        metrics=metrics,
        clock=clock,
    )


def _route_reloader(
    settings: Settings, service: InferenceService, shadow: ShadowDispatcher, metrics: Metrics
) -> RouteReloader:
    """Hot reload of routes: the catalog is re-read too, so a new version's manifest counts."""
    r = settings.routing

    def use_catalog(catalog: ModelCatalog) -> None:
        service.catalog = shadow.catalog = catalog

    gate = VersionGate(
        service.backend,
        load_versions=r.load_versions,
        timeout_s=r.readiness_timeout_s,
        control_timeout_s=settings.triton.control_timeout_s,
    )
    return RouteReloader(
        r.routes_dir,
        service.routes,
        gate,
        metrics,
        load_catalog=lambda: ModelCatalog.load(r.model_repository),
        on_catalog=use_catalog,
        interval_s=r.reload_interval_s,
    )


def serve(settings: Settings, workers: int = 1) -> int:
    """Run the gateway until SIGINT/SIGTERM (blocking); ``workers`` > 1 supervises that many
    processes sharing the port (gateway.workers). Returns the exit status."""
    if workers > 1:
        from gateway.workers import Supervisor

        configure_logging(settings.log.level, settings.log.json)
        return Supervisor(settings, workers).run()
    serve_one(settings)
    return 0


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
        log.info("listening", host=settings.server.host, port=settings.server.port, pid=os.getpid())
        if on_listening is not None:
            on_listening()

    web.run_app(
        make_app(),
        host=settings.server.host,
        port=settings.server.port,
        access_log=None,
        shutdown_timeout=settings.server.shutdown_timeout_s,
        reuse_port=reuse_port or None,
        print=listening,
        loop=loop,
    )
