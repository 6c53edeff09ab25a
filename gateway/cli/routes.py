"""`python -m gateway routes ...`: check route files (CI for a config repo), set a weight.

`set-weight` is the human path of a rollout: it edits the YAML with ruamel.yaml so comments and
layout survive, validates the result exactly as the gateway will, and replaces the file
atomically (temp file in the same directory + os.replace), so the hot reloader never reads a
half-written file. With `routing.require_validation` on, raising a challenger above 0 % needs
its passing validation report (rolling back to 0 % never does). Gateway modules are imported
inside the handlers to keep the CLI light.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_routes_parser(sub: Any) -> None:
    routes = sub.add_parser("routes", help="check route files; change a challenger's weight")
    rsub = routes.add_subparsers(dest="routes_command", required=True, metavar="ACTION")

    check = rsub.add_parser("check", help="validate route files; exit 1 listing the errors")
    check.add_argument("files", nargs="*", type=Path, help="default: every file in routes_dir")
    _common(check)
    check.set_defaults(handler=cmd_check)

    sw = rsub.add_parser("set-weight", help="set a challenger's weight (percent) in place")
    sw.add_argument("model", help="public model name (the route's `model`)")
    sw.add_argument("--version", required=True, help="the challenger's version")
    sw.add_argument("--target", default=None, help="the challenger's target model (if ambiguous)")
    sw.add_argument("--weight", required=True, type=float, help="percent of traffic, 0-100")
    _common(sw)
    sw.set_defaults(handler=cmd_set_weight)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=Path("configs/gateway.yaml"))
    parser.add_argument("--routes-dir", type=Path, default=None, help="override routing.routes_dir")
    parser.add_argument(
        "--no-catalog", action="store_true", help="skip checking targets against the repository"
    )


def _dirs(args: argparse.Namespace) -> tuple[Path, Path | None]:
    from gateway.config import load_settings

    config = args.config if args.config.exists() else None
    routing = load_settings(config).routing
    repo = None if args.no_catalog else routing.model_repository
    return args.routes_dir or routing.routes_dir, repo


def _validation(args: argparse.Namespace) -> Any:
    """The registry's ValidationGate when routing.require_validation is on, else None."""
    from gateway.config import load_settings
    from gateway.registry.report import ValidationGate

    routing = load_settings(args.config if args.config.exists() else None).routing
    return ValidationGate(routing.model_repository) if routing.require_validation else None


def _audit(args: argparse.Namespace) -> Any:
    """The audit log (gateway/audit.py): who set which weight, from what."""
    from gateway.audit import AuditLog
    from gateway.config import load_settings

    return AuditLog.from_settings(load_settings(args.config if args.config.exists() else None))


def _catalog(repo: Path | None) -> Any:
    from gateway.catalog import ModelCatalog

    return ModelCatalog.load(repo) if repo is not None and repo.is_dir() else None


def cmd_check(args: argparse.Namespace) -> int:
    from gateway.routing.table import RouteError, check_targets, load_route_table, parse_route

    routes_dir, repo = _dirs(args)
    catalog = _catalog(repo)
    errors = 0
    if not args.files:
        try:
            table = load_route_table(routes_dir, catalog)
        except RouteError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        for name, route in sorted(table.routes.items()):
            print(f"ok  {route.source}  {name}  {route.policy_version}")
        return 0
    for path in args.files:
        try:
            route = parse_route(path.read_bytes(), str(path))
            if catalog is not None:
                check_targets(route, catalog)
        except (RouteError, OSError) as exc:
            errors += 1
            print(f"error: {exc}", file=sys.stderr)
        else:
            print(f"ok  {path}  {route.name}  {route.policy_version}")
    return 1 if errors else 0


def cmd_set_weight(args: argparse.Namespace) -> int:
    from gateway.routing.edit import set_weight
    from gateway.routing.table import RouteError

    routes_dir, repo = _dirs(args)
    try:
        path = set_weight(
            routes_dir,
            args.model,
            args.version,
            args.weight,
            args.target,
            _catalog(repo),
            validation=_validation(args),
            audit=_audit(args),
        )
    except RouteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{path}: {args.model} v{args.version} weight {args.weight:g} %")
    return 0
