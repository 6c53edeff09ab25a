"""The scale scenario's harness: its gateway env parses into Settings, its flags for a GPU
machine (existing servers, open loop at a target rate) parse, and its table prints."""

from __future__ import annotations

from pathlib import Path

from gateway.config import load_settings
from loadtest.scale import parse_args, servers_env, table

ROOT = Path(__file__).resolve().parents[2]


def test_servers_env_is_a_pool_of_load_scraped_servers() -> None:
    env = {
        "SWITCHYARD__TRITON__SERVERS": servers_env(
            [
                ("127.0.0.1:8001", "http://127.0.0.1:8002/metrics"),
                ("10.0.0.6:8001", "http://10.0.0.6:8002/metrics"),
            ]
        )
    }
    s = load_settings(ROOT / "configs" / "gateway.yaml", env=env, base_dir=ROOT)
    specs = s.triton.server_specs()
    assert [(x.name, x.grpc_url, x.metrics_url) for x in specs] == [
        ("t0", "127.0.0.1:8001", "http://127.0.0.1:8002/metrics"),
        ("t1", "10.0.0.6:8001", "http://10.0.0.6:8002/metrics"),
    ]


def test_gpu_machine_flags_parse() -> None:
    args = parse_args(
        ["--triton", "10.0.0.5:8001=http://10.0.0.5:8002/metrics", "--tritons", "1,2",
         "--workers", "4,8", "--rate", "10000", "--target-rps", "10000"]
    )  # fmt: skip
    assert args.tritons == [1, 2] and args.workers == [4, 8]
    assert args.rate == 10000 and args.target_rps == 10000
    assert args.triton == ["10.0.0.5:8001=http://10.0.0.5:8002/metrics"]
    assert parse_args([]).tritons == [1, 2]  # here: 1 and 2 Tritons x 1 and 2 workers


def test_table_has_a_row_per_configuration() -> None:
    rows = [
        {"tritons": t, "workers": w, "rps": 1.0, "p50_ms": 2.0, "p99_ms": 3.0, "errors": 0}
        for t in (1, 2)
        for w in (1, 2)
    ]
    lines = table(rows).splitlines()
    assert len(lines) == 2 + 4 and lines[-1].startswith("| 2 | 2 |")
