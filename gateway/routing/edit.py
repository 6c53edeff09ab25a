"""Editing route files in place: a canary's weight, written atomically, comments kept.

Used by `python -m gateway routes set-weight` and by the rollout controller; the reloader
validates the result like any other edit.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any


def set_weight(
    routes_dir: Path,
    model: str,
    version: str,
    weight: float,
    target: str | None = None,
    catalog: Any = None,
    validation: Any = None,
    audit: Any = None,
) -> Path:
    """Rewrite the route file of ``model`` with the challenger's new weight; return its path.

    ``validation`` (a `gateway.registry.report.ValidationGate`) refuses a weight above 0 for a
    version without a passing report; 0 (a rollback) is always allowed. ``audit`` (a
    `gateway.audit.AuditLog`) records the change, old weight and new, once it is written."""
    from ruamel.yaml import YAML

    from gateway.routing.table import RouteError, check_targets, parse_route

    yaml = YAML()  # round-trip: comments, order, flow style and quotes survive
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap long flow mappings
    path, doc = _find_route(routes_dir, model, yaml)
    challengers = doc.get("challengers") or []
    matches = [
        c
        for c in challengers
        if str(c.get("version")) == version and (target is None or str(c.get("target")) == target)
    ]
    if not matches:
        champion = doc.get("champion") or {}
        hint = (
            " (it is the champion, which takes what the challengers leave)"
            if str(champion.get("version")) == version
            else ""
        )
        raise RouteError(f"{path}: no challenger with version {version!r}{hint}")
    if len(matches) > 1:
        raise RouteError(f"{path}: several challengers have version {version!r}; pass --target")
    if validation is not None and weight > 0:
        from gateway.routing.table import Target

        validation.require([Target(str(matches[0].get("target")), version)])
    old = matches[0].get("weight")
    matches[0]["weight"] = int(weight) if float(weight).is_integer() else weight
    out = io.StringIO()
    yaml.dump(doc, out)
    content = out.getvalue().encode()
    route = parse_route(content, str(path))  # never write what the gateway would reject
    if catalog is not None:
        check_targets(route, catalog)
    _atomic_write(path, content)
    if audit is not None:
        audit.record(
            "route.set_weight",
            f"{model}/{matches[0].get('target')}@{version}",
            None if old is None else float(old),
            float(weight),
            detail={"route_file": str(path)},
        )
    return path


def _find_route(routes_dir: Path, model: str, yaml: Any) -> tuple[Path, Any]:
    from ruamel.yaml.util import load_yaml_guess_indent

    candidates = [routes_dir / f"{model}.yaml", *sorted(routes_dir.glob("*.yaml"))]
    for path in dict.fromkeys(candidates):
        if path.is_file():
            text = path.read_text()
            _, indent, offset = load_yaml_guess_indent(text)
            if indent is not None:  # keep the file's own list indentation ("  - " or "- ")
                offset = offset or 0
                yaml.indent(mapping=max(2, indent - offset), sequence=indent, offset=offset)
            doc = yaml.load(text)
            if isinstance(doc, dict) and str(doc.get("model")) == model:
                return path, doc
    from gateway.routing.table import RouteError

    raise RouteError(f"{routes_dir}: no route file for model {model!r}")


def _atomic_write(path: Path, content: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
