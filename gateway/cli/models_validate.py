"""`models validate`: run the validation checks against a real tritonserver, write the report.

The route is the one whose champion serves the same Triton model, else the one whose fallback
does (or `--route NAME`): its champion is the comparison for the schema, the version in the
same role (its champion, or its fallback for a fallback model) for the holdout metrics, and its
`slo.p99_ms` the latency budget.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_validate_parser(msub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    v = msub.add_parser("validate", help="check a version against Triton; write its report")
    v.add_argument("--model", required=True, help="the Triton model (a version folder's parent)")
    v.add_argument("--version", required=True)
    v.add_argument("--route", default=None, help="route name (default: the one serving --model)")
    v.add_argument("--triton-url", default=None, help="Triton gRPC host:port (triton.grpc_url)")
    v.add_argument("--probes", type=int, default=50, help="requests in the latency probe")
    v.add_argument("--metric-margin", type=float, default=0.005, help="allowed metric drop")
    common(v)
    v.set_defaults(handler=cmd_validate)


def find_route(routes_dir: Path, model: str, name: str | None) -> Any:
    from gateway.errors import RegistryError
    from gateway.routing.table import parse_route

    routes = [parse_route(p.read_bytes(), str(p)) for p in sorted(routes_dir.glob("*.yaml"))]
    if name is not None:
        found = [r for r in routes if r.name == name]
    else:
        found = [r for r in routes if r.champion.model == model]
        if not found:  # a fallback model (risk_distilled): the route it is the fallback of
            found = [r for r in routes if r.fallback.target and r.fallback.target.model == model]
    if len(found) != 1:
        which = f"named {name!r}" if name else f"whose champion serves {model!r}"
        raise RegistryError(f"{routes_dir}: {len(found)} routes {which}; pass --route")
    return found[0]


def cmd_validate(args: argparse.Namespace) -> int:
    from gateway.backends.triton import TritonBackend
    from gateway.cli.models import paths
    from gateway.config import load_settings
    from gateway.errors import RegistryError
    from gateway.registry.report import write_report
    from gateway.registry.validate import NOT_RUN, Thresholds, validate
    from gateway.routing.table import RouteError
    from gateway.tls import triton_channel_credentials

    repo, routes_dir = paths(args)
    settings = load_settings(args.config if args.config.exists() else None)
    url = args.triton_url or settings.triton.grpc_url
    try:
        route = find_route(routes_dir, args.model, args.route)
    except RegistryError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except RouteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    thresholds = Thresholds(metric_margin=args.metric_margin, probes=args.probes)

    async def run() -> dict[str, Any]:
        t = settings.triton  # TLS as the gateway's own channels (triton.tls_*)
        backend = TritonBackend(url, None, triton_channel_credentials(t), t.tls_server_name)
        try:
            return await validate(repo, args.model, args.version, route, backend, thresholds)
        finally:
            await backend.close()

    report = asyncio.run(run())
    path = write_report(repo, args.model, args.version, report)
    for c in report["checks"]:
        word = "pass" if c["passed"] else ("SKIP" if c["detail"].startswith(NOT_RUN) else "FAIL")
        print(f"{word}  {c['name']:<8} {c['detail']}")
    verdict = "passed" if report["passed"] else "REFUSED"
    print(f"{args.model}@{args.version} {verdict}; report {path}")
    return 0 if report["passed"] else 1
