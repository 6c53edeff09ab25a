"""Settings: `configs/gateway.yaml`, then `SWITCHYARD__SECTION__FIELD` env vars, then overrides.

All settings are frozen dataclasses grouped by section. Unknown keys are errors, so a typo in
the YAML fails at start-up rather than silently using a default.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ENV_PREFIX = "SWITCHYARD__"


class ConfigError(ValueError):
    """The settings file or environment holds a value the gateway cannot use."""


@dataclass(frozen=True)
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = 8080
    max_body_bytes: int = 1 << 20
    max_batch_items: int = 256
    shutdown_timeout_s: float = 10.0


@dataclass(frozen=True)
class TritonSettings:
    grpc_url: str = "127.0.0.1:8001"
    http_url: str = "http://127.0.0.1:8000"
    metrics_url: str = "http://127.0.0.1:8002/metrics"
    #: Budget for control-plane calls (metadata, readiness), which have no request deadline.
    control_timeout_s: float = 2.0


@dataclass(frozen=True)
class RoutingSettings:
    routes_dir: Path = Path("configs/routes")
    model_repository: Path = Path("model_repository")
    default_deadline_ms: int = 1000
    max_deadline_ms: int = 30_000


@dataclass(frozen=True)
class PredlogSettings:
    spool_dir: Path = Path("var/spool")
    buffer_size: int = 10_000
    flush_interval_s: float = 0.05
    fsync: bool = False


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    json: bool = True


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    triton: TritonSettings = field(default_factory=TritonSettings)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    predlog: PredlogSettings = field(default_factory=PredlogSettings)
    log: LogSettings = field(default_factory=LogSettings)

    def resolve_paths(self, base: Path) -> Settings:
        """Relative paths in a settings file are relative to the working directory's root."""
        return _map_paths(self, lambda p: p if p.is_absolute() else (base / p))


def load_settings(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
    **overrides: Any,
) -> Settings:
    """Build Settings from a YAML file, env vars and keyword overrides (in rising precedence).

    Overrides are named ``section_field`` (``triton_grpc_url=...``); bare server fields
    (``port``, ``host``) need no prefix.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read settings file {path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = loaded
    for key, value in (os.environ if env is None else env).items():
        if key.startswith(ENV_PREFIX):
            section, _, name = key[len(ENV_PREFIX) :].lower().partition("__")
            data.setdefault(section, {})[name] = yaml.safe_load(value)
    for key, value in overrides.items():
        if value is None:
            continue
        section, name = _split_override(key)
        data.setdefault(section, {})[name] = value
    settings = _build(Settings, data, "settings")
    return settings.resolve_paths(base_dir or Path.cwd())


def _split_override(key: str) -> tuple[str, str]:
    sections = {f.name for f in dataclasses.fields(Settings)}
    head, _, rest = key.partition("_")
    if head in sections and rest:
        return head, rest
    return "server", key


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, where)
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list")
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    try:
        if tp is Path:
            return Path(value)
        if tp is bool:
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        if tp in (int, float, str):
            if tp is not str and isinstance(value, bool):
                raise TypeError("booleans are not numbers")
            return tp(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {value!r} is not a valid {tp.__name__}") from exc
    return value


def _map_paths(obj: Any, fn: typing.Callable[[Path], Path]) -> Any:
    changes = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, Path):
            changes[f.name] = fn(value)
        elif dataclasses.is_dataclass(value):
            changes[f.name] = _map_paths(value, fn)
    return dataclasses.replace(obj, **changes)
