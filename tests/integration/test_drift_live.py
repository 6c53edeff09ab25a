"""Drift through a real gateway process in front of the session's tritonserver: the risk
model's own dataset, sent through /v1, keeps every feature's PSI low against risk/2's
training histograms; the same rows with one feature shifted raise that feature alone above
the warn threshold, on /metrics and in `drift report`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.tritonserver import TritonServer
from tests.integration.conftest import GatewayProcess, start_gateway, stop_gateway, wait_http_ok

pytestmark = pytest.mark.integration
SHIFTED = "mean_radius"


@pytest.fixture
def drift_gateway(
    triton: TritonServer, repo_root: Path, tmp_path: Path
) -> Iterator[GatewayProcess]:
    env = {
        "SWITCHYARD__DRIFT__SAMPLE_RATE": "1.0",
        "SWITCHYARD__DRIFT__MIN_ROWS": "300",
        "SWITCHYARD__DRIFT__UPDATE_INTERVAL_S": "0.2",
    }
    gw = start_gateway(repo_root, tmp_path, triton.grpc_url, env)
    try:
        wait_http_ok(f"{gw.url}/readyz", 60, gw.process, gw.log_file)
        yield gw
    finally:
        stop_gateway(gw)


def send(gw: GatewayProcess, rows: np.ndarray, names: list[str]) -> str:
    """POST the rows to /v1 for one entity (one sticky arm); the version that answered."""
    versions = set()
    for start in range(0, len(rows), 200):
        body = [{"model_name": "risk", "entity_id": "one-entity",
                 "features": dict(zip(names, map(float, r), strict=True))}
                for r in rows[start : start + 200]]  # fmt: skip
        req = urllib.request.Request(f"{gw.url}/v1/predict:batch", json.dumps(body).encode(),
                                     {"content-type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=30) as resp:
            versions |= {a["model_version"] for a in json.loads(resp.read())["predictions"]}
    (version,) = versions
    return str(version)


def psi_when(gw: GatewayProcess, version: str, rows: float) -> dict[str, float]:
    """feature -> PSI of risk/version once the export covers `rows` rows (poll, 30 s max)."""
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(f"{gw.url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        samples = [
            s
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.labels.get("model") == "risk" and s.labels.get("version") == version
        ]
        if any(s.name == "drift_window_rows" and s.value == rows for s in samples):
            return {s.labels["feature"]: s.value for s in samples
                    if s.name == "feature_drift_psi"}  # fmt: skip
        assert time.monotonic() < deadline, text[-2000:]
        time.sleep(0.2)


def test_one_shifted_feature_raises_its_psi_through_the_real_stack(
    drift_gateway: GatewayProcess, repo_root: Path
) -> None:
    from sklearn.datasets import load_breast_cancer

    manifest = json.loads((repo_root / "model_repository/risk/2/manifest.json").read_text())
    names = manifest["input_schema"]["features"]  # risk/1 has the same schema and data
    x = load_breast_cancer().data.astype(np.float32)  # train + holdout: the training population
    version = send(drift_gateway, x, names)
    calm = psi_when(drift_gateway, version, float(len(x)))
    assert len(calm) == len(names) and max(calm.values()) < 0.1, (calm, version)

    shifted = x.copy()
    j = names.index(SHIFTED)
    shifted[:, j] += 2 * x[:, j].std()
    assert send(drift_gateway, shifted, names) == version
    psi = psi_when(drift_gateway, version, float(2 * len(x)))  # half of the window is shifted
    assert psi[SHIFTED] > 0.2, psi
    others = {f: v for f, v in psi.items() if f != SHIFTED}
    assert max(others.values()) < 0.1, others

    report = subprocess.run(
        [sys.executable, "-m", "gateway", "drift", "report", "--model", "risk", "--url",
         drift_gateway.url, "--top", "3"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert report[0].startswith(f"risk/{version}: {2 * len(x)} sampled rows"), report
    # prediction drift too: the shipped versions' holdout score histograms (score_reference/)
    assert re.search(r"score PSI \d+\.\d{3} ", report[0]), report
    assert report[2].split()[0] == SHIFTED
