"""The /v1 API and its error contract, end to end through aiohttp with a FakeBackend."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from aiohttp.test_utils import TestClient

from gateway.app import build_app
from gateway.errors import BackendUnavailable
from tests.unit.fake_backend import FakeBackend
from tests.unit.fakes import toy_backend, write_repo


@pytest.fixture
def backend() -> FakeBackend:
    return toy_backend()


@pytest.fixture
async def client(tmp_path: Path, backend: FakeBackend, aiohttp_client) -> TestClient:
    settings = write_repo(tmp_path)
    return await aiohttp_client(build_app(settings, backend=backend))


async def post(client: TestClient, body: object, path: str = "/v1/predict"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = await client.post(path, data=io.BytesIO(data))
    return resp.status, await resp.json()


async def test_predict_returns_score_versions_and_policy(client: TestClient, backend) -> None:
    status, body = await post(
        client, {"model_name": "toy", "entity_id": "e1", "features": {"a": 1, "b": 0.5, "c": -0.25}}
    )
    assert status == 200, body
    expected = 1 / (1 + np.exp(-1.25))
    assert body["score"] == pytest.approx(expected, rel=1e-6)
    assert body["decision"] == "deny"
    assert body["model_version"] == "2"
    assert body["policy_version"].startswith("routes@") and len(body["policy_version"]) == 19
    assert body["fallback_used"] is None
    assert len(backend.calls) == 1
    sent = backend.calls[0].inputs[0].data
    assert sent.dtype == np.float32 and sent.shape == (1, 3)


async def test_request_id_is_echoed(client: TestClient) -> None:
    status, body = await post(
        client, {"request_id": "abc", "model_name": "toy", "features": [0, 0, 0]}
    )
    assert status == 200 and body["request_id"] == "abc"


async def test_batch_is_one_backend_call(client: TestClient, backend) -> None:
    reqs = [{"model_name": "toy", "features": [i, 0, 0]} for i in range(5)]
    status, body = await post(client, reqs, "/v1/predict:batch")
    assert status == 200, body
    assert len(body["predictions"]) == 5
    assert [p["score"] > 0.5 for p in body["predictions"]] == [False, True, True, True, True]
    assert len(backend.calls) == 1 and backend.calls[0].inputs[0].data.shape == (5, 3)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "malformed_json"),
        ([1, 2], 400, "invalid_request"),
        ({"features": [1, 2, 3]}, 400, "missing_field"),
        ({"model_name": "toy"}, 400, "missing_field"),
        ({"model_name": "toy", "features": [1, 2, 3], "extra": 1}, 400, "unknown_field"),
        ({"model_name": "nope", "features": [1, 2, 3]}, 404, "model_not_found"),
        ({"model_name": "toy", "features": [1, 2]}, 422, "wrong_feature_count"),
        ({"model_name": "toy", "features": {"a": 1, "b": 2}}, 422, "missing_feature"),
        ({"model_name": "toy", "features": {"a": 1, "b": 2, "c": 3, "d": 4}}, 422,
         "unknown_feature"),
        ({"model_name": "toy", "features": {"a": "1", "b": 2, "c": 3}}, 422,
         "invalid_feature_type"),
        ({"model_name": "toy", "features": [True, 2, 3]}, 422, "invalid_feature_type"),
        ({"model_name": "toy", "features": [1e39, 2, 3]}, 422, "non_finite_feature"),
        (b'{"model_name": "toy", "features": [NaN, 1, 2]}', 400, "malformed_json"),
        ({"model_name": "toy", "features": [1, 2, 3], "context": {"deadline_ms": -5}}, 400,
         "invalid_field"),
    ],
)  # fmt: skip
async def test_bad_input_is_rejected_before_the_backend(
    client: TestClient, backend, body, status, code
) -> None:
    got_status, got = await post(client, body)
    assert got_status == status, got
    assert got["error"]["code"] == code
    assert got["error"]["request_id"]
    assert backend.calls == []


async def test_oversize_body_is_413(client: TestClient, backend) -> None:
    big = {"model_name": "toy", "features": [1, 2, 3], "request_id": "x" * (2 << 20)}
    status, body = await post(client, big)
    assert status == 413 and body["error"]["code"] == "payload_too_large"
    assert backend.calls == []


async def test_invalid_batch_item_rejects_whole_batch(client: TestClient, backend) -> None:
    reqs = [{"model_name": "toy", "features": [1, 2, 3]}, {"model_name": "toy", "features": [1]}]
    status, body = await post(client, reqs, "/v1/predict:batch")
    assert status == 422 and body["error"]["details"]["index"] == 1
    assert backend.calls == []


async def test_backend_down_is_503_and_slow_backend_is_504(client: TestClient, backend) -> None:
    backend.fail_with = BackendUnavailable("connection refused")
    status, body = await post(client, {"model_name": "toy", "features": [1, 2, 3]})
    assert status == 503 and body["error"]["code"] == "backend_unavailable"
    backend.fail_with = None
    backend.hang = True
    status, body = await post(
        client, {"model_name": "toy", "features": [1, 2, 3], "context": {"deadline_ms": 20}}
    )
    assert status == 504 and body["error"]["code"] == "deadline_exceeded"


async def test_unknown_path_is_json_404(client: TestClient) -> None:
    resp = await client.get("/v1/nothing")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"


async def test_health_ready_and_metrics(client: TestClient, backend) -> None:
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["targets"] == {"toy@2": True}
    await post(client, {"model_name": "toy", "features": [1, 2, 3]})
    text = await (await client.get("/metrics")).text()
    assert 'inference_requests_total{model="toy",status="ok"} 1.0' in text
    assert 'inference_latency_seconds_count{arm="champion",model="toy",version="2"} 1.0' in text
    backend.hang = True
    assert (await client.get("/readyz")).status == 503


async def test_header_request_id_names_the_prediction_and_the_log_line(client: TestClient) -> None:
    from structlog.testing import capture_logs

    body = json.dumps({"model_name": "toy", "features": [1, 2, 3]}).encode()
    with capture_logs() as logs:
        resp = await client.post("/v1/predict", data=body, headers={"X-Request-ID": "hdr-1"})
        assert resp.status == 200
        assert (await resp.json())["request_id"] == "hdr-1"
    access = [e for e in logs if e["event"] == "request"]
    assert access and access[-1]["status"] == 200 and access[-1]["model"] == "toy"
    assert resp.headers["X-Request-ID"] == "hdr-1"
