"""TLS on both front doors of a real `python -m gateway serve` process, with mTLS on: a client
with the CA and a client certificate gets answers over HTTPS and gRPC; a plaintext client, or
one without a certificate, gets none. No Triton is needed: the health calls answer without one.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.tritonserver import free_port
from tests.tls_pki import CertPair, self_signed


@dataclass(frozen=True)
class TlsGateway:
    port: int
    grpc_port: int
    server: CertPair
    client: CertPair
    log: Path


def _client_context(gw: TlsGateway, with_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=gw.server.cert)
    if with_cert:
        ctx.load_cert_chain(gw.client.cert, gw.client.key)
    return ctx


def _https_get(gw: TlsGateway, path: str, ctx: ssl.SSLContext) -> dict[str, object]:
    url = f"https://127.0.0.1:{gw.port}{path}"
    with urllib.request.urlopen(url, timeout=5, context=ctx) as r:
        assert r.status == 200
        return dict(json.loads(r.read()))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> Iterator[TlsGateway]:
    tmp = tmp_path_factory.mktemp("tls")
    server, client = self_signed(tmp, "server"), self_signed(tmp, "client", cn="client")
    gw = TlsGateway(free_port(), free_port(), server, client, tmp / "gateway.log")
    env = {
        **os.environ,
        "SWITCHYARD__SERVER__HOST": "127.0.0.1",
        "SWITCHYARD__SERVER__PORT": str(gw.port),
        "SWITCHYARD__SERVER__GRPC_PORT": str(gw.grpc_port),
        "SWITCHYARD__SERVER__TLS_CERT_FILE": str(server.cert),
        "SWITCHYARD__SERVER__TLS_KEY_FILE": str(server.key),
        "SWITCHYARD__SERVER__TLS_CLIENT_CA_FILE": str(client.cert),  # mTLS
        "SWITCHYARD__TRITON__GRPC_URL": f"127.0.0.1:{free_port()}",  # nothing listens
        "SWITCHYARD__REDIS__URL": '""',
        "SWITCHYARD__PREDLOG__SPOOL_DIR": str(tmp / "spool"),
        "SWITCHYARD__AUDIT__LOCAL_FILE": str(tmp / "audit.jsonl"),
        "SWITCHYARD__TELEMETRY__TRITON_SCRAPE_INTERVAL_S": "0",
    }
    with gw.log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", "configs/gateway.yaml"],
            cwd=repo_root, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:  # poll: the process is up once HTTPS answers
            assert proc.poll() is None, gw.log.read_text()[-3000:]
            try:
                _https_get(gw, "/healthz", _client_context(gw))
                break
            except (OSError, http.client.HTTPException):
                assert time.monotonic() < deadline, gw.log.read_text()[-3000:]
                time.sleep(0.1)
        yield gw
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_https_with_a_client_certificate_answers(gateway: TlsGateway) -> None:
    body = _https_get(gateway, "/healthz", _client_context(gateway))
    assert body["status"] == "ok"


def test_plaintext_http_and_a_missing_client_certificate_get_nothing(
    gateway: TlsGateway,
) -> None:
    with pytest.raises((OSError, http.client.HTTPException)):
        urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}/healthz", timeout=5)
    with pytest.raises((OSError, http.client.HTTPException)):  # mTLS: no certificate, no answer
        _https_get(gateway, "/healthz", _client_context(gateway, with_cert=False))


def _server_live(channel: grpc.Channel) -> bool:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    return bool(stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=5).live)


def test_grpc_over_tls_answers_and_plaintext_fails(gateway: TlsGateway) -> None:
    address = f"127.0.0.1:{gateway.grpc_port}"
    creds = grpc.ssl_channel_credentials(
        root_certificates=gateway.server.cert.read_bytes(),
        private_key=gateway.client.key.read_bytes(),
        certificate_chain=gateway.client.cert.read_bytes(),
    )
    with grpc.secure_channel(address, creds) as channel:
        assert _server_live(channel)
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as plain:
        _server_live(channel)
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
    anonymous = grpc.ssl_channel_credentials(gateway.server.cert.read_bytes())
    with grpc.secure_channel(address, anonymous) as channel, pytest.raises(grpc.RpcError):
        _server_live(channel)  # mTLS: no client certificate, no call
