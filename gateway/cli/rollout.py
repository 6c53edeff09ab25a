"""`python -m gateway promote <model>`: run the canary controller once or in a loop.
`python -m gateway rollout status [--model M]`: stage, gates, lease and decision history.
`python -m gateway rollout report --model M --out report.html`: the rollout in pictures.

Registered by `gateway.__main__`; gateway modules load inside the handler to keep the CLI
light. Exit codes: 0 evaluated (whatever the verdict) or written, 1 the route, Redis or the
data failed, 2 bad settings.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any


def add_promote_parser(sub: Any) -> None:
    p = sub.add_parser("promote", help="metric-gated canary promotion of a route's challenger")
    p.add_argument("model", help="public model name (the route's `model`)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="one evaluation, then exit (default)")
    mode.add_argument(
        "--interval", type=float, default=None, help="evaluate every N seconds until Ctrl-C"
    )
    p.add_argument("--dry-run", action="store_true", help="decide and record, never edit")
    p.add_argument("--config", type=Path, default=Path("configs/gateway.yaml"))
    p.add_argument("--redis-url", default=None, help="override redis.url")
    p.add_argument("--routes-dir", type=Path, default=None, help="override routing.routes_dir")
    p.set_defaults(handler=cmd_promote)


def _redis_settings(args: argparse.Namespace) -> Any:
    """Settings from ``--config`` and ``--redis-url``, or None (the error printed) when they
    do not load or name no Redis: every rollout command reads the prediction log there."""
    from gateway.config import ConfigError, load_settings

    try:
        settings = load_settings(args.config if args.config.exists() else None,
                                 redis_url=args.redis_url)  # fmt: skip
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    if not settings.redis.url:
        print("error: redis.url is empty; the prediction log is read from Redis", file=sys.stderr)
        return None
    return settings


def _controller(client: Any, settings: Any, routes_dir: Path, **options: Any) -> Any:
    """The RolloutController as the settings configure it (`promote` adds what only acting
    needs: catalog, validation, audit, lease TTL; `rollout status` only reads)."""
    from gateway.predlog.feedback import LabelStore
    from gateway.rollout.controller import RolloutController

    fb, ro = settings.feedback, settings.rollout
    return RolloutController(
        client,
        LabelStore(client, fb.label_prefix, fb.label_ttl_s),
        routes_dir=routes_dir,
        policy=ro.policy,
        record_dir=ro.record_dir,
        stream_prefix=settings.predlog.stream_prefix,
        key_prefix=ro.key_prefix,
        **options,
    )


def cmd_promote(args: argparse.Namespace) -> int:
    from gateway.audit import AuditLog
    from gateway.catalog import ModelCatalog
    from gateway.errors import SwitchyardError
    from gateway.log import configure_logging
    from gateway.observability import redis_client
    from gateway.registry.report import ValidationGate
    from gateway.rollout.controller import RolloutError
    from gateway.routing.table import RouteError

    settings = _redis_settings(args)
    if settings is None:
        return 2
    configure_logging(settings.log.level, json=settings.log.json)
    repo = settings.routing.model_repository

    async def run() -> int:
        client = redis_client(settings)
        assert client is not None
        ro = settings.rollout
        controller = _controller(
            client,
            settings,
            args.routes_dir or settings.routing.routes_dir,
            catalog=ModelCatalog.load(repo) if repo.is_dir() else None,
            dry_run=args.dry_run,
            validation=ValidationGate(repo) if settings.routing.require_validation else None,
            audit=AuditLog.from_settings(settings, via="rollout-controller"),
            lease_ttl_s=ro.lease_ttl_s,
            audit_maxlen=ro.audit_maxlen,
        )
        try:
            if args.interval is not None:
                await controller.run(args.model, args.interval)  # releases the lease on exit
                return 0
            try:
                ev = await controller.evaluate_once(args.model)
            finally:
                await controller.release(args.model)  # one step: let a looping replica act
        finally:
            await client.aclose()
        # the full record is in the log line above and in the record file
        state = "dry run" if ev.dry_run else ("applied" if ev.applied else "unchanged")
        state += ", champion swapped" if ev.swap else ""
        print(f"{ev.model}: {ev.verdict.action} {ev.from_weight:g} -> {ev.to_weight:g} % ({state})")
        for reason in ev.verdict.reasons:
            print(f"  {reason}")
        return 0

    try:
        return asyncio.run(run())
    except (RolloutError, RouteError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except SwitchyardError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


def add_rollout_parser(sub: Any) -> None:
    rollout = sub.add_parser("rollout", help="canary rollout status and reports")
    rsub = rollout.add_subparsers(dest="rollout_command", required=True, metavar="ACTION")
    st = rsub.add_parser("status", help="each model's stage, its metrics against the "
                         "thresholds, the lease holder and the decision history")  # fmt: skip
    st.add_argument("--model", default=None, help="one model (default: every route file)")
    st.add_argument("--history", type=int, default=10, help="audit entries shown per model")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--config", type=Path, default=Path("configs/gateway.yaml"))
    st.add_argument("--redis-url", default=None, help="override redis.url")
    st.add_argument("--routes-dir", type=Path, default=None, help="override routing.routes_dir")
    st.set_defaults(handler=cmd_status)
    p = rsub.add_parser("report", help="one self-contained HTML page: latency, errors, "
                        "accuracy delta, traffic share and decisions over time")  # fmt: skip
    p.add_argument("--model", required=True, help="public model name (its stream and records)")
    p.add_argument("--out", type=Path, required=True, help="the HTML file to write")
    p.add_argument("--png", type=Path, default=None, help="also every panel in one PNG")
    p.add_argument("--since-s", type=float, default=None, help="only the last N seconds")
    p.add_argument("--bucket-s", type=float, default=None, help="bucket width (default: auto)")
    p.add_argument("--config", type=Path, default=Path("configs/gateway.yaml"))
    p.add_argument("--redis-url", default=None, help="override redis.url")
    p.add_argument("--record-dir", type=Path, default=None, help="override rollout.record_dir")
    p.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    import time

    from gateway.errors import SwitchyardError
    from gateway.observability import redis_client
    from gateway.predlog.feedback import LabelStore
    from gateway.rollout import report, report_data

    settings = _redis_settings(args)
    if settings is None:
        return 2

    async def read() -> list[report_data.Answer]:
        client = redis_client(settings)
        assert client is not None
        fb = settings.feedback
        try:
            return await report_data.read_answers(
                client,
                LabelStore(client, fb.label_prefix, fb.label_ttl_s),
                f"{settings.predlog.stream_prefix}:{args.model}",
            )
        finally:
            await client.aclose()

    record_dir = args.record_dir or settings.rollout.record_dir
    try:
        answers = asyncio.run(read())
        decisions = report_data.read_decisions(record_dir / f"{args.model}.jsonl")
        since = None if args.since_s is None else time.time() - args.since_s
        data = report_data.build(args.model, answers, decisions, args.bucket_s, since)
    except SwitchyardError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    images = report.panel_pngs(data)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report.html_page(data, images))
    if args.png is not None:
        args.png.parent.mkdir(parents=True, exist_ok=True)
        args.png.write_bytes(report.combined_png(data))
    arms = ", ".join(f"{t.arm} ({t.count})" for t in data.totals)
    print(f"{args.out}: {len(images)} panels, {len(data.decisions)} decisions; arms {arms}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from gateway.errors import SwitchyardError
    from gateway.observability import redis_client
    from gateway.rollout.controller import RolloutError
    from gateway.rollout.status import model_status, render_text
    from gateway.routing.table import RouteError, parse_route

    settings = _redis_settings(args)
    if settings is None:
        return 2
    routes_dir = args.routes_dir or settings.routing.routes_dir

    async def run() -> list[dict[str, Any]]:
        client = redis_client(settings)
        assert client is not None
        c = _controller(client, settings, routes_dir, dry_run=True)
        files = sorted(routes_dir.glob("*.yaml"))
        models = [args.model] if args.model else [parse_route(p.read_bytes(), str(p)).name
                                                  for p in files]  # fmt: skip
        try:
            return [await model_status(c, m, args.history) for m in models]
        finally:
            await client.aclose()

    try:
        views = asyncio.run(run())
    except (RolloutError, RouteError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except SwitchyardError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(views, indent=2, default=str))
    else:
        print("\n\n".join(render_text(v) for v in views))
    return 0
