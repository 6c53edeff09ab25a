"""Route files -> an immutable, validated RouteTable, swapped atomically on reload.

One YAML file per public model name (`configs/routes/<model>.yaml`). `policy_version` is the
content hash of the file, so every answer names the exact policy that produced it. Validation
errors name the file, the line and the field (`risk.yaml:4: challengers[0].weight: ...`), from
the YAML node marks, so a broken edit is found without reading the loader.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from gateway.catalog import ModelCatalog
from gateway.errors import ModelNotFound
from gateway.routing.split import BUCKETS, Arm, Split, sticky_salt
from gateway.types import CallPolicy, HedgeSpec, Target

__all__ = ["Route", "RouteError", "RouteTable", "RouteTableRef", "Target", "load_route_table"]

_KEYS = {"model", "champion", "challengers", "segments", "shadow", "fallback", "slo", "cache",
         "priority", "hedge"}  # fmt: skip
_TARGET_KEYS = {"target", "version"}


class RouteError(ValueError):
    """A route file that cannot be used; the message names the file, line and field."""


@dataclass(frozen=True, slots=True)
class Fallback:
    """The route's fallback ladder: distilled model, cached answer, static default."""

    target: Target | None = None
    cache_ttl_s: float = 0.0
    default: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Slo:
    p99_ms: float | None = None
    error_rate: float | None = None
    deadline_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Segment:
    """Requests whose `context` matches every field (a value or a list of values) go to
    `target`; the first matching segment in file order wins, before any split."""

    name: str
    match: Mapping[str, tuple[Any, ...]]
    target: Target

    def matches(self, context: Mapping[str, Any]) -> bool:
        return all(context.get(k) in allowed for k, allowed in self.match.items())


@dataclass(frozen=True, slots=True)
class Shadow:
    """A copy of a `sample` fraction of requests, sent after the answer, never returned."""

    target: Target
    sample: float


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    champion: Target
    policy_version: str
    source: str
    fallback: Fallback = field(default_factory=Fallback)
    slo: Slo = field(default_factory=Slo)
    raw: Mapping[str, Any] = field(default_factory=dict)
    split: Split | None = None
    segments: tuple[Segment, ...] = ()
    shadows: tuple[Shadow, ...] = ()
    #: Response cache (deterministic models only): a hit answers without the primary.
    response_cache_ttl_s: float = 0.0
    #: Triton priority level of this route's requests unless a request names its own
    #: (parameters.priority / context.priority); used where the model has priority levels.
    priority: int | None = None
    hedge: HedgeSpec | None = None

    @property
    def policy(self) -> CallPolicy:
        """What the layers below the Service need of this route, as one value."""
        return CallPolicy(
            route=self.name,
            policy_version=self.policy_version,
            fallback=self.fallback.target,
            cache_ttl_s=self.fallback.cache_ttl_s,
            default=self.fallback.default,
            response_cache_ttl_s=self.response_cache_ttl_s,
            p99_ms=self.slo.p99_ms,
            hedge=self.hedge,
        )

    def deadline_ms(self, factor: float) -> float | None:
        """The default deadline of this route's requests: the SLO's deadline_ms, else
        ``factor`` x its p99 (the hard ceiling the specs put at twice the p99 target)."""
        if self.slo.deadline_ms is not None:
            return float(self.slo.deadline_ms)
        return self.slo.p99_ms * factor if self.slo.p99_ms else None

    def choose(
        self, entity_id: str | None, context: Mapping[str, Any], rng: random.Random
    ) -> tuple[Target, str]:
        """The target and arm name for one request: segments first, then the split."""
        for seg in self.segments:
            if seg.matches(context):
                return seg.target, f"segment:{seg.name}"
        if self.split is None:
            return self.champion, "champion"
        key = None
        if self.split.sticky is not None:
            value = (
                entity_id if self.split.sticky == "entity_id" else context.get(self.split.sticky)
            )
            key = None if value is None else str(value)
        arm = self.split.pick(key, rng)
        return arm.target, arm.name

    def targets(self) -> set[Target]:
        """Every target this route can send a request to (answers, shadows, fallback)."""
        found = {self.champion}
        if self.split is not None:
            found |= {a.target for a in self.split.arms}
        found |= {s.target for s in self.segments} | {s.target for s in self.shadows}
        if self.fallback.target is not None:
            found.add(self.fallback.target)
        return found


@dataclass(frozen=True, slots=True)
class RouteTable:
    """One immutable snapshot of live state: the routes and the model catalog they were
    validated against. A reload swaps both at once, so no request ever sees a route whose
    versions' schemas are not in its catalog."""

    routes: Mapping[str, Route]
    catalog: ModelCatalog = field(default_factory=lambda: ModelCatalog({}))

    def get(self, name: str) -> Route:
        try:
            return self.routes[name]
        except KeyError:
            raise ModelNotFound(
                f"no route for model {name!r}", details={"known": sorted(self.routes)}
            ) from None

    def targets(self) -> set[Target]:
        return set().union(*(r.targets() for r in self.routes.values()))


def policy_version(content: bytes) -> str:
    return "routes@" + hashlib.sha256(content).hexdigest()[:12]


# -- parsing with line numbers ------------------------------------------------------------


Path_ = tuple[str | int, ...]


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Doc:
    """The parsed file plus the line of every key path, for errors that point at the edit.

    Duplicate keys are errors: PyYAML keeps the last one silently (a second ``weight:`` in a
    challenger serves what the reviewer never saw), and `routes set-weight` (ruamel) refuses
    them, so the gateway, `routes check` and the editor must agree on refusing them.
    """

    def __init__(self, content: bytes, source: str) -> None:
        self.source = source
        self.lines: dict[Path_, int] = {}
        #: The node at each key path (an alias: the node it names), for checks that need
        #: the text as written, not as YAML 1.1 resolved it.
        self.nodes: dict[Path_, yaml.Node] = {}
        try:
            node = yaml.compose(content, Loader=yaml.SafeLoader)
            self.data = yaml.safe_load(content)
        except RecursionError:  # PyYAML recurses per nesting level; a route nests ~4
            raise RouteError(f"{source}: nested too deeply") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise RouteError(f"{source}{line}: invalid YAML: {exc}") from exc
        if node is not None:
            self._index(node, (), set())

    def _index(self, node: yaml.Node, path: Path_, seen: set[int]) -> None:
        # An alias is the node it names: index it once, so an alias that holds itself or
        # aliases of aliases (a "billion laughs" file) cost no more than the file's size.
        self.nodes.setdefault(path, node)
        if id(node) in seen:
            return
        seen.add(id(node))
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key, value in node.value:
                sub = (*path, str(key.value))
                line = key.start_mark.line + 1
                # `<<: *base` then an explicit key is YAML's override, not a duplicate.
                if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:
                    if key.value in first:
                        raise RouteError(
                            f"{self.source}:{line}: {_dotted(sub)}: duplicate key (first at "
                            f"line {first[key.value]}); a key may appear once per mapping"
                        )
                    first[key.value] = line
                self.lines[sub] = line
                self._index(value, sub, seen)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._index(item, (*path, i), seen)

    def error_at(self, node: yaml.Node, path: Path_, message: str) -> RouteError:
        line = node.start_mark.line + 1
        return RouteError(f"{self.source}:{line}: {_dotted(path) or '<file>'}: {message}")

    def error(self, path: Path_, message: str) -> RouteError:
        line = next(
            (self.lines[path[:n]] for n in range(len(path), -1, -1) if path[:n] in self.lines), 1
        )
        return RouteError(f"{self.source}:{line}: {_dotted(path) or '<file>'}: {message}")


def _dotted(path: Path_) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def _mapping(doc: _Doc, value: Any, path: Path_, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise doc.error(path, f"expected a mapping with keys {sorted(allowed)}")
    unknown = sorted(set(map(str, value)) - allowed)
    if unknown:
        raise doc.error((*path, unknown[0]), f"unknown field; allowed: {sorted(allowed)}")
    return value


def _target(doc: _Doc, value: Any, path: Path_, extra: frozenset[str] = frozenset()) -> Target:
    m = _mapping(doc, value, path, _TARGET_KEYS | extra)
    for key in ("target", "version"):
        if m.get(key) in (None, ""):
            raise doc.error((*path, key) if key in m else path, f"'{key}' is required")
    return Target(str(m["target"]), str(m["version"]))


def _number(doc: _Doc, m: Mapping[str, Any], key: str, path: Path_, lo: float, hi: float) -> float:
    v = m[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        raise doc.error((*path, key), f"expected a number in [{lo:g}, {hi:g}], got {v!r}")
    return float(v)


def _list(doc: _Doc, data: Mapping[str, Any], key: str) -> list[Any]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise doc.error((key,), "expected a list")
    return value


def parse_route(content: bytes, source: str, sticky_secret: str = "") -> Route:
    """``sticky_secret``: keys the sticky-split salt (routing.sticky_salt; split.py)."""
    doc = _Doc(content, source)
    data = _mapping(doc, doc.data, (), _KEYS)
    for key in ("model", "champion"):
        if key not in data:
            raise doc.error((), f"a route needs '{key}'")
    name = data["model"]
    if not isinstance(name, str) or not name.strip():  # `model: ""` once made a nameless route
        raise doc.error(("model",), "'model' must be a non-empty string: the public model name")
    champion = _target(doc, data["champion"], ("champion",))
    return Route(
        name=name,
        champion=champion,
        policy_version=policy_version(content),
        source=source,
        fallback=_fallback(doc, data.get("fallback")),
        slo=_slo(doc, data.get("slo")),
        raw=MappingProxyType(dict(data)),
        split=_split(doc, data, sticky_salt(name, sticky_secret), champion),
        segments=tuple(_segment(doc, s, i) for i, s in enumerate(_list(doc, data, "segments"))),
        shadows=tuple(_shadow(doc, s, i) for i, s in enumerate(_list(doc, data, "shadow"))),
        response_cache_ttl_s=_cache(doc, data.get("cache")),
        priority=int(_number(doc, data, "priority", (), 1, 1e6)) if "priority" in data else None,
        hedge=_hedge(doc, data.get("hedge")),
    )


def _hedge(doc: _Doc, value: Any) -> HedgeSpec | None:
    """``hedge: {after: p95 | <ms>, max_ratio: 0.05}``; absent: no hedging."""
    if value is None:
        return None
    path: Path_ = ("hedge",)
    m = _mapping(doc, value, path, {"after", "max_ratio"})
    after = m.get("after", "p95")
    quantile, after_ms = None, None
    if isinstance(after, str) and after.startswith("p") and after[1:].isdigit():
        quantile = int(after[1:]) / 100.0
        if not 0.5 <= quantile < 1.0:
            raise doc.error((*path, "after"), "a quantile from p50 to p99")
    elif isinstance(after, int | float) and not isinstance(after, bool):
        after_ms = _number(doc, m, "after", path, 0.1, 1e9)
    else:
        raise doc.error((*path, "after"), "expected p50..p99 or milliseconds")
    ratio = _number(doc, m, "max_ratio", path, 0, 1) if "max_ratio" in m else 0.05
    return HedgeSpec(quantile=quantile, after_ms=after_ms, max_ratio=ratio)


def _cache(doc: _Doc, value: Any) -> float:
    if value is None:
        return 0.0
    m = _mapping(doc, value, ("cache",), {"ttl_s"})
    return _number(doc, m, "ttl_s", ("cache",), 0, 1e9) if "ttl_s" in m else 0.0


def _split(doc: _Doc, data: Mapping[str, Any], salt: str, champion: Target) -> Split | None:
    items = _list(doc, data, "challengers")
    if not items:
        return None
    arms: list[Arm] = []
    sticky_keys: set[str | None] = set()
    total = 0
    for i, item in enumerate(items):
        path: Path_ = ("challengers", i)
        target = _target(doc, item, path, frozenset({"weight", "sticky"}))
        if "weight" not in item:
            raise doc.error(path, "'weight' (percent of traffic, 0-100) is required")
        weight = _number(doc, item, "weight", path, 0, 100)
        buckets = round(weight * BUCKETS / 100)
        if abs(buckets - weight * BUCKETS / 100) > 1e-6:
            raise doc.error((*path, "weight"), "at most two decimals (10,000 buckets)")
        if target == champion:
            raise doc.error(path, f"{target} is already the champion")
        if any(a.target == target for a in arms):
            raise doc.error(path, f"{target} is listed twice")
        sticky = item.get("sticky")
        if sticky is not None and (not isinstance(sticky, str) or not sticky):
            raise doc.error((*path, "sticky"), "expected a request field such as entity_id")
        sticky_keys.add(sticky)
        total += buckets
        arms.append(Arm(f"challenger:{target}", target, buckets))
    if len(sticky_keys) > 1:
        raise doc.error(("challengers",), "every challenger must use the same 'sticky' key")
    if total > BUCKETS:
        raise doc.error(("challengers",), f"weights add up to {total / 100:g} % (over 100)")
    return Split.layout(
        salt=salt,
        champion=Arm("champion", champion, BUCKETS - total),
        challengers=tuple(arms),
        sticky=sticky_keys.pop(),
    )


def _segment(doc: _Doc, value: Any, i: int) -> Segment:
    path: Path_ = ("segments", i)
    target = _target(doc, value, path, frozenset({"match", "name"}))
    match = value.get("match")
    if not isinstance(match, Mapping) or not match:
        where = (*path, "match") if "match" in value else path
        raise doc.error(where, "'match' must map context fields to a value or list of values")
    _check_match_text(doc, doc.nodes.get((*path, "match")), (*path, "match"))
    allowed = {str(k): tuple(v) if isinstance(v, list) else (v,) for k, v in match.items()}
    return Segment(str(value.get("name") or i), MappingProxyType(allowed), target)


#: The plain numbers that read as they are written; YAML 1.1 also takes 0123 (octal),
#: 0x1f, 1_000, 12:30 (base 60) and .inf as numbers.
_PLAIN_INT = re.compile(r"[-+]?(0|[1-9][0-9]*)")
_PLAIN_FLOAT = re.compile(r"[-+]?[0-9]*\.[0-9]*([eE][-+]?[0-9]+)?")


def _misread(node: yaml.Node, key: bool) -> str | None:
    """Why YAML 1.1 reads this plain scalar as something other than its text, if it does.

    Segment values are compared with request context (JSON strings, mostly): ``NO`` (Norway)
    read as false, ``off`` as false, ``01234`` as octal 668 or ``12:30`` as 750 never match
    what a client sends, and the segment silently stops matching. Quoted scalars are text.
    Plain ``true``/``false`` stay booleans for values (JSON context has them), never for
    keys (context keys are strings: ``True`` would match nothing).
    """
    if not isinstance(node, yaml.ScalarNode) or node.style is not None:
        return None
    tag = node.tag.rsplit(":", 1)[-1]
    if tag == "null":
        return "reads as null (no value)"
    if tag == "bool" and (key or node.value.lower() not in ("true", "false")):
        return f"reads as the boolean {yaml.safe_load(node.value)!r} in YAML 1.1"
    plain = {"int": _PLAIN_INT, "float": _PLAIN_FLOAT}.get(tag)
    if plain is not None and not plain.fullmatch(node.value):
        return f"reads as the number {yaml.safe_load(node.value)!r} in YAML 1.1"
    return None


def _check_match_text(doc: _Doc, node: yaml.Node | None, path: Path_) -> None:
    """Refuse segment keys and values that YAML 1.1 does not read as written (_misread)."""
    if not isinstance(node, yaml.MappingNode):
        return
    for key, value in node.value:
        sub = (*path, str(key.value))
        checks: list[tuple[yaml.Node, Path_, bool]] = [(key, sub, True)]
        if isinstance(value, yaml.SequenceNode):
            checks += [(item, (*sub, i), False) for i, item in enumerate(value.value)]
        else:
            checks.append((value, sub, False))
        for item, where, is_key in checks:
            why = _misread(item, is_key)
            if why is not None:
                raise doc.error_at(
                    item, where, f"{item.value!r} {why}; quote it ('{item.value}') to match text"
                )


def _shadow(doc: _Doc, value: Any, i: int) -> Shadow:
    path: Path_ = ("shadow", i)
    target = _target(doc, value, path, frozenset({"sample"}))
    sample = _number(doc, value, "sample", path, 0, 1) if "sample" in value else 1.0
    return Shadow(target, sample)


def _fallback(doc: _Doc, value: Any) -> Fallback:
    if value is None:
        return Fallback()
    path: Path_ = ("fallback",)
    m = _mapping(doc, value, path, _TARGET_KEYS | {"cache_ttl_s", "default"})
    default = m.get("default")
    if default is not None and not isinstance(default, Mapping):
        raise doc.error((*path, "default"), "expected a mapping such as {score: 0.5}")
    has_target = "target" in m or "version" in m
    return Fallback(
        target=_target(doc, {k: m.get(k) for k in _TARGET_KEYS}, path) if has_target else None,
        cache_ttl_s=_number(doc, m, "cache_ttl_s", path, 0, 1e9) if "cache_ttl_s" in m else 0.0,
        default=MappingProxyType(dict(default)) if default is not None else None,
    )


def _slo(doc: _Doc, value: Any) -> Slo:
    if value is None:
        return Slo()
    path: Path_ = ("slo",)
    m = _mapping(doc, value, path, {"p99_ms", "error_rate", "deadline_ms"})
    return Slo(
        p99_ms=_number(doc, m, "p99_ms", path, 0, 1e9) if "p99_ms" in m else None,
        error_rate=_number(doc, m, "error_rate", path, 0, 1) if "error_rate" in m else None,
        deadline_ms=int(_number(doc, m, "deadline_ms", path, 1, 1e9))
        if "deadline_ms" in m
        else None,
    )


# -- the table ----------------------------------------------------------------------------


def check_targets(route: Route, catalog: ModelCatalog) -> None:
    """Every target must be a model version the repository holds (its manifest is known)."""
    for target in sorted(route.targets(), key=str):
        try:
            catalog.schema(target.model, target.version)
        except Exception as exc:
            raise RouteError(f"{route.source}: {target}: {exc}") from exc


def load_route_table(
    routes_dir: Path, catalog: ModelCatalog | None = None, sticky_secret: str = ""
) -> RouteTable:
    """Read and validate every `*.yaml` in the directory; raises RouteError on the first bad one."""
    routes: dict[str, Route] = {}
    for path in sorted(routes_dir.glob("*.yaml")):
        if path.is_symlink() and not path.exists():
            # A ConfigMap key being removed: the kubelet swaps `..data` first and deletes the
            # key's symlink after, so for a moment it points at nothing. The key is gone.
            continue
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise RouteError(f"{path}: cannot read: {exc}") from exc
        route = parse_route(content, str(path), sticky_secret)
        if route.name in routes:
            raise RouteError(
                f"{path}: model {route.name!r} already routed by {routes[route.name].source}"
            )
        if catalog is not None:
            check_targets(route, catalog)
        routes[route.name] = route
    if not routes:
        raise RouteError(f"{routes_dir}: no route files (*.yaml)")
    return RouteTable(MappingProxyType(routes), catalog or ModelCatalog({}))


class RouteTableRef:
    """The live table. Readers take `.current` once per request; a reload replaces it whole."""

    def __init__(self, table: RouteTable) -> None:
        self.current = table

    def swap(self, table: RouteTable) -> RouteTable:
        old, self.current = self.current, table
        return old
