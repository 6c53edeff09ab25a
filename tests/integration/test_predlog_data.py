"""Online features and label feedback through a real gateway, real Redis (db 15), real Triton,
and the `features load` / `labels join` commands."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from gateway.tritonserver import TritonServer
from tests.integration.conftest import start_gateway, stop_gateway
from tests.integration.test_predlog import gateway_env, poll, stream_entries


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def cli(repo_root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=repo_root, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def risk_names(repo_root: Path) -> list[str]:
    manifest = json.loads((repo_root / "model_repository/risk/2/manifest.json").read_text())
    return manifest["input_schema"]["features"]


def test_feature_refs_resolve_from_the_store_and_feedback_joins(
    triton: TritonServer, repo_root: Path, tmp_path: Path, redis_url: str
) -> None:
    names = risk_names(repo_root)
    rows = {f"user-{k}": [round(0.05 * ((i + k) % 11), 3) for i in range(len(names))]
            for k in range(6)}  # fmt: skip
    table = tmp_path / "features.csv"
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["entity_id", *names])
        for entity, values in rows.items():
            w.writerow([entity, *values])
    done = cli(repo_root, "features", "load", str(table), "--set", "risk_features:v3",
               "--redis-url", redis_url)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "loaded 6 entities" in done.stdout

    gw = start_gateway(repo_root, tmp_path, triton.grpc_url, gateway_env(redis_url))
    try:
        answers = {}
        for entity, values in rows.items():
            status, by_ref = post(f"{gw.url}/v1/predict", {
                "request_id": f"fb-{entity}", "entity_id": entity, "model_name": "risk",
                "feature_refs": ["risk_features:v3"]})  # fmt: skip
            assert status == 200, by_ref
            _, inline = post(f"{gw.url}/v1/predict",
                             {"model_name": "risk", "features": values})  # fmt: skip
            assert by_ref["score"] == inline["score"]  # same features, same answer
            answers[by_ref["request_id"]] = by_ref
        unknown = {"entity_id": "nobody", "model_name": "risk",
                   "feature_refs": ["risk_features:v3"]}  # fmt: skip
        status, body = post(f"{gw.url}/v1/predict", unknown)
        assert status == 422 and body["error"]["code"] == "features_not_found"

        # A label is taken only once the answer reached the log (its answered marker).
        poll(lambda: len(stream_entries(redis_url)) >= 12, 10, "log entries missing")
        # Labels: the first four agree with the answer, the last two do not -> 4/6.
        ids = sorted(answers)
        for n, rid in enumerate(ids):
            decision = answers[rid]["decision"]
            label = decision if n < 4 else ("deny" if decision != "deny" else "approve")
            status, body = post(f"{gw.url}/v1/feedback", {"request_id": rid, "label": label})
            assert status == 202, body
        status, body = post(f"{gw.url}/v1/feedback", {"request_id": "x"})
        assert status == 400
        status, body = post(f"{gw.url}/v1/feedback", {"request_id": ids[0], "label": "other"})
        assert status == 409 and body["error"]["code"] == "label_conflict"
        status, body = post(f"{gw.url}/v1/feedback", {"request_id": "never", "label": "deny"})
        assert status == 404 and body["error"]["code"] == "unknown_request_id"
    finally:
        stop_gateway(gw)

    done = cli(repo_root, "labels", "join", "--redis-url", redis_url)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    (arm,) = report["arms"]
    assert arm["model"] == "risk" and arm["labelled"] == 6 and arm["correct"] == 4
    assert abs(arm["accuracy"] - 4 / 6) < 1e-6
    assert report["entries"] == 12
