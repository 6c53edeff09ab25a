"""A route reload that lands while a /v1 prediction waits on Triton: the answer is the
client's and is logged, sampled payload included, even when the new table retired the
version that answered."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time
from pathlib import Path

import pytest

from gateway.api.keys import SERVICE
from gateway.app import build_app
from gateway.catalog import ModelCatalog
from gateway.routing.table import load_route_table
from gateway.service import PredictRequest
from tests.unit.fakes import ListSink, toy_backend, write_repo


async def test_a_reload_retiring_the_answering_version_keeps_the_answer_and_its_log(
    tmp_path: Path,
) -> None:
    settings = write_repo(tmp_path)
    settings = dataclasses.replace(
        settings, predlog=dataclasses.replace(settings.predlog, sample_rate=1.0)
    )
    backend = toy_backend()
    backend.latency_s = 0.2  # the window in which the reload lands
    service = build_app(settings, backend=backend)[SERVICE]
    sink = ListSink()
    service.predlog = sink  # type: ignore[assignment]
    repo2 = tmp_path / "repo2"  # the next table: version 2 retired, the route on 1
    shutil.copytree(settings.routing.model_repository, repo2)
    shutil.rmtree(repo2 / "toy" / "2")
    routes2 = tmp_path / "routes2"
    routes2.mkdir()
    (routes2 / "toy.yaml").write_text('model: toy\nchampion: {target: toy, version: "1"}\n')
    table2 = load_route_table(routes2, ModelCatalog.load(repo2))

    req = PredictRequest(request_id="r-1", model_name="toy", features=[0.1, 0.2, 0.3])
    task = asyncio.create_task(service.predict(req))
    deadline = time.monotonic() + 5
    while not backend.calls:  # planned on version 2 and waiting on the backend
        assert time.monotonic() < deadline, "the request never reached the backend"
        await asyncio.sleep(0.001)
    service.routes.swap(table2)
    pred = await task
    assert pred.model_version == "2"
    (logged,) = sink.entries
    assert logged["request_id"] == "r-1" and logged["version"] == "2"
    features = logged["payload"]["features"]
    assert list(features) == ["a", "b", "c"]
    assert features["c"] == pytest.approx(0.3)
