"""OIP through the one core, REST and gRPC with stock clients, real Triton and real Redis:
`risk` with an entity is split as its route says and sticky, and every answer is logged
exactly once with its version and policy_version."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import redis
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from sklearn.datasets import load_breast_cancer
from tritonclient.utils import InferenceServerException

from gateway.catalog import ModelCatalog
from gateway.predlog.redis_stream import decode_fields
from gateway.routing.table import load_route_table
from gateway.tritonserver import TritonServer
from tests.integration.conftest import start_gateway, stop_gateway, wait_http_ok

ROWS = load_breast_cancer().data[:50].astype(np.float32)


def stream_entries(url: str) -> list[dict]:
    client = redis.Redis.from_url(url)
    try:
        return [decode_fields(f) for _, f in client.xrange("predictions:risk")]
    finally:
        client.close()


def test_v2_risk_with_an_entity_is_split_sticky_and_logged_once(
    triton: TritonServer, repo_root: Path, tmp_path: Path, redis_url: str
) -> None:
    route = load_route_table(
        repo_root / "configs" / "routes", ModelCatalog.load(repo_root / "model_repository")
    ).get("risk")
    env = {"SWITCHYARD__REDIS__URL": redis_url, "SWITCHYARD__PREDLOG__RETRY_INTERVAL_S": "0.1",
           "SWITCHYARD__TELEMETRY__TRITON_SCRAPE_INTERVAL_S": "0"}  # fmt: skip
    gw = start_gateway(repo_root, tmp_path, triton.grpc_url, extra_env=env)
    client = httpclient.InferenceServerClient(gw.url.removeprefix("http://"))
    answers: dict[str, tuple[str, str]] = {}  # request id -> (entity, version)
    try:
        wait_http_ok(f"{gw.url}/readyz", 60, gw.process, gw.log_file)
        for i in range(120):
            entity = f"user-{i % 60}"  # each entity twice: sticky means the same version
            inp = httpclient.InferInput("features", [1, 30], "FP32")
            inp.set_data_from_numpy(ROWS[i % 50 : i % 50 + 1])
            rid = f"core-v2-{i}"
            res = client.infer("risk", [inp], request_id=rid, parameters={"entity_id": entity})
            body = res.get_response()
            want, _ = route.choose(entity, {}, None)  # type: ignore[arg-type]
            assert body["model_version"] == want.version, (entity, body)
            assert body["parameters"]["policy_version"] == route.policy_version
            assert "fallback_used" not in body["parameters"]
            answers[rid] = (entity, body["model_version"])
        # The same over the OIP gRPC front door: the entity in the request's parameters.
        grpc = grpcclient.InferenceServerClient(gw.grpc_url)
        try:
            for i in range(40):
                entity = f"user-{i % 60}"
                inp = grpcclient.InferInput("features", [1, 30], "FP32")
                inp.set_data_from_numpy(ROWS[i % 50 : i % 50 + 1])
                rid = f"core-grpc-{i}"
                res = grpc.infer("risk", [inp], request_id=rid, parameters={"entity_id": entity})
                reply = res.get_response()
                want, _ = route.choose(entity, {}, None)  # type: ignore[arg-type]
                assert reply.model_version == want.version
                assert reply.parameters["policy_version"].string_param == route.policy_version
                answers[rid] = (entity, reply.model_version)
        finally:
            grpc.close()
        versions = {v for _, v in answers.values()}
        by_entity: dict[str, set[str]] = {}
        for entity, version in answers.values():
            by_entity.setdefault(entity, set()).add(version)
        assert all(len(v) == 1 for v in by_entity.values())  # sticky on every entity
        assert versions <= {"1", "2"} and "2" in versions
        deadline = time.monotonic() + 20
        while len(stream_entries(redis_url)) < len(answers):
            assert time.monotonic() < deadline, "entries did not land"
            time.sleep(0.05)
    finally:
        client.close()
        stop_gateway(gw)
    logged = stream_entries(redis_url)
    ids = [e["request_id"] for e in logged]
    assert sorted(ids) == sorted(answers)  # exactly once: every answer, no duplicates
    for e in logged:
        _, version = answers[e["request_id"]]
        assert e["protocol"] == "v2" and e["version"] == version
        assert e["policy_version"] == route.policy_version and e["model"] == "risk"
        assert e["output"]["decision"] in ("approve", "review", "deny")


def test_one_clients_nan_rows_do_not_open_the_breakers_every_client_shares(
    triton: TritonServer, repo_root: Path, tmp_path: Path
) -> None:
    """The shipped models refuse NaN with an error Triton reports as INTERNAL, which the
    pool counts as the server's failure. Sent by the binary extension (JSON cannot carry
    NaN), ten such requests from one client would open risk's and risk_distilled's
    breakers, and every other client would get the static default. They are 400s, decided
    by the gateway, and the next client gets the model's own answer."""
    gw = start_gateway(repo_root, tmp_path, triton.grpc_url)
    client = httpclient.InferenceServerClient(gw.url.removeprefix("http://"))
    try:
        wait_http_ok(f"{gw.url}/readyz", 60, gw.process, gw.log_file)
        bad = ROWS[:1].copy()
        bad[0, 3] = np.nan
        for _ in range(10):
            inp = httpclient.InferInput("features", [1, 30], "FP32")
            inp.set_data_from_numpy(bad, binary_data=True)
            try:
                client.infer("risk", [inp])
            except InferenceServerException as exc:
                assert exc.status() == "400" and "not finite" in exc.message()
            else:
                raise AssertionError("a NaN row was answered")
        inp = httpclient.InferInput("features", [1, 30], "FP32")
        inp.set_data_from_numpy(ROWS[:1], binary_data=True)
        body = client.infer("risk", [inp]).get_response()
        assert "fallback_used" not in body["parameters"]
        assert body["model_version"] in ("1", "2")
    finally:
        client.close()
        stop_gateway(gw)
