"""Route files -> an immutable, validated RouteTable, swapped atomically on reload.

One YAML file per public model name (`configs/routes/<model>.yaml`). `policy_version` is the
content hash of the file, so every answer names the exact policy that produced it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from gateway.catalog import ModelCatalog
from gateway.errors import ModelNotFound


class RouteError(ValueError):
    """A route file that cannot be used; the message names the file and field."""


@dataclass(frozen=True, slots=True)
class Target:
    model: str
    version: str

    def __str__(self) -> str:
        return f"{self.model}@{self.version}"


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
class Route:
    name: str
    champion: Target
    policy_version: str
    source: str
    fallback: Fallback = field(default_factory=Fallback)
    slo: Slo = field(default_factory=Slo)
    raw: Mapping[str, Any] = field(default_factory=dict)

    @property
    def deadline_ms(self) -> int | None:
        return self.slo.deadline_ms


@dataclass(frozen=True, slots=True)
class RouteTable:
    routes: Mapping[str, Route]

    def get(self, name: str) -> Route:
        try:
            return self.routes[name]
        except KeyError:
            raise ModelNotFound(
                f"no route for model {name!r}", details={"known": sorted(self.routes)}
            ) from None


def policy_version(content: bytes) -> str:
    return "routes@" + hashlib.sha256(content).hexdigest()[:12]


def _target(value: Any, where: str) -> Target:
    if not isinstance(value, Mapping) or "target" not in value or "version" not in value:
        raise RouteError(f"{where}: expected {{target: <model>, version: <n>}}")
    return Target(str(value["target"]), str(value["version"]))


def parse_route(content: bytes, source: str) -> Route:
    try:
        data = yaml.safe_load(content)
    except yaml.YAMLError as exc:
        raise RouteError(f"{source}: invalid YAML: {exc}") from exc
    if not isinstance(data, Mapping) or "model" not in data or "champion" not in data:
        raise RouteError(f"{source}: a route needs 'model' and 'champion'")
    return Route(
        name=str(data["model"]),
        champion=_target(data["champion"], f"{source}: champion"),
        policy_version=policy_version(content),
        source=source,
        fallback=_fallback(data.get("fallback"), f"{source}: fallback"),
        slo=_slo(data.get("slo"), f"{source}: slo"),
        raw=MappingProxyType(dict(data)),
    )


def _fallback(value: Any, where: str) -> Fallback:
    if value is None:
        return Fallback()
    if not isinstance(value, Mapping):
        raise RouteError(f"{where}: expected a mapping")
    default = value.get("default")
    if default is not None and not isinstance(default, Mapping):
        raise RouteError(f"{where}.default: expected a mapping such as {{score: 0.5}}")
    return Fallback(
        target=_target(value, where) if "target" in value else None,
        cache_ttl_s=float(value.get("cache_ttl_s", 0)),
        default=MappingProxyType(dict(default)) if default is not None else None,
    )


def _slo(value: Any, where: str) -> Slo:
    if value is None:
        return Slo()
    if not isinstance(value, Mapping):
        raise RouteError(f"{where}: expected a mapping")
    try:
        return Slo(
            p99_ms=float(value["p99_ms"]) if "p99_ms" in value else None,
            error_rate=float(value["error_rate"]) if "error_rate" in value else None,
            deadline_ms=int(value["deadline_ms"]) if "deadline_ms" in value else None,
        )
    except (TypeError, ValueError) as exc:
        raise RouteError(f"{where}: {exc}") from exc


def load_route_table(routes_dir: Path, catalog: ModelCatalog | None = None) -> RouteTable:
    """Read and validate every `*.yaml` in the directory; raises RouteError on the first bad one."""
    routes: dict[str, Route] = {}
    for path in sorted(routes_dir.glob("*.yaml")):
        route = parse_route(path.read_bytes(), str(path))
        if route.name in routes:
            raise RouteError(
                f"{path}: model {route.name!r} already routed by {routes[route.name].source}"
            )
        if catalog is not None:
            try:
                catalog.schema(route.champion.model, route.champion.version)
            except Exception as exc:
                raise RouteError(f"{path}: champion: {exc}") from exc
        routes[route.name] = route
    if not routes:
        raise RouteError(f"{routes_dir}: no route files (*.yaml)")
    return RouteTable(MappingProxyType(routes))


class RouteTableRef:
    """The live table. Readers take `.current` once per request; a reload replaces it whole."""

    def __init__(self, table: RouteTable) -> None:
        self.current = table

    def swap(self, table: RouteTable) -> RouteTable:
        old, self.current = self.current, table
        return old
