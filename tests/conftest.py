"""Shared fixtures: a real tritonserver per session, extra servers on demand, Redis, ports.

Integration fixtures skip when a dependency is missing on a developer machine, but fail when
the ``CI`` environment variable is set: CI must never pass by skipping what it should test.
Tests under ``tests/integration/`` get the ``integration`` marker automatically.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from gateway.tritonserver import (
    TritonInstallation,
    TritonNotFound,
    TritonOptions,
    TritonPorts,
    TritonServer,
)
from gateway.tritonserver import free_port as _free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")
#: Redis for tests; the database is flushed before and after each test that uses it.
REDIS_URL = os.environ.get("SWITCHYARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

TritonFactory = Callable[..., TritonServer]


def unavailable(reason: str) -> NoReturn:
    """Skip a test whose dependency is missing, or fail it under CI."""
    if IN_CI:
        pytest.fail(f"{reason} (CI set: integration dependencies must be available)", pytrace=False)
    pytest.skip(reason)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    integration_dir = REPO_ROOT / "tests" / "integration"
    for item in items:
        if item.path.is_relative_to(integration_dir):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def free_port() -> int:
    """A free TCP port on 127.0.0.1 (use ``gateway.tritonserver.free_port()`` for more)."""
    return _free_port()


@pytest.fixture(scope="session")
def triton_installation() -> TritonInstallation:
    try:
        return TritonInstallation.locate()
    except TritonNotFound as exc:
        unavailable(f"tritonserver unavailable: {exc}")


@pytest.fixture(scope="session")
def triton(
    triton_installation: TritonInstallation,
    repo_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TritonServer]:
    """One real tritonserver for the session, serving the repo's ``model_repository/``.

    Explicit model-control mode with every model loaded, so tests can load and unload
    versions; a test that does so must restore what it changed (others share this server),
    or use ``triton_factory`` for a server of its own.
    """
    model_repository = repo_root / "model_repository"
    if not model_repository.is_dir():
        unavailable(f"no model repository at {model_repository}")
    server = TritonServer(
        TritonOptions(
            model_repository=model_repository,
            ports=TritonPorts.free(),
            model_control_mode="explicit",
            load_models=("*",),
        ),
        installation=triton_installation,
        log_file=tmp_path_factory.mktemp("triton") / "tritonserver.log",
        ready_timeout_s=120,
    )
    with server:
        yield server


@pytest.fixture
def triton_factory(
    triton_installation: TritonInstallation, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonFactory]:
    """Start extra servers: ``triton_factory(model_repository, **TritonOptions fields)``.

    Each is ready when returned and stopped at the end of the test (or earlier, by the test).
    """
    servers: list[TritonServer] = []

    def start(model_repository: Path, ready_timeout_s: float = 120, **options: Any) -> TritonServer:
        options.setdefault("ports", TritonPorts.free())
        server = TritonServer(
            TritonOptions(model_repository=model_repository, **options),
            installation=triton_installation,
            log_file=tmp_path_factory.mktemp("triton") / "tritonserver.log",
            ready_timeout_s=ready_timeout_s,
        )
        servers.append(server)
        server.start()
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


def reachable_redis() -> Any:
    """A client of the test Redis (REDIS_URL) that answered a ping; the test skips (fails
    under CI) when it does not."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=5)
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        client.close()
        unavailable(f"Redis unreachable at {REDIS_URL}: {exc}")
    return client


async def reachable_aioredis() -> Any:
    """`reachable_redis` for asyncio tests (a redis.asyncio client)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        await client.ping()
    except (aioredis.ConnectionError, aioredis.TimeoutError) as exc:
        await client.aclose()
        unavailable(f"Redis unreachable at {REDIS_URL}: {exc}")
    return client


@pytest.fixture
def redis_url() -> Iterator[str]:
    """URL of a Redis database (db 15 by default) flushed before and after the test."""
    client = reachable_redis()
    client.flushdb()
    try:
        yield REDIS_URL
    finally:
        client.flushdb()
        client.close()


@pytest.fixture(autouse=True)
def _no_audit_to_the_developers_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    """CLI commands under test (keys create, routes set-weight) would record to the audit
    stream of configs/gateway.yaml's Redis (db 0) or to var/audit/ of the checkout; the audit
    trail's own tests turn it back on with a stream and file of their own."""
    monkeypatch.setenv("SWITCHYARD__AUDIT__ENABLED", "false")
