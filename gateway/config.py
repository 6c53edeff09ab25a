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

from gateway.batching import BatchingPolicy
from gateway.drift.tracker import DriftPolicy
from gateway.resilience.admission import AdmissionLimits
from gateway.resilience.breaker import BreakerPolicy
from gateway.resilience.fallback import FallbackPolicy
from gateway.resilience.retry import RetryPolicy
from gateway.rollout.analysis import PromotionPolicy

ENV_PREFIX = "SWITCHYARD__"


class ConfigError(ValueError):
    """The settings file or environment holds a value the gateway cannot use."""


@dataclass(frozen=True)
class ServerSettings:
    #: Loopback unless told otherwise: the image (compose, Kubernetes) sets 0.0.0.0 by env.
    host: str = "127.0.0.1"
    port: int = 8080
    #: The OIP gRPC server (KServe v2 GRPCInferenceService) on the same host; 0: none.
    grpc_port: int = 8081
    max_body_bytes: int = 1 << 20
    max_batch_items: int = 256
    shutdown_timeout_s: float = 10.0


@dataclass(frozen=True)
class ServerSpec:
    """One Triton server of the pool. ``models`` empty: it is asked for every model."""

    name: str
    grpc_url: str
    models: tuple[str, ...] = ()


@dataclass(frozen=True)
class TritonSettings:
    grpc_url: str = "127.0.0.1:8001"
    http_url: str = "http://127.0.0.1:8000"
    metrics_url: str = "http://127.0.0.1:8002/metrics"
    #: Budget for control-plane calls (metadata, readiness), which have no request deadline.
    control_timeout_s: float = 2.0
    #: The pool of servers; empty: one server named "triton" at grpc_url.
    servers: tuple[ServerSpec, ...] = ()
    #: Models the local stack (`python -m gateway up`) serves from its own fallback Triton.
    fallback_models: tuple[str, ...] = ("risk_distilled",)
    health_interval_s: float = 0.5
    health_timeout_s: float = 0.5

    def server_specs(self) -> tuple[ServerSpec, ...]:
        return self.servers or (ServerSpec("triton", self.grpc_url),)


@dataclass(frozen=True)
class ResilienceSettings:
    """Breakers, retries, admission control and the fallback ladder (gateway/resilience)."""

    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    admission: AdmissionLimits = field(default_factory=AdmissionLimits)
    fallback: FallbackPolicy = field(default_factory=FallbackPolicy)
    #: In-process LRU of answers by input hash (cache rung, response cache); Redis behind it
    #: when redis.url is set.
    cache_max_entries: int = 10_000
    cache_redis_timeout_s: float = 0.02


@dataclass(frozen=True)
class RoutingSettings:
    routes_dir: Path = Path("configs/routes")
    model_repository: Path = Path("model_repository")
    default_deadline_ms: int = 1000
    max_deadline_ms: int = 30_000
    #: A route's default deadline is its slo.deadline_ms, else this many times slo.p99_ms.
    slo_deadline_factor: float = 2.0
    #: How often the routes directory is polled for edits (SIGHUP reloads at once).
    reload_interval_s: float = 0.5
    reload_on_sighup: bool = True
    #: Load a routed version missing from Triton through its model-control API (explicit mode).
    load_versions: bool = True
    #: Budget for loading a version and running its manifest probe before it may take traffic.
    readiness_timeout_s: float = 60.0
    #: Route a version (reload, `routes set-weight`, the rollout controller) only with a
    #: passing `models validate` report for its content (`<model>/validation/<N>.json`). Off
    #: by default: reports need a live Triton, so the shipped versions carry none.
    require_validation: bool = False
    #: Shadow copies in flight at once; more are dropped (and counted), never queued.
    shadow_max_in_flight: int = 64
    shadow_timeout_s: float = 2.0
    #: Secret keying the sticky-split buckets (same on every replica); from the environment
    #: (SWITCHYARD__ROUTING__STICKY_SALT) or a file, never the YAML. Empty: the route name.
    sticky_salt: str = ""
    sticky_salt_file: Path | None = None


@dataclass(frozen=True)
class RedisSettings:
    #: Empty: no Redis; the prediction log stays in the on-disk spool, and features/feedback
    #: answer 503.
    url: str = ""
    connect_timeout_s: float = 0.5
    socket_timeout_s: float = 1.0


@dataclass(frozen=True)
class PredlogSettings:
    spool_dir: Path = Path("var/spool")
    buffer_size: int = 10_000
    flush_interval_s: float = 0.05
    fsync: bool = False
    batch_size: int = 500
    stream_prefix: str = "predictions"
    #: Approximate stream length kept per model (XADD MAXLEN ~); 0 keeps everything.
    maxlen: int = 1_000_000
    #: How long a request_id is remembered to make spool replays idempotent.
    dedupe_ttl_s: int = 86_400
    retry_interval_s: float = 1.0
    segment_bytes: int = 16 << 20
    #: With Redis, the spool is a write-ahead log: a segment this old is sealed, then deleted
    #: once all its entries are confirmed in Redis.
    segment_max_age_s: float = 1.0
    #: Share of entries that carry the full (redacted) input payload.
    sample_rate: float = 0.0
    #: Key for hashing redacted fields, so low-entropy ids cannot be looked up by brute force.
    #: From the environment (SWITCHYARD__PREDLOG__REDACT_SALT) or redact_salt_file.
    redact_salt: str = ""
    redact_salt_file: Path | None = Path("var/secrets/redact_salt")
    #: Redaction on, no salt anywhere: generate one into redact_salt_file (one host); false:
    #: refuse to start instead.
    generate_redact_salt: bool = True
    #: Hashed in every model's entries, on top of each policy's own `hash` list.
    hash_always: tuple[str, ...] = ("entity_id",)
    #: The only context keys a sampled payload keeps; the rest (free text) never reach the log.
    context_allow: tuple[str, ...] = ("segment", "channel", "deadline_ms")
    #: Per public model name: {hash: [field...], drop: [field...], sample_rate: x}.
    policies: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FeaturesSettings:
    key_prefix: str = "features"
    timeout_ms: float = 20.0
    cache_ttl_s: float = 1.0
    cache_size: int = 10_000


@dataclass(frozen=True)
class FeedbackSettings:
    label_prefix: str = "label"
    label_ttl_s: int = 30 * 86_400
    #: Take a label only for a request id this deployment answered: the prediction log sets
    #: <answered_prefix>:<request_id> with each entry it writes (one small key per answer).
    require_answered: bool = True
    answered_prefix: str = "answered"
    #: How long after its answer a request id can still take a label.
    answered_ttl_s: int = 86_400
    #: Continuous label join inside the gateway; 0 disables it.
    join_interval_s: float = 0.0
    join_window_s: float = 86_400.0


@dataclass(frozen=True)
class RolloutSettings:
    """The metric-gated canary controller (`python -m gateway promote`, gateway/rollout)."""

    policy: PromotionPolicy = field(default_factory=PromotionPolicy)
    #: Seconds between evaluations in loop mode.
    interval_s: float = 60.0
    #: Decision records: <record_dir>/<model>.jsonl, one JSON line per evaluation.
    record_dir: Path = Path("var/rollout")
    #: Redis keys: <key_prefix>:lease|fence|written|audit:<model>.
    key_prefix: str = "rollout"
    #: The one-controller lease lives this long unless renewed (every evaluation renews it).
    lease_ttl_s: float = 180.0
    #: Audit stream length (approximate MAXLEN).
    audit_maxlen: int = 10_000


@dataclass(frozen=True)
class TelemetrySettings:
    #: Scrape Triton's metrics endpoint for batch fill and queue time; 0 disables it.
    triton_scrape_interval_s: float = 5.0
    gpu: bool = True


@dataclass(frozen=True)
class AuthSettings:
    """API keys with scopes and rate limits (gateway/security). Off: every caller is
    "anonymous" with every scope, as before."""

    enabled: bool = False
    #: Hashes, scopes, rates, tenants (`python -m gateway keys create`); re-read on change.
    keys_file: Path = Path("var/auth/keys.yaml")
    reload_interval_s: float = 0.5
    #: /metrics needs an admin key (give Prometheus one); off: open like the health checks.
    protect_metrics: bool = False
    #: /v2 model metadata needs a read key.
    protect_metadata: bool = False
    #: Shared rate per tenant: {tenant: requests_per_s} or {tenant: {rate, burst}}; the key
    #: file's own `tenants:` section wins over this.
    tenants: Mapping[str, Any] = field(default_factory=dict)
    #: Redis keys of the limiter: <prefix>:{t:<tenant>}:... (redis.url; none: per process).
    ratelimit_prefix: str = "rl"
    #: Slower than this, or unreachable: the per-process limiter decides.
    ratelimit_timeout_s: float = 0.1
    ratelimit_retry_interval_s: float = 1.0


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
    redis: RedisSettings = field(default_factory=RedisSettings)
    features: FeaturesSettings = field(default_factory=FeaturesSettings)
    feedback: FeedbackSettings = field(default_factory=FeedbackSettings)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    #: Live inputs against each version's training histograms (gateway/drift).
    drift: DriftPolicy = field(default_factory=DriftPolicy)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    resilience: ResilienceSettings = field(default_factory=ResilienceSettings)
    #: Coalescing of concurrent single-row calls per target (gateway/batching.py).
    batching: BatchingPolicy = field(default_factory=BatchingPolicy)
    auth: AuthSettings = field(default_factory=AuthSettings)
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
            # SECTION__KEY, or deeper (RESILIENCE__FALLBACK__LATENCY__P99_MS): one leaf
            # changes and the rest of the file's mapping stays.
            *parents, name = key[len(ENV_PREFIX) :].lower().split("__")
            node = data
            for part in parents:
                child = node.get(part)
                copy = dict(child) if isinstance(child, dict) else {}
                node[part] = copy
                node = copy
            # An empty value means an empty string (e.g. "no Redis"), not YAML null.
            node[name] = yaml.safe_load(value) if value else ""
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
