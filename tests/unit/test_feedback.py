"""Label correctness, the champion/challenger delta, and POST /v1/feedback's contract."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from gateway.app import build_app
from gateway.predlog.feedback import ArmAccuracy, JoinReport, is_correct
from tests.unit.fakes import toy_backend, write_repo


def test_labels_compare_with_decision_or_score() -> None:
    out = {"score": 0.8, "decision": "deny"}
    assert is_correct(out, "deny") and not is_correct(out, "approve")
    assert is_correct(out, 1) and is_correct(out, True) and not is_correct(out, 0)
    assert not is_correct({"decision": "deny"}, 1)  # no score to compare with


def test_canary_delta_is_challenger_minus_champion() -> None:
    report = JoinReport(
        (
            ArmAccuracy("risk", "2", "champion", labelled=100, correct=90),
            ArmAccuracy("risk", "3", "challenger", labelled=50, correct=40),
            ArmAccuracy("digits", "1", "champion", labelled=10, correct=10),
        ),
        entries=200,
    )
    assert report.deltas() == {("risk", "3"): pytest.approx(-0.1)}
    assert report.to_dict()["canary_accuracy_delta"] == [
        {"model": "risk", "version": "3", "delta": -0.1}
    ]


async def test_feedback_without_redis_is_503_and_bad_bodies_are_400(
    tmp_path: Path, aiohttp_client
) -> None:
    client = await aiohttp_client(build_app(write_repo(tmp_path), backend=toy_backend()))

    async def post(body: object) -> tuple[int, dict]:
        resp = await client.post("/v1/feedback", data=io.BytesIO(json.dumps(body).encode()))
        return resp.status, await resp.json()

    status, body = await post({"request_id": "r1", "label": "deny"})
    assert status == 503 and body["error"]["code"] == "feedback_store_unavailable"
    bad_bodies = [
        {"request_id": "r1"},
        {"label": "x"},
        {"request_id": "r1", "label": ""},
        {"request_id": "r1", "label": [1]},
        {"request_id": "r1", "label": 1, "x": 2},
    ]
    for bad in bad_bodies:
        status, body = await post(bad)
        assert status == 400, bad
