"""gateway.tritonserver against the real tritonserver of the nvidia-pytriton wheel.

Most tests use a throwaway one-model repository (``add_one``) written into a temp dir, so
they do not depend on the trained models in ``model_repository/``.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from gateway.tritonserver import (
    TritonInstallation,
    TritonNotFound,
    TritonOptions,
    TritonPorts,
    TritonServer,
    TritonStartError,
)

TritonFactory = Callable[..., TritonServer]  # the conftest fixture `triton_factory`

ADD_ONE_CONFIG = """\
name: "add_one"
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""

ADD_ONE_MODEL = """\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        {initialize}

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out = pb_utils.Tensor("OUTPUT0", (x + 1).astype(np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
"""


def write_add_one(root: Path, initialize: str = "pass") -> Path:
    model = root / "add_one"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(ADD_ONE_CONFIG)
    (model / "1" / "model.py").write_text(ADD_ONE_MODEL.format(initialize=initialize))
    return root


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def add_one_repo(tmp_path: Path) -> Path:
    return write_add_one(tmp_path / "models")


def test_locate_finds_the_wheel(triton_installation: TritonInstallation) -> None:
    found = triton_installation
    assert os.access(found.binary, os.X_OK)
    assert (found.python_backend / "libtriton_python.so").is_file()
    assert found.stub.parent.name == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert found.libs_dir.is_dir()
    env = found.environment({"PATH": "/usr/bin"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["LD_LIBRARY_PATH"] == str(found.libs_dir)


def test_locate_names_the_available_stubs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "pytriton" / "tritonserver"
    for part in ("bin/tritonserver", "backends/python/libtriton_python.so"):
        (home / part).parent.mkdir(parents=True, exist_ok=True)
        (home / part).touch()
    (home / "python_backend_stubs" / "3.8").mkdir(parents=True)
    (tmp_path / "pytriton" / "__init__.py").touch()
    (tmp_path / "nvidia_pytriton.libs").mkdir()
    monkeypatch.delitem(sys.modules, "pytriton", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    with pytest.raises(TritonNotFound, match=rf"no .*stub for Python {version}.*available: 3\.8"):
        TritonInstallation.locate()


def test_options_reject_what_triton_would_reject(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="explicit"):
        TritonOptions(tmp_path, load_models=("a",))
    with pytest.raises(ValueError, match=r"'\*'"):
        TritonOptions(tmp_path, model_control_mode="explicit", load_models=("*", "a"))


def test_free_ports_are_distinct() -> None:
    ports = TritonPorts.free()
    assert len({ports.http, ports.grpc, ports.metrics}) == 3


def test_serves_infers_and_stops(triton_factory: TritonFactory, add_one_repo: Path) -> None:
    server = triton_factory(add_one_repo)
    assert server.grpc_url == f"127.0.0.1:{server.ports.grpc}"
    client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    try:
        assert client.is_model_ready("add_one")
        x = np.array([[1.0, 2.5]], dtype=np.float32)
        inp = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("add_one", [inp])
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), x + 1)
    finally:
        client.close()
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        assert b"nv_inference_request_success" in response.read()

    pid = server.pid
    assert pid is not None and group_alive(pid)  # server and its Python stub
    assert server.stop() == 0
    assert not server.running
    assert not group_alive(pid)
    assert server.stop() == 0  # idempotent


def test_explicit_mode_loads_all_and_allows_unload(
    triton_factory: TritonFactory, add_one_repo: Path
) -> None:
    server = triton_factory(add_one_repo, model_control_mode="explicit", load_models=("*",))
    client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    try:
        assert client.is_model_ready("add_one")
        client.unload_model("add_one")
        assert wait_for(lambda: not client.is_model_ready("add_one"))
        client.load_model("add_one")
        assert client.is_model_ready("add_one")
    finally:
        client.close()


def test_missing_repository_fails_fast_with_log_tail(
    triton_installation: TritonInstallation, tmp_path: Path
) -> None:
    server = TritonServer(
        TritonOptions(tmp_path / "nowhere", TritonPorts.free()), installation=triton_installation
    )
    started = time.monotonic()
    with pytest.raises(TritonStartError, match=r"exited with code \d+(.|\n)*nowhere"), server:
        pytest.fail("should not become ready")
    assert time.monotonic() - started < 60
    assert not server.running


def test_broken_model_error_reaches_the_exception(
    triton_installation: TritonInstallation, tmp_path: Path
) -> None:
    repo = write_add_one(tmp_path / "models", initialize='raise RuntimeError("weights corrupt")')
    server = TritonServer(TritonOptions(repo, TritonPorts.free()), installation=triton_installation)
    with pytest.raises(TritonStartError, match="weights corrupt"), server:
        pass
    assert not server.running


def test_stop_kills_a_server_that_ignores_sigterm(
    triton_installation: TritonInstallation, tmp_path: Path
) -> None:
    # A stand-in binary that ignores SIGTERM, like a server stuck in shutdown.
    binary = tmp_path / "stubborn"
    binary.write_text(
        textwrap.dedent("""\
            #!/bin/sh
            trap '' TERM
            echo trapped
            exec sleep 600
        """)
    )
    binary.chmod(0o755)
    fake = TritonInstallation(
        binary=binary,
        python_backend=triton_installation.python_backend,
        stub=triton_installation.stub,
        libs_dir=triton_installation.libs_dir,
        python=triton_installation.python,
    )
    server = TritonServer(TritonOptions(tmp_path, TritonPorts.free()), installation=fake)
    server.start()
    assert wait_for(lambda: "trapped" in server.log_tail())
    started = time.monotonic()
    assert server.stop(grace_s=0.5) == -9
    assert time.monotonic() - started < 5


def test_session_server_serves_the_model_repository(triton: TritonServer) -> None:
    client = httpclient.InferenceServerClient(triton.http_url.removeprefix("http://"))
    try:
        index = client.get_model_repository_index()
    finally:
        client.close()
    assert index, "model_repository/ has no models"
    not_ready = [m for m in index if m.get("state") != "READY"]
    assert not not_ready
