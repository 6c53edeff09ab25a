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

from gateway.access_log import AccessLogPolicy
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
    #: On SIGTERM: stop accepting, then this long for accepted connections to send their
    #: request (answered within shutdown_timeout_s) before idle ones are closed.
    drain_grace_s: float = 0.5
    #: TLS on REST and gRPC alike (gateway/tls.py): both set, or neither (plaintext).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    #: mTLS: clients must present a certificate signed by this CA.
    tls_client_ca_file: Path | None = None
    #: JSON bodies nesting deeper get 400 json_too_deep (gateway/api/limits.py).
    max_json_depth: int = 32
    #: aiohttp's parser limits: the request line, one header field, the header count.
    max_line_bytes: int = 8190
    max_header_bytes: int = 8190
    max_headers: int = 128
    #: A body not fully received this long after its headers: 408 and the connection closes.
    body_read_timeout_s: float = 10.0
    #: A connection without a request head this long after it opened or after its last
    #: answer (idle, or sending half a header) is closed (gateway/api/limits.py). Above the
    #: 60 s idle timeout of common proxies and load balancers (ingress-nginx's upstream
    #: keep-alive, AWS ALB), which must close a pooled connection before we do, or they send
    #: a request into one we are closing and answer 502; far below aiohttp's default hour.
    keepalive_timeout_s: float = 75.0
    #: Open connections served per process; a request on one past the cap: 503 and close.
    #: 0: no cap. backlog: the kernel's queue of connections not yet accepted.
    max_connections: int = 4096
    backlog: int = 128


@dataclass(frozen=True)
class ServerSpec:
    """One Triton server of the pool. ``models`` empty: it is asked for every model.

    ``dns: host:port`` instead of ``grpc_url`` makes it a set of servers: every address the
    name resolves to (a headless Service: one per pod), re-resolved every
    ``triton.dns_interval_s``; members are named ``<name>/<address>``."""

    name: str
    grpc_url: str = ""
    models: tuple[str, ...] = ()
    dns: str = ""
    #: Triton's /metrics for load-aware routing; for dns members, this port on each address.
    metrics_url: str = ""
    metrics_port: int = 8002
    #: Triton's HTTP endpoint, for ``triton.infer_protocol: http``.
    http_url: str = ""


@dataclass(frozen=True)
class TritonSettings:
    grpc_url: str = "127.0.0.1:8001"
    #: The default server's HTTP endpoint; "" (unset): it infers over gRPC.
    http_url: str = ""
    metrics_url: str = "http://127.0.0.1:8002/metrics"
    #: Budget for control-plane calls (metadata, readiness), which have no request deadline.
    control_timeout_s: float = 2.0
    #: The pool of servers; empty: one server named "triton" at grpc_url.
    servers: tuple[ServerSpec, ...] = ()
    #: Models the local stack (`python -m gateway up`) serves from its own fallback Triton.
    fallback_models: tuple[str, ...] = ("risk_distilled",)
    health_interval_s: float = 0.5
    health_timeout_s: float = 0.5
    #: TLS to every Triton gRPC server: the CA that signed their certificates (set: TLS on);
    #: a client certificate and key for mTLS; the name to check when it is not the host's.
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_server_name: str = ""
    #: How the pool picks a server: load_aware (power of two choices on Triton's queue and
    #: timings plus in-flight) or least_in_flight (this gateway's own count only).
    routing: str = "load_aware"
    load_scrape_interval_s: float = 0.25
    load_scrape_timeout_s: float = 0.2
    #: `dns:` servers are re-resolved this often; vanished addresses drain.
    dns_interval_s: float = 5.0
    #: More servers from a YAML list ({name, grpc_url, models, metrics_url}, a ConfigMap key),
    #: re-read every dns_interval_s: entries join and (removed) drain without a restart.
    servers_file: Path | None = None
    #: Client-side maximum connection age: a member's channel is renewed after this long, so
    #: new replicas behind a Service get traffic (0: never).
    max_channel_age_s: float = 300.0
    #: The hot path's transport to Triton: "http" for Triton's HTTP endpoint with binary
    #: tensors (gateway/backends/triton_http.py: 16-22 % less gateway CPU per request), or
    #: "grpc". Over http a member infers at its ``http_url`` (the default server:
    #: ``triton.http_url``), and its health probe asks that endpoint too; members without one
    #: (unset, dns members) and every member when Triton TLS is on (Triton's HTTP endpoint has
    #: no TLS) infer over gRPC. Control calls are always gRPC.
    infer_protocol: str = "http"

    def __post_init__(self) -> None:
        if self.infer_protocol not in ("grpc", "http"):
            raise ConfigError("triton.infer_protocol must be grpc or http")

    def server_specs(self) -> tuple[ServerSpec, ...]:
        return self.servers or (ServerSpec("triton", self.grpc_url, http_url=self.http_url),)

    def infer_http_url(self, spec: ServerSpec) -> str:
        """Where this member's infer calls go over HTTP; "" for gRPC."""
        if self.infer_protocol != "http" or self.tls_ca_file is not None:
            return ""
        return spec.http_url


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
    #: redis:// or rediss:// (TLS). A password in the settings file's url is refused: it comes
    #: from the environment (SWITCHYARD_REDIS_PASSWORD, or this url set by env) or
    #: password_file (gateway/redis_conn.py).
    url: str = ""
    connect_timeout_s: float = 0.5
    socket_timeout_s: float = 1.0
    password_file: Path | None = None
    #: rediss:// with a private CA: its certificate (default: the system's trust store).
    tls_ca_file: Path | None = None
    #: `url` is one node of a Redis Cluster: every client is a RedisCluster (hash-tagged keys,
    #: single-slot scripts).
    cluster: bool = False


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
    #: Unused since the high-water-mark dedupe (kept so old configs still parse).
    dedupe_ttl_s: int = 86_400
    retry_interval_s: float = 1.0
    segment_bytes: int = 16 << 20
    #: With Redis, the spool is a write-ahead log: a segment this old is sealed, then deleted
    #: once all its entries are confirmed in Redis.
    segment_max_age_s: float = 1.0
    #: Keep a confirmed segment this long before deleting it, then check that Redis still has
    #: its entries (its high-water marks) and replay it if not: covers a Redis crash that loses
    #: its last `appendfsync everysec` second. 0: delete once confirmed.
    keep_confirmed_s: float = 0.0
    #: Look for segments of dead siblings (same spool_dir) this often while Redis is healthy.
    orphan_scan_interval_s: float = 1.0
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
class ArchiveSettings:
    """`python -m gateway predlog archive`: the prediction streams as Parquet (docs/archive.md)."""

    #: Local archive directory, used when `url` is empty.
    dir: Path = Path("var/archive")
    #: An fsspec URL instead (s3://bucket/prefix, gcs://..., memory://...); needs fsspec and
    #: the protocol's package installed.
    url: str = ""
    #: Consumer group and consumer name on every predictions:<model> stream. One archiver at
    #: a time (the CronJob forbids overlap): exactly-once relies on one consumer's pending list.
    group: str = "archiver"
    consumer: str = "archiver"
    #: Entries per XREADGROUP, hence at most this many rows per Parquet file.
    batch_size: int = 10_000
    #: Per-prediction rows (inputs: input_hash, sampled payloads) and daily aggregates: a
    #: date partition is deleted once its whole day is older than this many days.
    inputs_retention_days: int = 14
    aggregates_retention_days: int = 30
    #: XTRIM MINID below what is archived and acked, keeping at least this many seconds in
    #: Redis (the label join and the rollout window read the stream). < 0: never trim.
    trim_keep_s: float = 86_400.0
    #: Loop mode (without --once): seconds between runs.
    interval_s: float = 300.0
    #: Join labels (label:<request_id>) into the daily aggregates when they are rebuilt.
    aggregate_labels: bool = True
    #: The archiver's Redis socket timeout (redis.socket_timeout_s is sized for the request
    #: path; one XREADGROUP of batch_size entries takes longer).
    socket_timeout_s: float = 30.0


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
    #: Redis keys: <key_prefix>:lease|fence|written|since|audit:<model>.
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
    #: OpenTelemetry traces over OTLP/HTTP to this collector (e.g. http://127.0.0.1:4318;
    #: /v1/traces is added); empty: no tracing at all. `up` points Triton at it too.
    otlp_endpoint: str = ""
    #: Share of requests without a caller's traceparent that are traced (parent-based: a
    #: sampled traceparent is always traced, an unsampled one never).
    sample_ratio: float = 1.0
    service_name: str = "switchyard"
    #: Spans are exported in batches at most this far apart (gateway and Triton alike).
    export_delay_ms: int = 1000

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ConfigError("telemetry.sample_ratio must be within [0, 1]")
        if self.otlp_endpoint and not self.otlp_endpoint.startswith(("http://", "https://")):
            raise ConfigError("telemetry.otlp_endpoint must be an http(s):// URL")


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
class AuditSettings:
    """Who changed a route, a weight or a key (gateway/audit.py): a Redis stream and the
    log; without Redis (or while it is down) a local JSONL file instead of the stream."""

    enabled: bool = True
    stream: str = "audit"
    #: Approximate entries kept in the stream (XADD MAXLEN ~).
    maxlen: int = 100_000
    local_file: Path = Path("var/audit/audit.jsonl")


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    json: bool = True
    #: Which requests get an access line (gateway/access_log.py): errors and slow ones
    #: always, fast successes up to a per-second budget (default: every request).
    access: AccessLogPolicy = field(default_factory=AccessLogPolicy)


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    triton: TritonSettings = field(default_factory=TritonSettings)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    predlog: PredlogSettings = field(default_factory=PredlogSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    features: FeaturesSettings = field(default_factory=FeaturesSettings)
    feedback: FeedbackSettings = field(default_factory=FeedbackSettings)
    archive: ArchiveSettings = field(default_factory=ArchiveSettings)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    #: Live inputs against each version's training histograms (gateway/drift).
    drift: DriftPolicy = field(default_factory=DriftPolicy)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    resilience: ResilienceSettings = field(default_factory=ResilienceSettings)
    #: Coalescing of concurrent single-row calls per target (gateway/batching.py).
    batching: BatchingPolicy = field(default_factory=BatchingPolicy)
    auth: AuthSettings = field(default_factory=AuthSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
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
        _refuse_file_secrets(data, path)
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
            # Kept raw: only the target field's type knows how to read it (_coerce).
            node[name] = _EnvText(value, key)
    for key, value in overrides.items():
        if value is None:
            continue
        section, name = _split_override(key)
        data.setdefault(section, {})[name] = value
    settings = _build(Settings, data, "settings")
    return settings.resolve_paths(base_dir or Path.cwd())


def _refuse_file_secrets(data: Mapping[str, Any], path: str | Path) -> None:
    """Settings files are committed, copied and logged: a Redis password has no place there."""
    from urllib.parse import urlsplit

    redis = data.get("redis")
    url = redis.get("url") if isinstance(redis, Mapping) else None
    try:
        has_password = isinstance(url, str) and urlsplit(url).password is not None
    except ValueError:
        has_password = False  # a malformed url fails where it is used, with its own error
    if has_password:
        raise ConfigError(
            f"{path}: redis.url carries a password; settings files are not secret: set "
            "SWITCHYARD_REDIS_PASSWORD or a file named by redis.password_file instead"
        )


class _EnvText(str):
    """An environment variable's raw value, with the variable's name for error messages.

    Parsed by the field it lands in, not up front as YAML: YAML 1.1 reads a secret such as
    ``0123`` as octal 83, ``12:30:00`` as 45000 and cuts ``s3cr3t #x`` at the comment, so the
    same salt given by env and by its *_FILE variant (read raw) would differ between replicas.
    Only structured fields (lists, mappings, sections) are YAML.
    """

    var: str

    def __new__(cls, value: str, var: str) -> _EnvText:
        self = super().__new__(cls, value)
        self.var = var
        return self


#: The only spellings a boolean setting takes; anything else (``enable``, ``Y``, ``ture``)
#: is an error, because reading it as false would turn auth or the validation gate off.
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


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
    if isinstance(value, _EnvText):
        return _coerce_env(tp, value, where)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (value == "" and args[0] is Path):
            # An empty optional path means "none": Path("") would be the working directory.
            return None
        return _coerce(args[0], value, where)
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list")
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    try:
        if tp is Path:
            if value == "":
                raise ValueError("an empty path would mean the working directory")
            return Path(value)
        if tp is bool:
            return _coerce_bool(value)
        if tp in (int, float, str):
            if tp is not str and isinstance(value, bool):
                raise TypeError("booleans are not numbers")
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError("not a whole number")  # int() would truncate 99.9 to 99
            return tp(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {value!r} is not a valid {tp.__name__} ({exc})") from exc
    return value


def _coerce_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise ValueError("use true/false, 1/0, yes/no or on/off")


def _coerce_env(tp: Any, value: _EnvText, where: str) -> Any:
    """One environment variable's raw text as the field's type; errors name the variable."""
    origin = typing.get_origin(tp)
    raw = str(value)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw == "" and args[0] is Path:
            return None
        tp = args[0]
    elif tp in (str, int, float, bool, Path):
        pass
    else:
        # Structured (a list, a mapping, a whole section): YAML, as in the settings file.
        # An empty value stays "", which the field then refuses with its own error.
        try:
            parsed = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{value.var}: not valid YAML: {exc}") from exc
        return _coerce(tp, parsed, f"{where} ({value.var})")
    if tp is str:
        # Raw text, but a value quoted whole is a YAML string and means what is inside:
        # '""' for "empty" (an unset-looking variable) and '"0123"' for a literal.
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
            try:
                inner = yaml.safe_load(raw)
            except yaml.YAMLError:
                return raw
            return inner if isinstance(inner, str) else raw
        return raw
    try:
        return _coerce(tp, raw.strip() if tp in (int, float) else raw, where)
    except ConfigError as exc:
        raise ConfigError(f"{value.var}={raw!r}: {exc}") from exc


def _map_paths(obj: Any, fn: typing.Callable[[Path], Path]) -> Any:
    changes = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, Path):
            changes[f.name] = fn(value)
        elif dataclasses.is_dataclass(value):
            changes[f.name] = _map_paths(value, fn)
    return dataclasses.replace(obj, **changes)
