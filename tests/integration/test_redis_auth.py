"""Redis with a password and over TLS: a redis-server of the test's own (--requirepass, a TLS
port), reached by the gateway's client factory with the password from the environment or a
file, never from the settings file."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ConnectionError, ResponseError

from gateway.config import ConfigError, RedisSettings, Settings, load_settings
from gateway.observability import redis_client
from gateway.redis_conn import PASSWORD_ENV, redis_password
from gateway.tritonserver import free_port
from tests.conftest import unavailable
from tests.tls_pki import CertPair, self_signed

PASSWORD = "s3cret-for-this-test-only"


@dataclasses.dataclass(frozen=True)
class PasswordedRedis:
    plain_url: str
    tls_url: str
    cert: CertPair


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PasswordedRedis]:
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable("redis-server is not installed")
    tmp = tmp_path_factory.mktemp("redis-auth")
    cert = self_signed(tmp, "redis")
    port, tls_port = free_port(), free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp), "--requirepass", PASSWORD, "--tls-port", str(tls_port),
         "--tls-cert-file", str(cert.cert), "--tls-key-file", str(cert.key),
         "--tls-auth-clients", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        import redis

        probe = redis.Redis(port=port, password=PASSWORD, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                probe.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, "no redis-server"
                time.sleep(0.05)
        probe.close()
        yield PasswordedRedis(
            f"redis://127.0.0.1:{port}/0", f"rediss://localhost:{tls_port}/0", cert
        )
    finally:
        proc.kill()
        proc.wait(5)


def settings_with(**redis: Any) -> Settings:
    base = load_settings(None, env={})
    return dataclasses.replace(base, redis=dataclasses.replace(base.redis, **redis))


async def _ping(client: aioredis.Redis | None) -> bool:
    assert client is not None
    try:
        return bool(await client.ping())
    finally:
        await client.aclose()


async def test_the_password_from_the_environment_authenticates(
    server: PasswordedRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_with(url=server.plain_url)
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    with pytest.raises((AuthenticationError, ResponseError)):  # NOAUTH without it
        await _ping(redis_client(settings))
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    assert await _ping(redis_client(settings))
    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    with pytest.raises((AuthenticationError, ResponseError)):
        await _ping(redis_client(settings))


async def test_the_password_from_a_file_authenticates(
    server: PasswordedRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    secret = tmp_path / "redis_password"
    secret.write_text(PASSWORD + "\n")  # a mounted secret's trailing newline is not part of it
    settings = settings_with(url=server.plain_url, password_file=secret)
    assert await _ping(redis_client(settings))


async def test_rediss_speaks_tls_with_the_password(
    server: PasswordedRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    settings = settings_with(url=server.tls_url, tls_ca_file=server.cert.cert)
    assert await _ping(redis_client(settings))
    plaintext_to_tls = settings_with(url=server.tls_url.replace("rediss:", "redis:"))
    with pytest.raises(ConnectionError):  # the TLS port does not speak plaintext
        await _ping(redis_client(plaintext_to_tls))


def test_a_password_in_the_settings_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("redis:\n  url: redis://:hunter2@127.0.0.1:6379/0\n")
    with pytest.raises(ConfigError, match="SWITCHYARD_REDIS_PASSWORD") as refused:
        load_settings(config, env={}, base_dir=tmp_path)
    assert "hunter2" not in str(refused.value)  # the refusal does not repeat the secret
    # A user name alone is fine; so is a url set by the environment (a deployment's secret).
    config.write_text("redis:\n  url: redis://app@127.0.0.1:6379/0\n")
    assert load_settings(config, env={}).redis.url == "redis://app@127.0.0.1:6379/0"
    env = {"SWITCHYARD__REDIS__URL": "redis://:from-a-secret@redis:6379/0"}
    assert load_settings(None, env=env).redis.url.endswith("@redis:6379/0")


def test_an_empty_password_file_stops_the_start(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        redis_password(RedisSettings(url="redis://x:1", password_file=empty), env={})
