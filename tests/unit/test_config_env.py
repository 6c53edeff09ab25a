"""Environment overrides reach nested settings one leaf at a time."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gateway.config import load_settings

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
