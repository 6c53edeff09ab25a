"""`python -m gateway models ...`: publish, list, verify, retire and validate model versions.

Exit codes: 0 done (an identical publish included), 1 refused or failed (a tampered file, a
failed validation check), 2 bad arguments. Gateway modules load inside the handlers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_models_parser(sub: Any) -> None:
    from gateway.progress import add_flag

    models = sub.add_parser(
        "models", help="model registry: publish, list, verify, retire, validate"
    )
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    pub = msub.add_parser("publish", help="copy an artifact dir into the next version folder")
    pub.add_argument("artifact", type=Path, help="artifact dir (files/, training.json, ...)")
    pub.add_argument("--model", required=True)
    pub.add_argument("--run-id", default=None, help="training run id (else training.json's)")
    _common(pub)
    add_flag(pub)
    pub.set_defaults(handler=cmd_publish)

    ls = msub.add_parser("list", help="each version, its digest and where it is live")
    ls.add_argument("--model", default=None, help="default: every model")
    _common(ls)
    ls.set_defaults(handler=cmd_list)

    ver = msub.add_parser("verify", help="check every file's sha256; exit 1 naming a bad file")
    ver.add_argument("--model", default=None, help="default: every model")
    _common(ver)
    ver.set_defaults(handler=cmd_verify)

    ret = msub.add_parser("retire", help="delete old versions (keeps the last 10 and live ones)")
    ret.add_argument("--model", default=None, help="default: every model")
    ret.add_argument("--keep", type=int, default=10, help="newest versions kept (at least 10)")
    ret.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    _common(ret)
    ret.set_defaults(handler=cmd_retire)

    from gateway.cli.models_validate import add_validate_parser

    add_validate_parser(msub, _common)  # validate: the checks need Triton, so their own module


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=Path("configs/gateway.yaml"))
    parser.add_argument(
        "--repository", type=Path, default=None, help="override routing.model_repository"
    )
    parser.add_argument("--routes-dir", type=Path, default=None, help="override routing.routes_dir")


def paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """(model repository, routes dir) from the flags, else from the gateway config."""
    from gateway.config import load_settings

    routing = load_settings(args.config if args.config.exists() else None).routing
    return args.repository or routing.model_repository, args.routes_dir or routing.routes_dir


def _models(repo: Path, model: str | None) -> list[str]:
    from gateway.registry.layout import models

    return [model] if model else models(repo)


def cmd_publish(args: argparse.Namespace) -> int:
    from gateway.errors import RegistryError
    from gateway.progress import Progress
    from gateway.registry.publish import publish

    repo, _ = paths(args)
    progress = Progress.for_stream(flag=args.progress)  # stderr; stdout stays the result
    try:
        done = publish(repo, args.model, args.artifact, args.run_id, progress=progress)
    except RegistryError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    if done.created:
        print(f"published {done.model}/{done.version}  {done.digest}  {done.path}")
    else:
        print(f"identical to {done.model}/{done.version} ({done.digest}); nothing published")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from gateway.errors import RegistryError
    from gateway.registry.inventory import list_versions
    from gateway.registry.report import report_status
    from gateway.routing.table import RouteError

    repo, routes = paths(args)
    try:
        for model in _models(repo, args.model):
            for v in list_versions(repo, model, routes):
                status = report_status(repo, model, str(v.version))
                live = "; ".join(v.live) or "-"
                print(f"{model}/{v.version}  {v.digest[:19]}  {status:<14}  {live}")
    except RegistryError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except RouteError as exc:  # where versions are live is unknown: say so, guess nothing
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from gateway.errors import RegistryError
    from gateway.registry.inventory import verify_version
    from gateway.registry.layout import version_dirs

    repo, _ = paths(args)
    bad = 0
    try:
        for model in _models(repo, args.model):
            for vdir in version_dirs(repo, model):
                problems = verify_version(vdir)
                bad += bool(problems)
                for p in problems:
                    print(f"TAMPERED {model}/{vdir.name}: {p}", file=sys.stderr)
                if not problems:
                    print(f"ok  {model}/{vdir.name}")
    except RegistryError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    return 1 if bad else 0


def cmd_retire(args: argparse.Namespace) -> int:
    from gateway.errors import RegistryError
    from gateway.registry.inventory import retire
    from gateway.routing.table import RouteError

    repo, routes = paths(args)
    try:
        for model in _models(repo, args.model):
            gone = retire(repo, model, routes, args.keep, args.dry_run)
            verb = "would retire" if args.dry_run else "retired"
            print(f"{model}: {verb} {', '.join(map(str, gone)) or 'nothing'}")
    except RegistryError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except RouteError as exc:  # an unreadable route might name any version: retire nothing
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
