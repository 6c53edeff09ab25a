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

from gateway.routing.split import BUCKETS


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
    old = _current_weight(routes_dir, model, version, target)
    path, content = render_weight(routes_dir, model, version, weight, target, catalog, validation)
    write_route(path, content)
    if audit is not None:
        audit.record(
            "route.set_weight",
            f"{model}/{target or model}@{version}",
            old,
            float(weight),
            detail={"route_file": str(path)},
        )
    return path


def _current_weight(routes_dir: Path, model: str, version: str, target: str | None) -> float | None:
    """The challenger's weight in the file now (None: not a challenger yet)."""
    from gateway.routing.table import RouteError, parse_route

    for path in sorted(routes_dir.glob("*.yaml")):
        try:
            route = parse_route(path.read_bytes(), str(path))
        except (OSError, RouteError):
            continue
        if route.name != model or route.split is None:
            continue
        for arm in route.split.arms:
            if arm.target.version == version and arm.target.model == (target or arm.target.model):
                return arm.buckets * 100 / BUCKETS
    return None


def render_weight(
    routes_dir: Path,
    model: str,
    version: str,
    weight: float,
    target: str | None = None,
    catalog: Any = None,
    validation: Any = None,
) -> tuple[Path, bytes]:
    """`set_weight` without the write: the file and its new, validated content."""
    yaml = _yaml()
    path, doc = _find_route(routes_dir, model, yaml)
    if weight > 0 and not _matching(doc, version, target):
        match = _add_challenger(path, doc, version, target)
    else:
        match = _challenger(path, doc, version, target)
    if validation is not None and weight > 0:
        from gateway.routing.table import Target

        validation.require([Target(str(match.get("target")), version)])
    match["weight"] = int(weight) if float(weight).is_integer() else weight
    return path, _dump(path, doc, yaml, catalog)


def render_swap(
    routes_dir: Path,
    model: str,
    version: str,
    target: str | None = None,
    catalog: Any = None,
    validation: Any = None,
) -> tuple[Path, bytes]:
    """The champion swap: the challenger ``target@version`` becomes the champion, and the old
    champion takes the challenger's place in the list at weight 0, its sticky key kept: the
    rollback target, one `set-weight` (or swap) away. Comments and layout survive."""
    yaml = _yaml()
    path, doc = _find_route(routes_dir, model, yaml)
    match = _challenger(path, doc, version, target)
    champion = doc.get("champion")
    if champion is None:
        from gateway.routing.table import RouteError

        raise RouteError(f"{path}: no champion to swap")
    if validation is not None:
        from gateway.routing.table import Target

        validation.require([Target(str(match.get("target")), version)])
    for key in ("target", "version"):  # the loaded scalars move, with their quote style
        champion[key], match[key] = match[key], champion[key]
    match["weight"] = 0
    return path, _dump(path, doc, yaml, catalog)


def _yaml() -> Any:
    from ruamel.yaml import YAML

    yaml = YAML()  # round-trip: comments, order, flow style and quotes survive
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap long flow mappings
    return yaml


def _matching(doc: Any, version: str, target: str | None) -> list[Any]:
    """The challengers of `doc` with this version (and target, when given)."""
    return [
        c
        for c in doc.get("challengers") or []
        if str(c.get("version")) == version and (target is None or str(c.get("target")) == target)
    ]


def _add_challenger(path: Path, doc: Any, version: str, target: str | None) -> Any:
    """A new canary: `{target, version, weight, sticky}` appended to `challengers`, in flow
    style like the shipped files. The target defaults to the champion's Triton model, the
    sticky key to the other challengers' (else `entity_id`: a canary keeps its entities).
    The weight is set by the caller; the catalog and the validation gate still decide."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    from gateway.routing.table import RouteError

    champion = doc.get("champion") or {}
    if target is None and str(champion.get("version")) == version:
        raise RouteError(
            f"{path}: no challenger with version {version!r} (it is the champion, which takes "
            "what the challengers leave)"
        )
    challengers = doc.get("challengers")
    if challengers is None:
        challengers = doc["challengers"] = CommentedSeq()
    sticky = next((c.get("sticky") for c in challengers if c.get("sticky")), "entity_id")
    arm = CommentedMap()
    arm["target"] = target or str(champion.get("target", doc.get("model")))
    arm["version"] = DoubleQuotedScalarString(version)  # "3", as a version is written
    arm["weight"] = 0
    arm["sticky"] = sticky
    arm.fa.set_flow_style()
    challengers.append(arm)
    return arm


def _challenger(path: Path, doc: Any, version: str, target: str | None) -> Any:
    from gateway.routing.table import RouteError

    matches = _matching(doc, version, target)
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
    return matches[0]


def _dump(path: Path, doc: Any, yaml: Any, catalog: Any) -> bytes:
    from gateway.routing.table import check_targets, parse_route

    out = io.StringIO()
    yaml.dump(doc, out)
    content = out.getvalue().encode()
    route = parse_route(content, str(path))  # never write what the gateway would reject
    if catalog is not None:
        check_targets(route, catalog)
    return content


def _find_route(routes_dir: Path, model: str, yaml: Any) -> tuple[Path, Any]:
    candidates = [routes_dir / f"{model}.yaml", *sorted(routes_dir.glob("*.yaml"))]
    for path in dict.fromkeys(candidates):
        if path.is_file():
            doc = _load(yaml, path, path.read_text())
            if isinstance(doc, dict) and str(doc.get("model")) == model:
                return path, doc
    from gateway.routing.table import RouteError

    raise RouteError(f"{routes_dir}: no route file for model {model!r}")


def _load(yaml: Any, path: Path, text: str) -> Any:
    """The round-trip document, or the RouteError the gateway would give for this file.

    ruamel refuses what PyYAML accepts or reads differently (duplicate keys); the CLI must say
    which file and line is wrong, as `routes check` does, not end in a traceback."""
    from ruamel.yaml.error import YAMLError
    from ruamel.yaml.util import load_yaml_guess_indent

    from gateway.routing.table import RouteError, parse_route

    try:
        _, indent, offset = load_yaml_guess_indent(text)
        if indent is not None:  # keep the file's own list indentation ("  - " or "- ")
            offset = offset or 0
            yaml.indent(mapping=max(2, indent - offset), sequence=indent, offset=offset)
        return yaml.load(text)
    except YAMLError as exc:
        parse_route(text.encode(), str(path))  # raises the gateway's own error, if it has one
        raise RouteError(f"{path}: invalid YAML: {exc}") from exc


def write_route(path: Path, content: bytes) -> None:
    """Replace `path` with `content` atomically (temp file, fsync, rename)."""
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
