"""Progress on long CLI work (gateway/progress.py): shown on a terminal's stderr, quiet in CI and
when piped, and stdout the same either way.

The command tests run the real `python -m gateway models publish` with stderr on a
pseudo-terminal (what a person at a terminal has), on a pipe, and on a pseudo-terminal under CI.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.progress import LINE_INTERVAL_S, QUIET, Mode, Progress, decide
from tests.registry_artifacts import REPO_ROOT, model_repo, risk_artifact
from tests.terminal import redraws, run_on_terminal

TTY = {"TERM": "xterm-256color"}


# -- the decision -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("isatty", "environ", "flag", "mode"),
    [
        (True, TTY, None, Mode.BARS),
        (False, TTY, None, Mode.OFF),  # piped or redirected
        (True, {**TTY, "CI": "true"}, None, Mode.OFF),
        (True, {**TTY, "CI": "1"}, None, Mode.OFF),
        (True, {**TTY, "CI": "yes-anything"}, None, Mode.OFF),
        (True, {**TTY, "CI": "0"}, None, Mode.BARS),  # CI=0 / false / empty: not CI
        (True, {**TTY, "CI": "False"}, None, Mode.BARS),
        (True, {**TTY, "CI": ""}, None, Mode.BARS),
        (True, {"TERM": "dumb"}, None, Mode.LINES),  # no redraws: plain lines
        (True, {**TTY, "NO_COLOR": "1"}, None, Mode.BARS),  # nothing here is coloured
        (True, TTY, False, Mode.OFF),  # --no-progress
        (True, {**TTY, "SWITCHYARD_PROGRESS": "0"}, None, Mode.OFF),
        (True, {**TTY, "SWITCHYARD_PROGRESS": "1", "CI": "true"}, None, Mode.BARS),
        (False, {**TTY, "SWITCHYARD_PROGRESS": "1"}, None, Mode.LINES),  # forced into a pipe
        (False, TTY, True, Mode.LINES),  # --progress into a file: lines, never \r
        (True, {**TTY, "CI": "true"}, True, Mode.BARS),
        (True, {"TERM": "dumb"}, True, Mode.LINES),
        (True, {**TTY, "SWITCHYARD_PROGRESS": "0"}, True, Mode.BARS),  # the flag wins
        (True, {**TTY, "SWITCHYARD_PROGRESS": "1"}, False, Mode.OFF),
        (True, {**TTY, "SWITCHYARD_PROGRESS": ""}, None, Mode.BARS),  # empty: not given
    ],
)
def test_decide(isatty: bool, environ: dict[str, str], flag: bool | None, mode: Mode) -> None:
    assert decide(isatty, environ, flag) is mode


def test_a_stream_that_is_no_terminal_gets_no_progress() -> None:
    assert Progress.for_stream(io.StringIO(), environ=TTY).mode is Mode.OFF
    assert Progress.for_stream(io.StringIO(), flag=True, environ=TTY).mode is Mode.LINES
    closed = io.StringIO()
    closed.close()  # isatty() raises ValueError on a closed stream
    assert Progress.for_stream(closed, environ=TTY).mode is Mode.OFF


# -- what each mode draws -----------------------------------------------------------------
def test_quiet_draws_nothing() -> None:
    out = io.StringIO()
    p = Progress(Mode.OFF, out)
    with p.task("work", 3) as task:
        task.note("x")
        task.advance()
    assert list(p.track([1, 2], "more")) == [1, 2]
    assert out.getvalue() == "" and not p.shown and not QUIET.shown


def test_lines_start_every_interval_and_at_the_end() -> None:
    now = [100.0]
    out = io.StringIO()
    p = Progress(Mode.LINES, out, clock=lambda: now[0])
    with p.task("training", 4, "model") as task:
        task.note("risk/1")
        task.advance()  # no time passed: no line
        now[0] += LINE_INTERVAL_S
        task.advance()
        now[0] += 1.5
    assert out.getvalue().splitlines() == [
        "training: 0/4 model",
        "training: 2/4 model (risk/1)",
        f"training: 2/4 model (done in {LINE_INTERVAL_S + 1.5:.1f} s)",
    ]
    assert "\r" not in out.getvalue()


def test_lines_count_whole_numbers_in_full() -> None:
    out = io.StringIO()
    with Progress(Mode.LINES, out).task("archive predictions:risk", unit="entry") as task:
        task.advance(1_500_000)
    assert out.getvalue().splitlines()[-1].startswith("archive predictions:risk: 1500000 entry")


def test_lines_scale_bytes() -> None:
    out = io.StringIO()
    with Progress(Mode.LINES, out).task("hashing", 2_500_000, "B", unit_scale=True) as task:
        task.advance(2_500_000)
    assert out.getvalue().splitlines()[-1].startswith("hashing: 2.50M/2.50MB (done in")


def test_bars_redraw_in_place_and_echo_keeps_lines_whole() -> None:
    out = io.StringIO()
    p = Progress(Mode.BARS, out)
    items = list(p.track(["a", "b", "c"], "copying", "file", note=str))
    assert items == ["a", "b", "c"]
    text = out.getvalue()
    assert "copying:" in text and "0/3" in text and "\r" in text
    out.seek(0), out.truncate()
    with p.task("bench", 2, "phase"):
        p.echo("  row one")
    assert "  row one\n" in out.getvalue()


def test_echo_prints_the_same_line_whatever_the_mode() -> None:
    for mode in (Mode.OFF, Mode.LINES):
        out = io.StringIO()
        Progress(mode, out).echo("  a result")
        assert out.getvalue() == "  a result\n"


# -- loadtest.bench: phase i of n, with n right -------------------------------------------
class _ReadyResults:
    def __init__(self, results: list[Any]) -> None:
        self.results = results

    def ready(self) -> bool:
        return True

    def wait(self, timeout: float) -> None:  # pragma: no cover - always ready
        raise AssertionError("ready results are never waited for")

    def get(self) -> list[Any]:
        return self.results


class _FakePool:
    """Runs nothing: each job returns at once with a few fast answers."""

    def __init__(self, *args: object) -> None:
        pass

    def __enter__(self) -> _FakePool:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def map_async(self, fn: object, jobs: list[Any]) -> _ReadyResults:
        from loadtest.bench import JobResult

        return _ReadyResults([JobResult([1.0, 2.0], 0, 1.0, 0.1) for _ in jobs])


@pytest.mark.parametrize(
    "flags",
    [[], ["--repeat", "2"], ["--closed-only"], ["--rate", "50"], ["--repeat", "0"]],
)
def test_bench_counts_the_phases_it_runs(flags: list[str], monkeypatch) -> None:
    from loadtest import bench

    ctx = argparse.Namespace(Pool=_FakePool)
    monkeypatch.setattr(bench.multiprocessing, "get_context", lambda method: ctx)
    args = bench.parse_args(["--targets", "triton-http,gateway-v2,gateway-v1", *flags])
    eps = bench.endpoints("http://gw", "http://triton", None)
    now = [0.0]

    def clock() -> float:  # every call a whole interval later: a line per phase
        now[0] += LINE_INTERVAL_S
        return now[0]

    out = io.StringIO()
    rows = bench.benchmark(args, eps, {}, Progress(Mode.LINES, out, clock=clock))
    n = bench.planned_phases(args, ["triton-http", "gateway-v2", "gateway-v1"])
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("bench:")]
    assert n == 3 + len(rows)  # the warm-up phases are not rows
    assert lines[0] == f"bench: 0/{n} phase"
    assert lines[-1].startswith(f"bench: {n}/{n} phase (done in")
    counted = [int(m.group(1)) for ln in lines if (m := re.match(r"bench: (\d+)/", ln))]
    assert counted == sorted(counted) and max(counted) == n


def test_bench_repeats_open_loop_phases_round_robin_too(monkeypatch) -> None:
    """A 10 s phase's p99 swings with the machine: open-loop phases repeat A B A B as well."""
    from loadtest import bench

    ctx = argparse.Namespace(Pool=_FakePool)
    monkeypatch.setattr(bench.multiprocessing, "get_context", lambda method: ctx)
    flags = ["--targets", "triton-http,gateway-v2", "--rate", "50", "--repeat", "2"]
    args = bench.parse_args(flags)
    eps = bench.endpoints("http://gw", "http://triton", None)
    rows = bench.benchmark(args, eps, {}, Progress(Mode.OFF, io.StringIO()))
    assert [(r.target, r.mode) for r in rows if r.mode.startswith("open")] == [
        ("triton-http", "open given #1"), ("gateway-v2", "open given #1"),
        ("triton-http", "open given #2"), ("gateway-v2", "open given #2"),
    ]  # fmt: skip


# -- loadtest.gpu_bench: configuration i of n (its cases need a GPU; run_case is faked) ----
def test_gpu_bench_counts_configurations_skipped_ones_included(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from loadtest import gpu_bench

    ran: list[str] = []

    def run_case(case: Any, root: Path, args: Any, task: Any, progress: Progress) -> list[Any]:
        ran.append(case.name)
        task.note(case.name)
        return []

    monkeypatch.setattr(gpu_bench, "gpu_count", lambda: 1)
    monkeypatch.setattr(gpu_bench, "run_case", run_case)
    monkeypatch.setenv("SWITCHYARD_PROGRESS", "1")  # stderr is no terminal here: plain lines
    cases = "batching-off,dedicated-gpu,batching-on"
    assert gpu_bench.main(["--cases", cases, "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert ran == ["batching-off", "batching-on"]
    assert err[0] == "gpu_bench: 0/3 configuration"
    assert "skip dedicated-gpu: needs 2 GPUs, have 1" in err
    assert err[-1].startswith("gpu_bench: 3/3 configuration (done in")


# -- the real command on a terminal, a pipe, and a terminal in CI -------------------------
@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return risk_artifact(tmp_path_factory.mktemp("artifact") / "risk", c=0.5)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_repo(tmp_path_factory.mktemp("template"))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"CI", "SWITCHYARD_PROGRESS"}}
    return {**env, "TERM": "xterm-256color", **extra}


def _publish(
    artifact: Path, template: Path, repo: Path, env: dict[str, str], pty: bool, *flags: str
) -> tuple[bytes, bytes]:
    """(stdout, stderr) of one `models publish` into a fresh copy of the repository at `repo`
    (the same path every time: stdout names it)."""
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(template, repo)
    cmd = [sys.executable, "-m", "gateway", "models", "publish", str(artifact), "--model", "risk",
           "--repository", str(repo), *flags]  # fmt: skip
    if not pty:
        done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout, done.stderr
    rc, out, err = run_on_terminal(cmd, env, REPO_ROOT)
    assert rc == 0, err
    return out, err


def _stable(stdout: bytes) -> bytes:
    # `models publish` logs through structlog's default logger, on stdout, with a wall-clock
    # timestamp: the one part of its stdout that differs from run to run.
    return re.sub(rb"(?m)^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", b"<time> ", stdout)


def test_publish_shows_progress_on_a_terminal_only(
    artifact: Path, template: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "model_repository"
    out_tty, err_tty = _publish(artifact, template, repo, _env(), True)
    out_pipe, err_pipe = _publish(artifact, template, repo, _env(), False)
    out_ci, err_ci = _publish(artifact, template, repo, _env(CI="true"), True)
    out_off, err_off = _publish(artifact, template, repo, _env(), True, "--no-progress")

    for phase in (b"risk: hashing", b"risk/3: measuring memory", b"risk/3: copying",
                  b"risk/3: verifying"):  # fmt: skip
        assert phase in err_tty
    assert b"%|" in err_tty and redraws(err_tty)  # a bar, redrawn in place
    assert err_pipe == b"" and err_ci == b"" and err_off == b""
    assert b"published risk/3  sha256:" in out_tty
    assert _stable(out_tty) == _stable(out_pipe) == _stable(out_ci) == _stable(out_off)


def test_publish_on_a_dumb_terminal_prints_plain_lines(
    artifact: Path, template: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "model_repository"
    _, err = _publish(artifact, template, repo, _env(TERM="dumb"), True)
    lines = err.decode().splitlines()
    assert any(ln.startswith("risk: hashing: 0.00/") for ln in lines)
    assert any(ln.startswith("risk/3: copying: 2/2 file (done in") for ln in lines)
    assert not redraws(err)
