"""Environment overrides reach nested settings one leaf at a time."""

from __future__ import annotations

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
