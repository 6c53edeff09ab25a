"""Environment overrides reach nested settings one leaf at a time."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_settings
from gateway.security.secrets import sticky_secret

ROOT = Path(__file__).resolve().parents[2]


def test_a_nested_env_var_changes_one_leaf_and_keeps_the_files_siblings() -> None:
    env = {
        "SWITCHYARD__RESILIENCE__FALLBACK__LATENCY__SLO_MULTIPLIER": "3",
        "SWITCHYARD__SERVER__PORT": "9090",
    }
    s = load_settings(ROOT / "configs" / "gateway.yaml", env=env, base_dir=ROOT)
    assert s.resilience.fallback.latency.slo_multiplier == 3.0
    assert s.resilience.fallback.latency.window_s == 30  # from the file, not reset
    assert s.resilience.fallback.reserve_s == 0.1
    assert s.server.port == 9090


def test_which_members_infer_over_http() -> None:
    """The shipped config infers over HTTP where a member names its HTTP endpoint; a member
    without one, or any member once Triton TLS is on, keeps gRPC (Triton's HTTP has no TLS)."""
    path = ROOT / "configs" / "gateway.yaml"
    shipped = load_settings(path, env={}, base_dir=ROOT).triton
    assert shipped.infer_protocol == "http"
    [default] = shipped.server_specs()
    assert shipped.infer_http_url(default) == ""  # only GRPC_URL known: gRPC, never a guess
    env = {"SWITCHYARD__TRITON__HTTP_URL": "http://triton:8000"}
    named = load_settings(path, env=env, base_dir=ROOT).triton
    assert named.infer_http_url(named.server_specs()[0]) == "http://triton:8000"
    grpc = load_settings(path, env={**env, "SWITCHYARD__TRITON__INFER_PROTOCOL": "grpc"},
                         base_dir=ROOT).triton  # fmt: skip
    assert grpc.infer_http_url(grpc.server_specs()[0]) == ""
    tls = dataclasses.replace(named, tls_ca_file=Path("ca.pem"))
    assert tls.infer_http_url(tls.server_specs()[0]) == ""


@pytest.mark.parametrize("raw", ["enabled", "enable", "Y", "ture", "2", "", "off-ish"])
@pytest.mark.parametrize(
    "var", ["SWITCHYARD__AUTH__ENABLED", "SWITCHYARD__ROUTING__REQUIRE_VALIDATION"]
)
def test_an_unrecognised_boolean_in_the_environment_stops_the_start(var: str, raw: str) -> None:
    """A typo must not turn auth or the validation gate off (fail-open): it is an error that
    names the variable."""
    with pytest.raises(ConfigError, match=var):
        load_settings(None, env={var: raw})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("true", True), ("TRUE", True), ("1", True), ("Yes", True), ("on", True),
     ("false", False), ("False", False), ("0", False), ("no", False), ("OFF", False)],
)  # fmt: skip
def test_the_explicit_boolean_spellings_are_accepted(raw: str, expected: bool) -> None:
    s = load_settings(None, env={"SWITCHYARD__AUTH__ENABLED": raw})
    assert s.auth.enabled is expected


def test_booleans_from_the_file_and_overrides_are_as_strict(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("auth: {enabled: enable}\n")
    with pytest.raises(ConfigError, match=r"auth\.enabled"):
        load_settings(path, env={})
    path.write_text("predlog: {fsync: 2}\n")
    with pytest.raises(ConfigError, match=r"predlog\.fsync"):
        load_settings(path, env={})
    with pytest.raises(ConfigError, match="require_validation"):
        load_settings(None, env={}, routing_require_validation="enabled")


@pytest.mark.parametrize("raw", ["0123", "12:30:00", "s3cr3t #x", "true", "null", "~", "[a]"])
def test_a_string_setting_keeps_the_raw_environment_value(tmp_path: Path, raw: str) -> None:
    """The sticky salt from the env must equal the same secret read from its *_FILE variant,
    or replicas configured either way put entities in different buckets."""
    s = load_settings(None, env={"SWITCHYARD__ROUTING__STICKY_SALT": raw})
    assert s.routing.sticky_salt == raw
    secret = tmp_path / "salt"
    secret.write_text(raw + "\n")
    f = load_settings(None, env={"SWITCHYARD__ROUTING__STICKY_SALT_FILE": str(secret)})
    assert sticky_secret(f) == sticky_secret(s) == raw


def test_an_empty_optional_path_means_none_not_the_working_directory() -> None:
    s = load_settings(None, env={"SWITCHYARD__ROUTING__STICKY_SALT_FILE": ""})
    assert s.routing.sticky_salt_file is None
    s = load_settings(None, env={"SWITCHYARD__PREDLOG__REDACT_SALT_FILE": ""})
    assert s.predlog.redact_salt_file is None


def test_an_empty_required_path_is_an_error() -> None:
    with pytest.raises(ConfigError, match="SWITCHYARD__ROUTING__ROUTES_DIR"):
        load_settings(None, env={"SWITCHYARD__ROUTING__ROUTES_DIR": ""})


def test_a_fractional_integer_is_an_error_not_truncated() -> None:
    with pytest.raises(ConfigError, match="SWITCHYARD__ROLLOUT__POLICY__MIN_SAMPLES"):
        load_settings(None, env={"SWITCHYARD__ROLLOUT__POLICY__MIN_SAMPLES": "99.9"})
    s = load_settings(None, env={"SWITCHYARD__ROLLOUT__POLICY__MIN_SAMPLES": "250"})
    assert s.rollout.policy.min_samples == 250


def test_structured_settings_from_the_environment_are_still_yaml() -> None:
    env = {
        "SWITCHYARD__TRITON__SERVERS": "[{name: a, grpc_url: 'a:8001'}]",
        "SWITCHYARD__TRITON__FALLBACK_MODELS": "[x, y]",
        "SWITCHYARD__PREDLOG__POLICIES": "{risk: {hash: [email]}}",
        "SWITCHYARD__REDIS__URL": "",
    }
    s = load_settings(None, env=env)
    assert s.triton.servers[0].grpc_url == "a:8001"
    assert s.triton.fallback_models == ("x", "y")
    assert s.predlog.policies == {"risk": {"hash": ["email"]}}
    assert s.redis.url == ""


def test_a_string_quoted_whole_in_the_environment_is_what_is_inside(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """'""' is how an empty value is given (the integration suite turns Redis off so), and
    '"0123"' a literal: quoted YAML strings, unquoted as in the settings file."""
    monkeypatch.setenv("SWITCHYARD__REDIS__URL", '""')
    monkeypatch.setenv("SWITCHYARD__ROUTING__STICKY_SALT", "'0123'")
    settings = load_settings(None)
    assert settings.redis.url == ""
    assert settings.routing.sticky_salt == "0123"
