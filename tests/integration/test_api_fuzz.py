"""schemathesis against a live gateway (`python -m gateway serve`, auth on, Redis, the session
tritonserver): every operation of /openapi.json, with a full-scope key and without one, a
bounded number of generated requests each. No 5xx (bar a 504 for the caller's own too-short
deadline) and no response that breaks the document."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.security.keys import SCOPES, KeyFile, KeyRecord, hash_key, new_key, write_key_file
from gateway.tritonserver import TritonServer
from tests.integration.conftest import GatewayProcess, start_gateway, stop_gateway, wait_http_ok
from tests.unit.test_openapi import Contract

EXAMPLES = 8  # per operation and key: ~22 operations x 2 x 8 requests
CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture
def secured(
    triton: TritonServer, repo_root: Path, tmp_path: Path, redis_url: str
) -> Iterator[tuple[GatewayProcess, str]]:
    key = new_key()
    keys = tmp_path / "keys.yaml"
    write_key_file(keys, KeyFile((KeyRecord("fuzz", hash_key(key), frozenset(SCOPES)),)))
    gw = start_gateway(
        repo_root,
        tmp_path,
        triton.grpc_url,
        extra_env={
            "SWITCHYARD__AUTH__ENABLED": "true",
            "SWITCHYARD__AUTH__KEYS_FILE": str(keys),
            "SWITCHYARD__REDIS__URL": redis_url,
            "SWITCHYARD__FEEDBACK__REQUIRE_ANSWERED": "false",
        },
    )
    try:
        wait_http_ok(f"{gw.url}/readyz", 60, gw.process, gw.log_file)
        yield gw, key
    finally:
        stop_gateway(gw)


def own_deadline(case: Any) -> bool:
    """Whether the generated request set its own deadline (a tiny one may rightly be 504)."""
    body = case.body if isinstance(case.body, dict) else {}
    items = case.body if isinstance(case.body, list) else body.get("requests", [body])
    ctx_deadline = any(
        isinstance(i, dict) and isinstance(i.get("context"), dict) and "deadline_ms" in i["context"]
        for i in (items if isinstance(items, list) else [])
    )
    return ctx_deadline or "X-Deadline-Ms" in (case.headers or {})


def fuzz(doc: dict[str, Any], base_url: str, headers: dict[str, str]) -> int:
    schema = schemathesis.openapi.from_dict(doc)
    session = requests.Session()
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(operation.as_strategy())
        def run(case: Any) -> None:
            nonlocal calls
            calls += 1
            response = case.call(base_url=base_url, session=session, headers=headers, timeout=30)
            if response.status_code >= 500:
                code = (response.json().get("error") or {}) if response.content else {}
                allowed = response.status_code == 504 and own_deadline(case)
                assert allowed, f"{case.method} {case.formatted_path}: {response.status_code} " \
                    f"{code} for {case.body!r}"  # fmt: skip
            case.validate_response(response, checks=CHECKS, headers=headers)

        run()
    return calls


def test_schemathesis_finds_nothing_with_and_without_a_key(
    secured: tuple[GatewayProcess, str],
) -> None:
    gw, key = secured
    with urllib.request.urlopen(f"{gw.url}/openapi.json", timeout=10) as r:  # public
        doc = json.loads(r.read())
    assert len(doc["paths"]) >= 20
    with_key = fuzz(doc, gw.url, {"Authorization": f"Bearer {key}"})
    without = fuzz(doc, gw.url, {})
    assert with_key >= len(doc["paths"]) and without >= len(doc["paths"])


def test_feedback_answers_as_documented(secured: tuple[GatewayProcess, str]) -> None:
    gw, key = secured
    with urllib.request.urlopen(f"{gw.url}/openapi.json", timeout=10) as r:
        contract = Contract(json.loads(r.read()))
    auth = {"Authorization": f"Bearer {key}"}
    rid = f"fuzz-{gw.port}"
    steps = [({"request_id": rid, "label": 1}, 202), ({"request_id": rid, "label": 1}, 200),
             ({"request_id": rid, "label": 0}, 409), ({"request_id": rid}, 400)]  # fmt: skip
    for body, status in steps:
        resp = requests.post(f"{gw.url}/v1/feedback", json=body, headers=auth, timeout=10)
        assert resp.status_code == status, resp.text
        contract.check("post", "/v1/feedback", status, resp.headers, resp.content)
    resp = requests.post(f"{gw.url}/v1/feedback", json={"request_id": rid, "label": 1}, timeout=10)
    assert resp.status_code == 401
    contract.check("post", "/v1/feedback", 401, resp.headers, resp.content)
