"""A tiny model repository and route set on disk, served by FakeBackend, for unit tests."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from gateway.app import build_app
from gateway.config import Settings, load_settings
from gateway.serving import app_runner
from gateway.tensors import Tensor
from tests.unit.fake_backend import FakeBackend, FakeModel

FEATURES = ["a", "b", "c"]


def toy_fn(inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    x = inputs["features"].data.astype(np.float32)
    score = (1.0 / (1.0 + np.exp(-x.sum(axis=1)))).astype(np.float32).reshape(-1, 1)
    decision = np.array([[b"deny" if s >= 0.5 else b"approve"] for s in score[:, 0]], dtype=object)
    conf = np.maximum(score, 1 - score).astype(np.float32)
    return {
        "score": Tensor("score", "FP32", score),
        "decision": Tensor("decision", "BYTES", decision),
        "confidence": Tensor("confidence", "FP32", conf),
    }


def write_repo(root: Path, route_extra: str = "") -> Settings:
    repo = root / "model_repository"
    for version in ("1", "2"):
        d = repo / "toy" / version
        d.mkdir(parents=True)
        manifest = {
            "model": "toy",
            "version": version,
            "input_schema": {"tensor": "features", "datatype": "FP32", "features": FEATURES},
            "outputs": ["score", "decision", "confidence"],
        }
        (d / "manifest.json").write_text(json.dumps(manifest))
    routes = root / "routes"
    routes.mkdir()
    (routes / "toy.yaml").write_text(
        'model: toy\nchampion: {target: toy, version: "2"}\n' + route_extra
    )
    return load_settings(
        None,
        env={},
        base_dir=root,
        routing_model_repository=str(repo),
        routing_routes_dir=str(routes),
        predlog_spool_dir=str(root / "spool"),
        predlog_flush_interval_s=0.0,
    )


def toy_backend() -> FakeBackend:
    inputs = [{"name": "features", "datatype": "FP32", "shape": [-1, 3]}]
    return FakeBackend([FakeModel("toy", toy_fn, versions=("1", "2"), inputs=inputs)])


def small_fn(inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    x = inputs["features"].data.astype(np.float32)
    score = np.full((x.shape[0], 1), 0.25, dtype=np.float32)
    decision = np.array([[b"approve"]] * x.shape[0], dtype=object)
    return {
        "score": Tensor("score", "FP32", score),
        "decision": Tensor("decision", "BYTES", decision),
        "confidence": Tensor("confidence", "FP32", 1 - score),
    }


class ListSink:
    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    def record(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)


def write_small_model(repo: Path) -> None:
    d = repo / "toy_small" / "1"
    d.mkdir(parents=True)
    manifest = {
        "model": "toy_small",
        "version": "1",
        "input_schema": {"tensor": "features", "datatype": "FP32", "features": FEATURES},
        "outputs": ["score", "decision", "confidence"],
    }
    (d / "manifest.json").write_text(json.dumps(manifest))


def small_backend() -> FakeBackend:
    """The route's fallback model, `toy_small`, on a backend of its own."""
    return FakeBackend([FakeModel("toy_small", small_fn)], name="small")


async def ladder_client(
    tmp_path: Path,
    aiohttp_client: Any,
    primary: FakeBackend,
    small: FakeBackend,
    route: str,
    breaker: Any,
    retry: Any,
) -> tuple[Any, ListSink, Any]:
    """The app over a pool of two members, `primary` (toy) and `fallback` (toy_small), with
    the prediction log captured: (test client, sink, pool)."""
    from gateway.api.keys import SERVICE
    from gateway.app import build_app
    from gateway.backends.pool import BackendPool, PoolMember

    settings = write_repo(tmp_path, route)
    write_small_model(settings.routing.model_repository)
    pool = BackendPool(
        [
            PoolMember("primary", primary, frozenset({"toy"})),
            PoolMember("fallback", small, frozenset({"toy_small"})),
        ],
        breaker_policy=breaker,
        retry_policy=retry,
    )
    app = build_app(settings, backend=pool)
    sink = ListSink()
    app[SERVICE].predlog = sink
    return await aiohttp_client(app), sink, pool


@contextlib.asynccontextmanager
async def served(
    settings: Settings, keepalive_timeout_s: float | None = None
) -> AsyncIterator[int]:
    """The app (toy backend) behind the runner serve_one uses, aiohttp's protocol settings
    included (the aiohttp_server fixture would not apply them), on a free port of 127.0.0.1."""
    runner = app_runner(
        build_app(settings, backend=toy_backend()), settings.server, keepalive_timeout_s
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()
