"""The prediction cache answers a caller only with what it asked for: an answer stored for
a call that named some outputs never stands in for outputs it does not hold (the response
cache and the ladder's cache rung read the same entries, shared by /v1 and /v2)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from gateway.app import build_app
from tests.unit.fakes import toy_backend, write_repo


def v2_body(row: list[float], outputs: list[str] | None = None) -> io.BytesIO:
    body: dict[str, Any] = {"inputs": [{"name": "features", "datatype": "FP32",
                                        "shape": [1, 3], "data": row}]}  # fmt: skip
    if outputs is not None:
        body["outputs"] = [{"name": n} for n in outputs]
    return io.BytesIO(json.dumps(body).encode())


async def v2(client: TestClient, row: list[float], outputs: list[str] | None = None) -> dict:
    resp = await client.post("/v2/models/toy/infer", data=v2_body(row, outputs))
    assert resp.status == 200, await resp.text()
    return {o["name"]: o["data"] for o in (await resp.json())["outputs"]}


async def test_a_score_only_answer_does_not_stand_in_for_a_full_one(
    tmp_path: Path, aiohttp_client
) -> None:
    backend = toy_backend()
    settings = write_repo(tmp_path, "cache: {ttl_s: 30}\n")  # the route's response cache
    client = await aiohttp_client(build_app(settings, backend=backend))
    assert set(await v2(client, [1, 2, 3], ["score"])) == {"score"}
    calls = len(backend.calls)

    resp = await client.post(
        "/v1/predict", data=io.BytesIO(b'{"model_name": "toy", "features": [1, 2, 3]}')
    )
    v1 = await resp.json()
    assert resp.status == 200
    assert v1["decision"] == "deny" and v1["confidence"] is not None
    assert len(backend.calls) == calls + 1  # a miss: the cached answer lacked them

    assert set(await v2(client, [1, 2, 3], ["decision"])) == {"decision"}  # now a hit
    assert set(await v2(client, [1, 2, 3])) == {"score", "decision", "confidence"}
    assert set(await v2(client, [1, 2, 3], ["score"])) == {"score"}  # only what it named
    batch = [{"model_name": "toy", "features": f} for f in ([1, 2, 3], [4, 5, 6])]
    resp = await client.post("/v1/predict:batch", data=io.BytesIO(json.dumps(batch).encode()))
    assert resp.status == 200
    assert all(p["decision"] == "deny" for p in (await resp.json())["predictions"])


async def test_a_sequence_step_is_neither_served_nor_kept_by_the_cache(
    tmp_path: Path, aiohttp_client
) -> None:
    """A sequence's step (sequence_id, ...) answers from the model's state, not from its
    input alone: two identical steps both reach the model."""
    backend = toy_backend()
    settings = write_repo(tmp_path, "cache: {ttl_s: 30}\n")
    client = await aiohttp_client(build_app(settings, backend=backend))
    body = {"parameters": {"sequence_id": 7},
            "inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 3],
                        "data": [1, 2, 3]}]}  # fmt: skip
    for _ in range(2):
        resp = await client.post("/v2/models/toy/infer", data=io.BytesIO(json.dumps(body).encode()))
        assert resp.status == 200, await resp.text()
    steps = [c for c in backend.calls if c.parameters.get("sequence_id") == 7]
    assert len(steps) == 2
