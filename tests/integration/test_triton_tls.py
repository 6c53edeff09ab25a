"""TLS to Triton: a real tritonserver with --grpc-use-ssl (and, second, mutual TLS), reached
through the pool the composition root builds from `triton.tls_*`; a plaintext channel to the
same port gets nothing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from gateway.app import build_pool
from gateway.backends.triton import TritonBackend
from gateway.config import load_settings
from gateway.errors import BackendUnavailable
from gateway.metrics import Metrics
from gateway.tensors import Tensor
from gateway.types import Deadline, InferRequest
from tests.conftest import TritonFactory
from tests.integration.test_tritonserver import write_add_one
from tests.tls_pki import self_signed


def _infer_request() -> InferRequest:
    x = np.array([[1.0, 2.5]], dtype=np.float32)
    return InferRequest("add_one", "", (Tensor("INPUT0", "FP32", x),))


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
async def test_the_pool_reaches_triton_over_tls_and_plaintext_fails(
    triton_factory: TritonFactory, tmp_path: Path, mutual: bool
) -> None:
    server_cert, client_cert = self_signed(tmp_path, "triton"), self_signed(tmp_path, "client")
    args = ["--grpc-use-ssl=true", f"--grpc-server-cert={server_cert.cert}",
            f"--grpc-server-key={server_cert.key}"]  # fmt: skip
    if mutual:
        args += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={client_cert.cert}"]
    server = triton_factory(write_add_one(tmp_path / "models"), extra_args=tuple(args))
    settings = load_settings(None, env={}, triton_grpc_url=f"localhost:{server.ports.grpc}")
    tls = dataclasses.replace(
        settings.triton,
        tls_ca_file=server_cert.cert,
        tls_cert_file=client_cert.cert if mutual else None,
        tls_key_file=client_cert.key if mutual else None,
    )
    pool = build_pool(dataclasses.replace(settings, triton=tls), Metrics())
    (member,) = pool.members
    try:
        assert await member.backend.server_ready(5.0)
        reply = await member.backend.infer(_infer_request(), Deadline.after(10))
        np.testing.assert_allclose(reply.outputs["OUTPUT0"].data, [[2.0, 3.5]])
    finally:
        await member.backend.close()
    plain = TritonBackend(settings.triton.grpc_url)
    try:
        with pytest.raises(BackendUnavailable):
            await plain.server_ready(2.0)
    finally:
        await plain.close()
