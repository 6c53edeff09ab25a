"""TLS settings (gateway/tls.py): one-way TLS on the gRPC front door in-process, and the
settings mistakes that must stop the start rather than serve plaintext or fail handshakes."""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.api.grpc_server import grpc_serving
from gateway.app import build_app
from gateway.config import ConfigError, ServerSettings, TritonSettings
from gateway.tls import (
    grpc_server_credentials,
    rest_ssl_context,
    server_tls_enabled,
    triton_channel_credentials,
)
from gateway.tritonserver import free_port
from tests.tls_pki import self_signed
from tests.unit.fakes import toy_backend, write_repo


async def test_grpc_front_door_serves_tls_and_refuses_plaintext(tmp_path: Path, aiohttp_client):
    pair = self_signed(tmp_path / "pki", "server")
    settings = write_repo(tmp_path)
    server = dataclasses.replace(
        settings.server, grpc_port=free_port(), tls_cert_file=pair.cert, tls_key_file=pair.key
    )
    settings = dataclasses.replace(settings, server=server)
    app = build_app(settings, backend=toy_backend())
    app.cleanup_ctx.append(grpc_serving(settings))
    await aiohttp_client(app)  # starts the app and its gRPC server
    address = f"127.0.0.1:{server.grpc_port}"
    request = service_pb2.ServerLiveRequest()
    creds = grpc.ssl_channel_credentials(pair.cert.read_bytes())
    async with grpc.aio.secure_channel(address, creds) as channel:
        reply = await service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(
            request, timeout=5
        )
    assert reply.live
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as plain:
            await service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(request, timeout=5)
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE


def test_rest_context_requires_client_certificates_only_with_a_client_ca(tmp_path: Path) -> None:
    pair = self_signed(tmp_path, "server")
    one_way = ServerSettings(tls_cert_file=pair.cert, tls_key_file=pair.key)
    ctx = rest_ssl_context(one_way)
    assert ctx is not None and ctx.verify_mode == ssl.CERT_NONE
    mutual = rest_ssl_context(dataclasses.replace(one_way, tls_client_ca_file=pair.cert))
    assert mutual is not None and mutual.verify_mode == ssl.CERT_REQUIRED
    assert rest_ssl_context(ServerSettings()) is None and not server_tls_enabled(ServerSettings())
    assert grpc_server_credentials(ServerSettings()) is None


def test_tls_mistakes_stop_the_start(tmp_path: Path) -> None:
    pair = self_signed(tmp_path, "server")
    with pytest.raises(ConfigError, match="go together"):
        rest_ssl_context(ServerSettings(tls_cert_file=pair.cert))
    with pytest.raises(ConfigError, match="go together"):
        grpc_server_credentials(ServerSettings(tls_key_file=pair.key))
    missing = ServerSettings(tls_cert_file=tmp_path / "nope.crt", tls_key_file=pair.key)
    with pytest.raises(ConfigError, match=r"nope\.crt"):
        rest_ssl_context(missing)
    with pytest.raises(ConfigError, match=r"nope\.crt"):
        grpc_server_credentials(missing)
    wrong_key = ServerSettings(tls_cert_file=pair.cert, tls_key_file=pair.cert)
    with pytest.raises(ConfigError):
        rest_ssl_context(wrong_key)
    assert triton_channel_credentials(TritonSettings()) is None
    with pytest.raises(ConfigError, match="tls_ca_file"):
        triton_channel_credentials(TritonSettings(tls_cert_file=pair.cert, tls_key_file=pair.key))
    with pytest.raises(ConfigError, match="tls_ca_file"):
        triton_channel_credentials(TritonSettings(tls_ca_file=tmp_path / "absent.crt"))
