"""The benchmark's statistics and open-loop schedules (loadtest/stats.py), and its CPU pinning."""

from __future__ import annotations

import argparse
import itertools
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from loadtest.stats import open_loop_schedule, percentile, split_schedule, summarize


def test_nearest_rank_percentiles_pick_real_samples() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 0.5) == 50
    assert percentile(values, 0.9) == 90
    assert percentile(values, 0.99) == 99
    assert percentile(values, 0.999) == 100  # the largest, not an interpolation past it
    assert percentile(values, 0.0) == 1
    assert percentile(values, 1.0) == 100
    assert percentile([7.0], 0.99) == 7.0


def test_percentile_of_nothing_is_nan_and_bad_quantiles_fail() -> None:
    assert math.isnan(percentile([], 0.5))
    with pytest.raises(ValueError):
        percentile([1.0], 1.5)


def test_summary_counts_errors_in_requests_but_not_in_latency_or_throughput() -> None:
    s = summarize([3.0, 1.0, 2.0, 4.0], errors=1, elapsed_s=2.0)
    assert (s.requests, s.errors) == (5, 1)
    assert s.p50 == 2.0 and s.p99 == 4.0 and s.mean == 2.5
    assert s.throughput == 2.0  # 4 successes in 2 s
    assert s.error_rate == pytest.approx(0.2)


def test_constant_schedule_is_evenly_spaced() -> None:
    times = open_loop_schedule(100.0, 2.0)
    assert len(times) == 200
    assert times[0] == 0.0
    gaps = {round(b - a, 9) for a, b in itertools.pairwise(times)}
    assert gaps == {0.01}


def test_poisson_schedule_has_the_asked_rate_and_is_reproducible() -> None:
    a = open_loop_schedule(1000.0, 10.0, random.Random(7))
    b = open_loop_schedule(1000.0, 10.0, random.Random(7))
    assert a == b
    assert a == sorted(a) and a[0] > 0 and a[-1] < 10.0
    assert 9_700 < len(a) < 10_300  # 10,000 expected; sd 100
    gaps = [y - x for x, y in itertools.pairwise(a)]
    mean = sum(gaps) / len(gaps)
    sd = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps))
    assert sd == pytest.approx(mean, rel=0.1)  # exponential gaps: sd equals the mean


def test_split_schedule_deals_round_robin_over_the_whole_run() -> None:
    times = [float(i) for i in range(10)]
    parts = split_schedule(times, 3)
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(t for p in parts for t in p) == times


def test_schedule_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        open_loop_schedule(0, 1)


def test_gpu_bench_builds_valid_kind_gpu_repositories(tmp_path: Path) -> None:
    """The GPU benchmark cannot run without a GPU; its repositories are checked here."""
    from loadtest.gpu_bench import CASES, build_repository, validate_repository

    for case in CASES:
        names = validate_repository(build_repository(case, tmp_path), case.min_gpus)
        assert names == sorted(m.name for m in case.models)
    cfg = (tmp_path / "batching-off" / "mlp" / "config.pbtxt").read_text()
    assert "dynamic_batching" not in cfg
    assert "dynamic_batching" in (tmp_path / "batching-on" / "mlp" / "config.pbtxt").read_text()
    assert "gpus: [ 1 ]" in (tmp_path / "dedicated-gpu" / "mlp_b" / "config.pbtxt").read_text()


def test_gpu_bench_dry_run_checks_every_configuration_of_the_issue(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Batching off and on (5-10 ms), two models on one GPU with and without MPS, the
    planner's MPS layout, one model alone: all validated in one dry run."""
    from loadtest.gpu_bench import main as gpu_bench

    assert gpu_bench(["--dry-run", "--out", str(tmp_path)]) == 0
    lines = {line.split(":")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "no batching" in lines["batching-off"]
    assert "batching 5 ms" in lines["batching-on"]
    assert "batching 10 ms" in lines["batching-on-10ms"]
    assert "MPS" not in lines["shared-gpu"] and lines["shared-gpu-mps"].endswith("MPS")
    assert lines["alone-gpu0"].startswith("alone-gpu0: mlp_a (gpu 0")
    planned = lines["planned-mps"]
    assert "2 tritonserver(s), MPS" in planned
    assert planned.count("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50") == 2


def test_gpu_bench_refuses_a_window_outside_5_to_10_ms_and_stray_gpus(tmp_path: Path) -> None:
    from loadtest.gpu_bench import Case, ModelSpec, validate_case

    with pytest.raises(ValueError, match="outside 5-10 ms"):
        validate_case(Case("short", (ModelSpec("m", queue_delay_us=2000),)), tmp_path)
    with pytest.raises(ValueError, match="beyond the case's 1 GPU"):
        validate_case(Case("two", (ModelSpec("m", gpus=(1,)),)), tmp_path)
    over = (("a", (("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "60"),)),
            ("b", (("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "60"),)))  # fmt: skip
    with pytest.raises(ValueError, match="exceed one GPU"):
        pair = (ModelSpec("a"), ModelSpec("b"))
        validate_case(Case("over", pair, mps=True, server_per_model=True, model_env=over), tmp_path)


def test_pin_spec_parses_sides_and_ranges() -> None:
    from loadtest.bench import parse_pin

    assert parse_pin("gateway=1,triton=0,client=0") == {
        "gateway": {1},
        "triton": {0},
        "client": {0},
    }
    assert parse_pin("gateway=2-4+7") == {"gateway": {2, 3, 4, 7}}
    for bad in ("proxy=1", "gateway", "gateway="):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_pin(bad)


def test_pin_tree_pins_every_thread_of_a_process_and_its_children() -> None:
    from loadtest.bench import pin_tree

    cpu = min(os.sched_getaffinity(0))
    # A parent with a child, each with an extra thread, all asleep until killed.
    code = (
        "import subprocess, sys, threading, time\n"
        "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
        "if len(sys.argv) > 1:\n"
        "    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('up', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, "parent"], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        root = psutil.Process(proc.pid)
        deadline = time.monotonic() + 10
        while not root.children() and time.monotonic() < deadline:
            time.sleep(0.01)  # polling for the child's start, bounded by the deadline
        procs = [root, *root.children(recursive=True)]
        assert len(procs) == 2
        n = pin_tree(proc.pid, {cpu})
        tids = [t.id for p in procs for t in p.threads()]
        assert n == len(tids) >= 3
        assert all(os.sched_getaffinity(tid) == {cpu} for tid in tids)
    finally:
        for p in psutil.Process(proc.pid).children(recursive=True):
            p.kill()
        proc.kill()
        proc.wait()
        proc.stdout.close()
