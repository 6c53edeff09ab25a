"""The gateway process against a real tritonserver: answers, the OIP surface, errors, the log."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from sklearn.datasets import load_breast_cancer, load_digits

from gateway.tritonserver import TritonServer
from tests.integration.conftest import GatewayProcess, start_gateway, stop_gateway
from tests.reference import forward, load_version


def call(url: str, body: Any = None, method: str = "POST") -> tuple[int, dict[str, Any]]:
    data = (
        body if isinstance(body, bytes) else (None if body is None else json.dumps(body).encode())
    )
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def risk_rows(n: int) -> np.ndarray:
    return load_breast_cancer().data[:n].astype(np.float32)


def triton_success_count(triton: TritonServer, model: str) -> int:
    with urllib.request.urlopen(f"{triton.http_url}/v2/models/{model}/stats", timeout=10) as r:
        stats = json.loads(r.read())
    return sum(s["inference_stats"]["success"]["count"] for s in stats["model_stats"])


@pytest.mark.parametrize("version", ["1", "2"])
def test_risk_predictions_match_numpy_reference(
    gateway: GatewayProcess, triton: TritonServer, repo_root: Path, version: str
) -> None:
    manifest, _ = load_version(repo_root / "model_repository" / "risk" / version)
    names = manifest["input_schema"]["features"]
    x = risk_rows(8)
    expected = forward(repo_root / "model_repository" / "risk" / version, x)
    # Route through OIP for the explicit version, and /v1 for the champion.
    client = httpclient.InferenceServerClient(gateway.url.removeprefix("http://"))
    inp = httpclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer("risk", [inp], model_version=version)
    np.testing.assert_allclose(res.as_numpy("score")[:, 0], expected["score"], atol=1e-5)
    assert [d.decode() for d in res.as_numpy("decision")[:, 0]] == list(expected["decision"])
    np.testing.assert_allclose(res.as_numpy("confidence")[:, 0], expected["confidence"], atol=1e-5)
    client.close()
    if version == "2":  # the route's champion
        for i in range(3):
            status, body = call(
                f"{gateway.url}/v1/predict",
                {"model_name": "risk", "features": dict(zip(names, x[i].tolist(), strict=True))},
            )
            assert status == 200, body
            assert body["model_version"] == "2"
            assert body["policy_version"].startswith("routes@")
            assert body["score"] == pytest.approx(expected["score"][i], abs=1e-5)
            assert body["decision"] == expected["decision"][i]
            assert body["fallback_used"] is None


def test_digits_batch_matches_reference(gateway: GatewayProcess, repo_root: Path) -> None:
    x = load_digits().data[:16].astype(np.float32)
    expected = forward(repo_root / "model_repository" / "digits" / "1", x)
    reqs = [{"model_name": "digits", "features": row.tolist()} for row in x]
    status, body = call(f"{gateway.url}/v1/predict:batch", reqs)
    assert status == 200, body
    preds = body["predictions"]
    assert [p["decision"] for p in preds] == list(expected["decision"])
    np.testing.assert_allclose([p["score"] for p in preds], expected["score"], atol=1e-5)
    np.testing.assert_allclose(
        [p["outputs"]["probabilities"] for p in preds], expected["probabilities"], atol=1e-5
    )


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_through_gateway_equals_direct(
    gateway: GatewayProcess, triton: TritonServer, binary: bool
) -> None:
    via = httpclient.InferenceServerClient(gateway.url.removeprefix("http://"))
    direct = httpclient.InferenceServerClient(triton.http_url.removeprefix("http://"))
    try:
        assert via.is_server_live() and via.is_server_ready()
        assert via.is_model_ready("risk") and via.is_model_ready("digits", "1")
        assert not via.is_model_ready("risk", "99")
        assert via.get_model_metadata("digits") == direct.get_model_metadata("digits")
        assert via.get_model_metadata("risk", "1") == direct.get_model_metadata("risk", "1")
        assert via.get_model_config("risk")["max_batch_size"] == 256
        x = load_digits().data[:4].astype(np.float32)
        results = []
        for client in (via, direct):
            inp = httpclient.InferInput("features", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            outs = [
                httpclient.InferRequestedOutput(n, binary_data=binary)
                for n in ("probabilities", "decision")
            ]
            results.append(client.infer("digits", [inp], model_version="1", outputs=outs,
                                        request_id="r-1"))  # fmt: skip
        a, b = results
        np.testing.assert_array_equal(a.as_numpy("probabilities"), b.as_numpy("probabilities"))
        np.testing.assert_array_equal(a.as_numpy("decision"), b.as_numpy("decision"))
        assert a.get_response()["model_version"] == "1"
        assert a.get_response()["id"] == "r-1"
    finally:
        via.close()
        direct.close()


def test_oip_errors_look_like_triton(gateway: GatewayProcess) -> None:
    client = httpclient.InferenceServerClient(gateway.url.removeprefix("http://"))
    inp = httpclient.InferInput("features", [1, 3], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(httpclient.InferenceServerException) as info:
        client.infer("digits", [inp], model_version="1")
    assert info.value.status() == "400"
    assert "features" in info.value.message()
    client.close()


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{", 400, "malformed_json"),
        ({"model_name": "risk", "features": [1.0] * 29}, 422, "wrong_feature_count"),
        ({"model_name": "risk", "features": {"mean_radius": 1.0}}, 422, "missing_feature"),
        ({"model_name": "risk", "features": ["x"] * 30}, 422, "invalid_feature_type"),
        ({"model_name": "risk", "features": [1e40] * 30}, 422, "non_finite_feature"),
        ({"model_name": "nope", "features": [1.0] * 30}, 404, "model_not_found"),
        ({"model_name": "risk", "features": [1.0] * 30, "bogus": 1}, 400, "unknown_field"),
        (b'{"model_name": "risk", "features": [' + b"1," * 600_000 + b"1]}", 413,
         "payload_too_large"),
    ],
)  # fmt: skip
def test_bad_input_never_reaches_triton(
    gateway: GatewayProcess, triton: TritonServer, body: Any, status: int, code: str
) -> None:
    before = triton_success_count(triton, "risk")
    got_status, got = call(f"{gateway.url}/v1/predict", body)
    assert (got_status, got["error"]["code"]) == (status, code), got
    assert got["error"]["request_id"]
    assert triton_success_count(triton, "risk") == before


def test_unknown_version_on_oip_is_404ish(gateway: GatewayProcess) -> None:
    status, body = call(
        f"{gateway.url}/v2/models/risk/versions/77/infer",
        {
            "inputs": [
                {"name": "features", "datatype": "FP32", "shape": [1, 30], "data": [0.0] * 30}
            ]
        },
    )
    assert status in (400, 404), body
    assert "77" in body["error"] or "version" in body["error"]


def test_deadline_passed_is_504(gateway: GatewayProcess) -> None:
    # Triton's dynamic batcher alone waits up to 5 ms; 0.05 ms cannot be met.
    status, body = call(
        f"{gateway.url}/v1/predict",
        {"model_name": "digits", "features": [1.0] * 64, "context": {"deadline_ms": 0.05}},
    )
    assert status == 504 and body["error"]["code"] == "deadline_exceeded"
    # A route with a fallback ladder answers from it instead (risk: the static default).
    status, body = call(
        f"{gateway.url}/v1/predict",
        {"model_name": "risk", "features": [1.0] * 30, "context": {"deadline_ms": 0.05}},
    )
    assert status == 200 and body["fallback_used"] == "default"


def test_triton_down_is_503(repo_root: Path, tmp_path: Path) -> None:
    from gateway.tritonserver import free_port

    gw = start_gateway(repo_root, tmp_path, f"127.0.0.1:{free_port()}")
    try:
        body = {"model_name": "digits", "features": [1.0] * 64}  # no fallback ladder
        status, body = call(f"{gw.url}/v1/predict", body)
        assert status == 503 and body["error"]["code"] == "backend_unavailable"
        # risk has one: with every Triton down its last rung, the static default, answers
        status, body = call(f"{gw.url}/v1/predict", {"model_name": "risk", "features": [1.0] * 30})
        assert status == 200 and body["fallback_used"] == "default"
        assert call(f"{gw.url}/readyz", method="GET")[0] == 503
    finally:
        stop_gateway(gw)


def test_every_answer_is_logged_once(gateway: GatewayProcess) -> None:
    ids = [f"log-{time.time_ns()}-{i}" for i in range(5)]
    for rid in ids:
        status, _ = call(
            f"{gateway.url}/v1/predict",
            {"request_id": rid, "model_name": "risk", "features": [1.0] * 30},
        )
        assert status == 200
    deadline = time.monotonic() + 10
    while True:
        lines = [
            json.loads(line)
            for f in sorted(gateway.spool_dir.glob("*.jsonl"))
            for line in f.read_text().splitlines()
        ]
        logged = [e for e in lines if e["request_id"] in ids]
        if len(logged) >= len(ids) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert sorted(e["request_id"] for e in logged) == sorted(ids)
    e = logged[0]
    assert (
        e["model"] == "risk" and e["version"] == "2" and e["policy_version"].startswith("routes@")
    )
    assert len(e["input_hash"]) == 32 and e["output"]["decision"] in ("approve", "review", "deny")
