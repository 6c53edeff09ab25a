"""A real gateway process (`python -m gateway serve`) in front of the session's tritonserver."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from gateway.tritonserver import TritonServer, free_port
from tests.conftest import unavailable


@dataclass(frozen=True)
class GatewayProcess:
    url: str
    port: int
    spool_dir: Path
    log_file: Path
    process: subprocess.Popen[bytes]
    grpc_url: str = ""  # host:port of its OIP gRPC server


def wait_http_ok(url: str, timeout_s: float, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout_s}s:\n{log.read_text()[-3000:]}")


def start_gateway(
    repo_root: Path,
    workdir: Path,
    grpc_url: str,
    extra_env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
) -> GatewayProcess:
    port, grpc_port = free_port(), free_port()
    spool = workdir / "spool"
    log = workdir / "gateway.log"
    env = {
        **os.environ,
        "SWITCHYARD__TRITON__GRPC_URL": grpc_url,
        "SWITCHYARD__PREDLOG__SPOOL_DIR": str(spool),
        "SWITCHYARD__SERVER__HOST": "127.0.0.1",
        "SWITCHYARD__SERVER__PORT": str(port),
        "SWITCHYARD__SERVER__GRPC_PORT": str(grpc_port),
        # No Redis unless a test asks for it: the prediction log stays in the spool directory.
        "SWITCHYARD__REDIS__URL": '""',
        # These tests check answers on a shared 2-core machine, where a cold Python-backend
        # model's first calls can pass risk's 200 ms SLO ceiling (2 x p99) and the ladder would
        # answer instead; deadline-driven fallback is covered by the unit tests.
        "SWITCHYARD__ROUTING__SLO_DEADLINE_FACTOR": "10",
        # Likewise the latency trigger trips at 3 x the SLO (300 ms for risk), not at it.
        "SWITCHYARD__RESILIENCE__FALLBACK__LATENCY__SLO_MULTIPLIER": "3",
        **(extra_env or {}),
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", "configs/gateway.yaml", *args],
            cwd=repo_root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    gw = GatewayProcess(
        f"http://127.0.0.1:{port}", port, spool, log, proc, f"127.0.0.1:{grpc_port}"
    )
    try:
        wait_http_ok(f"{gw.url}/healthz", 60, proc, log)
    except Exception:
        proc.kill()
        raise
    return gw


def stop_gateway(gw: GatewayProcess) -> None:
    gw.process.terminate()
    try:
        gw.process.wait(15)
    except subprocess.TimeoutExpired:
        gw.process.kill()
        gw.process.wait(5)


@pytest.fixture(scope="session")
def gateway(
    triton: TritonServer, repo_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    gw = start_gateway(repo_root, tmp_path_factory.mktemp("gateway"), triton.grpc_url)
    wait_http_ok(f"{gw.url}/readyz", 60, gw.process, gw.log_file)
    yield gw
    stop_gateway(gw)


@pytest.fixture(scope="session")
def gateway_http_infer(
    triton: TritonServer, repo_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """The session gateway's twin, inferring over Triton's HTTP endpoint
    (``triton.infer_protocol: http``)."""
    env = {"SWITCHYARD__TRITON__INFER_PROTOCOL": "http",
           "SWITCHYARD__TRITON__HTTP_URL": triton.http_url}  # fmt: skip
    gw = start_gateway(repo_root, tmp_path_factory.mktemp("gateway-http"), triton.grpc_url, env)
    wait_http_ok(f"{gw.url}/readyz", 60, gw.process, gw.log_file)
    yield gw
    stop_gateway(gw)


class RedisServer:
    """A redis-server of the test's own, with an fsync'd AOF so a kill loses nothing acked."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        poll(lambda: _pings(client), 10, "redis-server did not start")
        client.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def poll(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.05)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own on a free port (fsync'd AOF), killed at the end."""
    if shutil.which("redis-server") is None:
        unavailable("redis-server not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    if server.proc is not None:
        server.kill()
