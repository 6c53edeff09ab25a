"""The composition root: Settings -> a wired aiohttp application. Nothing else builds objects
that live as long as the app; modules receive what they need from here."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import numpy as np
import structlog
from aiohttp import web

from gateway.access_log import AccessSampler
from gateway.api import admin, feedback, oip, openapi, ui
from gateway.api import routes as v1
from gateway.api.keys import METRICS, SERVICE, SETTINGS, TRACING
from gateway.api.limits import body_deadline, connection_gate
from gateway.api.middleware import request_context, trace_requests
from gateway.api.status import AUDIT
from gateway.audit import AuditFeed
from gateway.backends.base import Backend
from gateway.backends.discovery import DnsDiscovery, DnsSource, ServersFile
from gateway.backends.pool import BackendPool, PoolMember
from gateway.backends.triton import TritonBackend
from gateway.batching import Coalescer, InferLayer
from gateway.catalog import ModelCatalog
from gateway.clock import Clock, monotonic
from gateway.config import Settings, TelemetrySettings
from gateway.drift.exporter import build_drift
from gateway.metrics import MULTIPROC_ENV, Metrics
from gateway.observability import build_observability
from gateway.redis_conn import redis_options
from gateway.registry.report import ValidationGate
from gateway.resilience.cache import PredictionCache
from gateway.resilience.fallback import FallbackLadder
from gateway.routing.readiness import VersionGate
from gateway.routing.reload import RouteReloader, fingerprint
from gateway.routing.shadow import ShadowDispatcher
from gateway.routing.table import RouteTable, RouteTableRef, load_route_table
from gateway.security.rest import GUARD
from gateway.security.secrets import sticky_secret
from gateway.security.wiring import build_security
from gateway.service import InferenceService
from gateway.tls import triton_channel_credentials
from gateway.tracing import TracedLayer, Tracing
from gateway.types import InferRequest

log = structlog.get_logger(__name__)


def build_app(
    settings: Settings,
    backend: Backend | None = None,
    clock: Clock = monotonic,
    tracing: Tracing | None = None,
) -> web.Application:
    """Wire every component from settings. Tests pass a FakeBackend, a fake clock, and a
    Tracing with an in-memory exporter."""
    metrics = Metrics(multiprocess_dir=os.environ.get(MULTIPROC_ENV))
    catalog = ModelCatalog.load(settings.routing.model_repository)
    # Before the load: an edit between the two then reads as a change (one extra reload)
    # rather than as already seen (never applied); see RouteReloader's `seen`.
    seen_routes = fingerprint(settings.routing.routes_dir)
    table = load_route_table(settings.routing.routes_dir, catalog, sticky_secret(settings))
    if settings.routing.require_validation:  # the startup table passes the reloads' gate too
        ValidationGate(settings.routing.model_repository).require(table.targets())
    tracing = tracing or build_tracing(settings.telemetry)  # None: off, no spans anywhere
    pool = build_pool(settings, metrics, clock, tracing) if backend is None else None
    if isinstance(backend, BackendPool) and backend.metrics is None:
        backend.metrics = metrics  # a pool built by a test reports into this app's registry
    backend = backend or pool
    assert backend is not None
    obs = build_observability(settings, metrics, clock)  # Redis, prediction log, features
    r, res = settings.routing, settings.resilience
    routes = RouteTableRef(table)
    shadow = ShadowDispatcher(
        backend,
        lambda: routes.current.catalog,
        metrics,
        max_in_flight=r.shadow_max_in_flight,
        timeout_s=r.shadow_timeout_s,
    )
    cache = PredictionCache(
        max_entries=res.cache_max_entries,
        redis_url=settings.redis.url,
        redis_options=redis_options(settings.redis),
        redis_timeout_s=res.cache_redis_timeout_s,
        redis_cluster=settings.redis.cluster,
        clock=clock,
    )
    # The request path, bottom up: pool (admission, breaker, retry) <- coalescer <- ladder;
    # with tracing on, each layer is wrapped in its span.
    coalescer = Coalescer(settings.batching, _traced(backend, tracing, "pool"))
    ladder = FallbackLadder(
        inner=_traced(coalescer, tracing, "coalesce"),
        cache=cache,
        metrics=metrics,
        policy=res.fallback,
        clock=clock,
    )
    ladder.tracing = shadow.tracing = tracing
    service = InferenceService(
        routes=routes,
        stack=_traced(ladder, tracing, "fallback"),
        backend=backend,
        predlog=obs.predlog,
        features=obs.features,
        log_policies=obs.policies,
        metrics=metrics,
        default_deadline_ms=r.default_deadline_ms,
        max_deadline_ms=r.max_deadline_ms,
        slo_deadline_factor=r.slo_deadline_factor,
        control_timeout_s=settings.triton.control_timeout_s,
        clock=clock,
        shadow=shadow,
    )
    service.tracing = tracing
    reloader = _route_reloader(settings, service, metrics, seen_routes)
    drift = build_drift(settings, metrics, clock)
    service.drift = drift.tracker if drift is not None else None

    security = build_security(settings, metrics.registry)  # API keys, scopes, rate limits
    traced = [trace_requests] if tracing is not None else []  # off: not even a pass-through
    server = settings.server
    app = web.Application(
        # Cheap refusals first: the connection cap, then the key; bodies are read (within
        # their deadline) only for callers that may call.
        middlewares=[
            *traced,
            request_context(AccessSampler(settings.log.access, clock, metrics.access_skipped)),
            connection_gate(server.max_connections),
            *security.middlewares,
            body_deadline(server.body_read_timeout_s, server.max_body_bytes),
        ],
        client_max_size=settings.server.max_body_bytes,
    )
    app[GUARD] = security.guard  # the gRPC server admits calls through the same guard
    app.cleanup_ctx.append(security.ctx)
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[SERVICE] = service
    app[TRACING] = tracing
    app.add_routes(v1.routes)
    app.add_routes(oip.routes)
    app.add_routes(admin.routes)
    app.add_routes(feedback.routes)
    app.add_routes(ui.routes)
    app.add_routes(openapi.routes)
    if obs.labels is not None:
        app[feedback.LABELS] = obs.labels
    app[admin.RELOADER] = reloader
    if settings.audit.enabled:  # the status page's audit section (gateway/audit.py)
        app[AUDIT] = audit_feed = AuditFeed(settings)
        app.cleanup_ctx.append(audit_feed.ctx)
    if isinstance(backend, BackendPool):
        app[admin.POOL] = backend

    async def predlog_ctx(_: web.Application) -> AsyncIterator[None]:
        await obs.start()
        yield
        await obs.close()  # flushes the prediction log

    async def backend_ctx(_: web.Application) -> AsyncIterator[None]:
        yield
        await coalescer.close()
        await backend.close()

    async def routing_ctx(_: web.Application) -> AsyncIterator[None]:
        await reloader.start(sighup=settings.routing.reload_on_sighup)
        yield
        await reloader.stop()
        await shadow.close()  # before the backend closes under the copies in flight

    async def resilience_ctx(_: web.Application) -> AsyncIterator[None]:
        # Health checks, the fallback models' warm-up probe, batched cache writes to Redis.
        t = settings.triton
        jobs = [
            ladder.run_warmer(lambda: fallback_probes(routes.current), t.control_timeout_s),
            cache.run_flusher(),
        ]
        if pool is not None:
            jobs.append(pool.run_health_checks(t.health_interval_s, t.health_timeout_s))
            jobs.extend(pool_jobs(settings, pool))
        tasks = [asyncio.create_task(job) for job in jobs]
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await cache.close()

    async def tracing_ctx(_: web.Application) -> AsyncIterator[None]:
        yield
        if tracing is not None:
            await asyncio.to_thread(tracing.shutdown)  # exports the spans still queued

    app.cleanup_ctx.extend([tracing_ctx, predlog_ctx, backend_ctx, routing_ctx, resilience_ctx])
    if drift is not None:
        app.cleanup_ctx.append(drift.ctx)
    log.info("app_built", routes=sorted(table.routes), triton=settings.triton.grpc_url)
    return app


def build_pool(
    settings: Settings, metrics: Metrics, clock: Clock = monotonic, tracing: Tracing | None = None
) -> BackendPool:
    """The configured Triton servers as one Backend with breakers, retries and admission;
    `dns:` servers join later, from `pool_jobs`."""
    res, t = settings.resilience, settings.triton
    tls = triton_channel_credentials(t)
    default_metrics = t.metrics_url if not t.servers else ""
    members = [
        PoolMember(
            spec.name,
            TritonBackend(
                spec.grpc_url,
                spec.name,
                tls,
                t.tls_server_name,
                max_channel_age_s=t.max_channel_age_s,
                tracing=tracing,
                http_url=t.infer_http_url(spec),
            ),
            frozenset(spec.models),
            metrics_url=spec.metrics_url or default_metrics,
        )
        for spec in t.server_specs()
        if not spec.dns
    ]
    return BackendPool(
        members,
        breaker_policy=res.breaker,
        retry_policy=res.retry,
        admission=res.admission,
        metrics=metrics,
        clock=clock,
        routing=t.routing,
        allow_empty=t.servers_file is not None or any(spec.dns for spec in t.server_specs()),
    )


def pool_jobs(settings: Settings, pool: BackendPool) -> list[Coroutine[Any, Any, None]]:
    """Background work of a pool: load scrapes, DNS discovery of `dns:` servers, and the
    servers file."""
    t = settings.triton
    jobs: list[Coroutine[Any, Any, None]] = []
    if t.routing == "load_aware":
        jobs.append(pool.run_load_scrapes(t.load_scrape_interval_s, t.load_scrape_timeout_s))
    sources = [DnsSource.parse(s.name, s.dns, s.metrics_port, s.models) for s in t.servers if s.dns]

    tls = triton_channel_credentials(t)

    def backend(name: str, url: str) -> TritonBackend:
        return TritonBackend(
            url, name, tls, t.tls_server_name, max_channel_age_s=t.max_channel_age_s
        )

    if sources:
        jobs.append(DnsDiscovery(pool, sources, backend, interval_s=t.dns_interval_s).run())
    if t.servers_file is not None:
        jobs.append(ServersFile(pool, t.servers_file, backend, t.dns_interval_s).run())
    return jobs


def build_tracing(telemetry: TelemetrySettings) -> Tracing | None:
    """The process's tracer when a collector is configured; None (no tracing) otherwise."""
    if not telemetry.otlp_endpoint:
        return None
    return Tracing.otlp(
        telemetry.otlp_endpoint,
        sample_ratio=telemetry.sample_ratio,
        service_name=telemetry.service_name,
        export_delay_ms=telemetry.export_delay_ms,
    )


def _traced(layer: InferLayer, tracing: Tracing | None, name: str) -> InferLayer:
    return layer if tracing is None else TracedLayer(layer, tracing, name)


def fallback_probes(table: RouteTable) -> list[InferRequest]:
    """A zero row for every route's fallback model: what the warm-up probe sends."""
    probes = []
    for route in table.routes.values():
        t = route.fallback.target
        schema = table.catalog.find(t.model, t.version) if t is not None else None
        if schema is not None:
            rows = np.zeros((1, len(schema.features)), dtype=np.float32)
            probes.append(schema.infer_request(rows, "warm-probe"))
    return probes


def _route_reloader(
    settings: Settings, service: InferenceService, metrics: Metrics, seen: str
) -> RouteReloader:
    """Hot reload of routes: the catalog is re-read too, so a new version's manifest counts;
    the table and its catalog go live as one snapshot."""
    r = settings.routing
    gate = VersionGate(
        service.backend,
        load_versions=r.load_versions,
        timeout_s=r.readiness_timeout_s,
        control_timeout_s=settings.triton.control_timeout_s,
        validation=ValidationGate(r.model_repository) if r.require_validation else None,
    )
    return RouteReloader(
        r.routes_dir,
        service.routes,
        gate,
        metrics,
        load_catalog=lambda: ModelCatalog.load(r.model_repository),
        interval_s=r.reload_interval_s,
        sticky_secret=sticky_secret(settings),
        seen=seen,
    )
