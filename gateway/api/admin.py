"""Operator endpoints: `GET /admin/routes` shows what is routing traffic right now.

The live table (arms with weights, segments, shadows, policy_version per route), the last
reload's result and error, requests per arm since start, shadow agreement, and per Triton
server its readiness, calls in flight and circuit-breaker state per model.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.api.keys import SERVICE
from gateway.api.middleware import json_response
from gateway.backends.pool import BackendPool
from gateway.routing.reload import RouteReloader
from gateway.routing.table import Route

RELOADER = web.AppKey("route_reloader", RouteReloader)
POOL = web.AppKey("backend_pool", BackendPool)

routes = web.RouteTableDef()


@routes.get("/admin/routes")
async def admin_routes(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    reloader = request.app.get(RELOADER)
    counts: dict[str, dict[str, int]] = {}
    for (model, arm), n in sorted(service.arm_counts.items()):
        counts.setdefault(model, {})[arm] = n
    body = {
        "routes": {
            name: {**describe(route), "arm_counts": counts.get(name, {})}
            for name, route in sorted(service.routes.current.routes.items())
        },
        "last_reload": reloader.last.to_dict() if reloader and reloader.last else None,
        "shadow": service.shadow.summary() if service.shadow is not None else {},
        "servers": pool.states() if (pool := request.app.get(POOL)) is not None else {},
    }
    return json_response(body)


def describe(route: Route) -> dict[str, Any]:
    arms = (
        [
            {"arm": a.name, "target": str(a.target), "weight": w, "sticky": route.split.sticky}
            for a, w in zip(route.split.arms, route.split.weights().values(), strict=True)
        ]
        if route.split is not None
        else [{"arm": "champion", "target": str(route.champion), "weight": 100.0, "sticky": None}]
    )
    return {
        "policy_version": route.policy_version,
        "source": route.source,
        "champion": str(route.champion),
        "arms": arms,
        "segments": [
            {
                "name": s.name,
                "match": {k: list(v) for k, v in s.match.items()},
                "target": str(s.target),
            }
            for s in route.segments
        ],
        "shadow": [{"target": str(s.target), "sample": s.sample} for s in route.shadows],
        "fallback": str(route.fallback.target) if route.fallback.target else None,
    }
