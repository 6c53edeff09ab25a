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
class Route:
    name: str
    champion: Target
    policy_version: str
    source: str
    deadline_ms: int | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)


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
    slo = data.get("slo") or {}
    deadline = slo.get("deadline_ms") if isinstance(slo, Mapping) else None
    return Route(
        name=str(data["model"]),
        champion=_target(data["champion"], f"{source}: champion"),
        policy_version=policy_version(content),
        source=source,
        deadline_ms=int(deadline) if deadline is not None else None,
        raw=MappingProxyType(dict(data)),
    )


def load_route_table(routes_dir: Path, catalog: ModelCatalog | None = None) -> RouteTable:
    """Read and validate every `*.yaml` in the directory; raises RouteError on the first bad one."""
    routes: dict[str, Route] = {}
    for path in sorted(routes_dir.glob("*.yaml")):
        route = parse_route(path.read_bytes(), str(path))
        if route.name in routes:
            raise RouteError(f"{path}: model {route.name!r} already routed by {routes[route.name].source}")
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
