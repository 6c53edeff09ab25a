"""GET /openapi.json: real responses of a running app (aiohttp test server, FakeBackend),
success and error, for every operation, validated against the document the app serves."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from aiohttp.test_utils import TestClient

from gateway.api.openapi import DocParams, build_document
from gateway.app import build_app
from gateway.config import AuthSettings
from gateway.errors import BackendUnavailable, SwitchyardError
from gateway.security.keys import KeyFile, KeyRecord, hash_key, new_key, write_key_file
from tests.unit.fake_backend import FakeBackend
from tests.unit.fakes import toy_backend, write_repo

PREDICT = {"model_name": "toy", "features": [0.1, 0.2, 0.3]}
INFER = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}


class Contract:
    """The served document, and a check of one real response against it."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.checked: set[tuple[str, str, int]] = set()

    def validator(self, schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
        """``schema`` with its ``#/components/...`` references resolving in the document."""
        root = {"$defs": {"target": schema}, "components": self.doc["components"],
                "$ref": "#/$defs/target"}  # fmt: skip
        return jsonschema.Draft202012Validator(root)

    def check(self, method: str, template: str, status: int, headers: Any, raw: bytes) -> None:
        responses = self.doc["paths"][template][method]["responses"]
        assert str(status) in responses, f"{method} {template}: {status} is not documented"
        content = responses[str(status)].get("content")
        self.checked.add((method, template, status))
        if content is None:
            return
        ctype = headers.get("Content-Type", "").split(";")[0]
        assert ctype in content, f"{method} {template} {status}: {ctype} not in {list(content)}"
        if ctype != "application/json":
            return
        errors = list(self.validator(content[ctype]["schema"]).iter_errors(json.loads(raw)))
        assert not errors, f"{method} {template} {status}: {errors[0].message}"


async def exchange(
    client: TestClient,
    contract: Contract,
    method: str,
    template: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> int:
    data = (
        None
        if body is None
        else io.BytesIO(body if isinstance(body, bytes) else json.dumps(body).encode())
    )
    resp = await client.request(method.upper(), path, data=data, headers=headers or {})
    raw = await resp.read()
    contract.check(method, template, resp.status, resp.headers, raw)
    return resp.status


@pytest.fixture
def backend() -> FakeBackend:
    return toy_backend()


async def served(client: TestClient) -> Contract:
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["openapi"] == "3.1.0"
    jsonschema.Draft202012Validator.check_schema(doc["components"]["schemas"]["PredictBody"])
    return Contract(doc)


async def test_every_operation_answers_as_documented(
    tmp_path: Path, backend: FakeBackend, aiohttp_client
) -> None:
    client = await aiohttp_client(build_app(write_repo(tmp_path), backend=backend))
    c = await served(client)
    cases: list[tuple[str, str, str, Any, int]] = [
        ("post", "/v1/predict", "/v1/predict", PREDICT, 200),
        ("post", "/v1/predict", "/v1/predict", b"{nope", 400),
        ("post", "/v1/predict", "/v1/predict", {**PREDICT, "model_name": "nope"}, 404),
        # echoed in X-Request-ID: a control character is refused, not a dropped connection
        ("post", "/v1/predict", "/v1/predict", {**PREDICT, "request_id": "a\x0eb"}, 400),
        ("post", "/v1/feedback", "/v1/feedback", {"request_id": "a\nb", "label": 1}, 400),
        ("post", "/v1/predict", "/v1/predict", {**PREDICT, "features": [1]}, 422),
        ("post", "/v1/predict", "/v1/predict", {**PREDICT, "entity_id": "x" * (2 << 20)}, 413),
        ("post", "/v1/predict:batch", "/v1/predict:batch", [PREDICT, PREDICT], 200),
        ("post", "/v1/predict:batch", "/v1/predict:batch", {"requests": [PREDICT]}, 200),
        ("post", "/v1/predict:batch", "/v1/predict:batch", [], 400),
        ("post", "/v1/feedback", "/v1/feedback", {"request_id": "r", "label": 1}, 503),
        ("post", "/v1/feedback", "/v1/feedback", {"request_id": ""}, 400),
        ("get", "/v2", "/v2", None, 200),
        ("get", "/v2/health/live", "/v2/health/live", None, 200),
        ("get", "/v2/health/ready", "/v2/health/ready", None, 200),
        ("get", "/v2/models/{model}", "/v2/models/toy", None, 200),
        ("get", "/v2/models/{model}", "/v2/models/nope", None, 404),
        ("get", "/v2/models/{model}/versions/{version}", "/v2/models/toy/versions/1", None, 200),
        ("get", "/v2/models/{model}/ready", "/v2/models/toy/ready", None, 200),
        ("get", "/v2/models/{model}/versions/{version}/ready", "/v2/models/toy/versions/9/ready",
         None, 400),
        ("get", "/v2/models/{model}/versions/{version}/ready", "/v2/models/toy/versions/1/ready",
         None, 200),
        ("get", "/v2/models/{model}/config", "/v2/models/toy/config", None, 200),
        ("get", "/v2/models/{model}/versions/{version}/config", "/v2/models/toy/versions/2/config",
         None, 200),
        ("post", "/v2/models/{model}/infer", "/v2/models/toy/infer", INFER, 200),
        ("post", "/v2/models/{model}/infer", "/v2/models/toy/infer", {"inputs": 5}, 400),
        ("post", "/v2/models/{model}/versions/{version}/infer", "/v2/models/toy/versions/1/infer",
         INFER, 200),
        ("get", "/healthz", "/healthz", None, 200),
        ("get", "/readyz", "/readyz", None, 200),
        ("get", "/metrics", "/metrics", None, 200),
        ("get", "/admin/routes", "/admin/routes", None, 200),
        ("get", "/admin/ui", "/admin/ui", None, 200),
        ("get", "/admin/ui.json", "/admin/ui.json", None, 200),
        ("get", "/openapi.json", "/openapi.json", None, 200),
    ]  # fmt: skip
    for method, template, path, body, status in cases:
        got = await exchange(client, c, method, template, path, body)
        assert got == status, (method, path, got)
    # Failures below the API: a backend down (503), a deadline passed (504), not ready.
    backend.fail_with = BackendUnavailable("connection refused")
    assert await exchange(client, c, "post", "/v1/predict", "/v1/predict", PREDICT) == 503
    assert await exchange(client, c, "post", "/v2/models/{model}/infer", "/v2/models/toy/infer",
                          INFER) == 503  # fmt: skip
    backend.fail_with = None
    backend.hang = True
    late = {**PREDICT, "context": {"deadline_ms": 20}}
    assert await exchange(client, c, "post", "/v1/predict", "/v1/predict", late) == 504
    assert await exchange(client, c, "get", "/readyz", "/readyz") == 503
    assert await exchange(client, c, "get", "/v2/health/ready", "/v2/health/ready") == 503
    # Every documented operation was exercised, with at least one success; feedback's needs
    # Redis (tests/integration/test_api_fuzz.py checks its 202/200/404/409 the same way).
    documented = {(m, t) for t, ops in c.doc["paths"].items() for m in ops}
    assert {(m, t) for m, t, _ in c.checked} == documented
    succeeded = {(m, t) for m, t, s in c.checked if s < 300}
    assert succeeded == documented - {("post", "/v1/feedback")}


async def test_under_auth_the_document_is_public_and_401_403_are_documented(
    tmp_path: Path, backend: FakeBackend, aiohttp_client
) -> None:
    keys = tmp_path / "keys.yaml"
    key = new_key()
    write_key_file(keys, KeyFile((KeyRecord("fb", hash_key(key), frozenset({"feedback"})),)))
    settings = write_repo(tmp_path)
    settings = dataclasses.replace(settings, auth=AuthSettings(enabled=True, keys_file=keys))
    client = await aiohttp_client(build_app(settings, backend=backend))
    c = await served(client)  # no key: the contract is public
    predict = c.doc["paths"]["/v1/predict"]["post"]
    assert predict["x-required-scope"] == "predict" and predict["security"]
    assert c.doc["paths"]["/healthz"]["get"]["security"] == []
    bearer = {"Authorization": f"Bearer {key}"}
    assert await exchange(client, c, "post", "/v1/predict", "/v1/predict", PREDICT) == 401
    assert await exchange(client, c, "post", "/v1/predict", "/v1/predict", PREDICT, bearer) == 403
    assert await exchange(client, c, "get", "/admin/routes", "/admin/routes", None, bearer) == 403
    assert await exchange(client, c, "post", "/v2/models/{model}/infer", "/v2/models/toy/infer",
                          INFER) == 401  # fmt: skip


def test_the_document_follows_the_settings() -> None:
    doc = build_document(DocParams(500, 8, False, False, False))
    ctx = doc["components"]["schemas"]["PredictContext"]["properties"]["deadline_ms"]
    assert {"type": "number", "exclusiveMinimum": 0, "maximum": 500} in [
        {k: v for k, v in b.items() if k in ("type", "exclusiveMinimum", "maximum")}
        for b in ctx["anyOf"]
    ]
    batch = doc["paths"]["/v1/predict:batch"]["post"]["requestBody"]["content"]
    assert batch["application/json"]["schema"]["oneOf"][0]["maxItems"] == 8
    assert all(op["security"] == [] for ops in doc["paths"].values() for op in ops.values())


def test_error_bodies_match_the_error_schema() -> None:
    """Every error class's body, as the middleware builds it, fits the documented schema."""
    doc = build_document(DocParams(500, 8, False, False, False))
    c = Contract(doc)
    validator = c.validator({"$ref": "#/components/schemas/ErrorBody"})
    classes: list[type[SwitchyardError]] = [SwitchyardError]
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        for details in (None, {"field": "x"}):
            validator.validate(cls("m", details=details).to_dict("rid"))
            validator.validate(cls("m", details=details).to_dict(None))
