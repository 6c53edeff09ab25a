"""The README's lifecycle walkthrough, end to end: `docs/walkthrough.py --start` runs every
command of the README section on the `make run` stack (`python -m gateway up`: both real
tritonservers and the gateway, on free ports, on copies of the routes and the repository),
with real Redis and a real Prometheus evaluating the shipped alert rules.

What it proves, from the commands' own output: a trained candidate is published (and
publishing it again names the existing version), validated on the live tritonserver, routed
as a 5 % canary only after the gate, promoted by the controller on live traffic to champion
with the old champion kept at 0 %; a worse candidate is refused by `models validate` and by
`routes set-weight`; one shifted feature raises its PSI over 0.25 and FeatureDriftSevere
fires. The rollout report picture is drawn from that traffic."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL, reachable_redis, unavailable

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def redis_url() -> str:
    reachable_redis().close()
    return REDIS_URL


def test_the_readme_walkthrough_runs_on_the_make_run_stack(
    tmp_path: Path, redis_url: str, triton_installation: object
) -> None:
    if shutil.which("prometheus") is None:
        unavailable("the `prometheus` binary is needed for the drift alert (make deps)")
    png = tmp_path / "rollout-report.png"
    env = {**os.environ, "SWITCHYARD__REDIS__URL": redis_url}
    done = subprocess.run(
        [sys.executable, "docs/walkthrough.py", "--start", "--png", str(png)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=840,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out[-6000:] + done.stderr[-4000:]
    # 1. publish, the same artifact again, validation on the live tritonserver
    assert "published risk/3" in out
    assert "identical to risk/3" in out
    assert "risk@3 passed" in out
    # 2. the canary is live only once the gate let it in
    assert "live: ['risk@2', 'risk@3']" in out
    assert "risk/3  sha256:" in out and "validated       risk.yaml: challenger 5%" in out
    # 3. the controller walked the ladder and swapped the champion; the old one is kept at 0
    assert "promote 5.0 -> 25.0 % (applied)" in out
    assert "promote 50.0 -> 100.0 % (applied, swap)" in out
    assert "champion: risk@3" in out
    assert "{'target': 'risk', 'version': '2', 'weight': 0" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # 4. the worse candidate: refused by validation, then by set-weight
    assert "FAIL  metrics  worse than champion risk@3" in out
    assert "risk@4 REFUSED" in out
    assert "error: risk@4 failed validation check 'metrics'" in out
    # 5. drift: the shifted feature pages, the alert fires with its runbook
    assert "mean_radius" in out and "PAGE" in out
    assert "firing: {'alertname': 'FeatureDriftSevere', 'severity': 'page', 'model': 'risk', " \
        "'version': '3', 'feature': 'mean_radius'}" in out  # fmt: skip
    assert "runbook=docs/runbooks/FeatureDriftSevere.md" in out
    assert "walkthrough: every step did what the README says" in out
