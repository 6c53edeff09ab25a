"""Stock OIP clients, `tritonclient.grpc` and `tritonclient.http`, pointed at the gateway get
the same outputs, metadata and error codes as pointed at Triton directly (issue 11)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from sklearn.datasets import load_breast_cancer, load_digits
from tritonclient.utils import InferenceServerException

from gateway.tritonserver import TritonServer
from tests.integration.conftest import GatewayProcess

ROWS = {
    "digits": load_digits().data[:6].astype(np.float32),
    "risk": load_breast_cancer().data[:6].astype(np.float32),
}
OUTPUTS = {
    "digits": ("score", "decision", "confidence", "probabilities"),
    "risk": ("score", "decision", "confidence"),
}
PROTOCOLS = {"grpc": grpcclient, "http": httpclient}


@pytest.fixture(params=["grpc", "http", "grpc+http_infer", "http+http_infer"])
def clients(request, triton: TritonServer) -> Iterator[tuple[Any, Any, Any]]:
    """(module, client to the gateway, client to Triton) for one client protocol; with
    "+http_infer", through a gateway that infers over Triton's HTTP endpoint."""
    protocol, _, infer = request.param.partition("+")
    gateway = request.getfixturevalue("gateway_http_infer" if infer else "gateway")
    module = PROTOCOLS[protocol]
    if protocol == "grpc":
        urls = (gateway.grpc_url, triton.grpc_url)
    else:
        urls = (gateway.url.removeprefix("http://"), triton.http_url.removeprefix("http://"))
    via, direct = (module.InferenceServerClient(u) for u in urls)
    yield module, via, direct
    via.close()
    direct.close()


def infer(module: Any, client: Any, model: str, version: str = "", **kw: Any) -> Any:
    x = ROWS[model]
    inp = module.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    outs = [module.InferRequestedOutput(n) for n in OUTPUTS[model]]
    return client.infer(model, [inp], model_version=version, outputs=outs, **kw)


def version_of(result: Any) -> str:
    reply = result.get_response()
    return reply["model_version"] if isinstance(reply, dict) else reply.model_version


def assert_same_outputs(a: Any, b: Any, model: str) -> None:
    for name in OUTPUTS[model]:
        x, y = a.as_numpy(name), b.as_numpy(name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if x.dtype == np.object_:
            np.testing.assert_array_equal(x, y)
        else:  # the same Triton; only dynamic batching may group the rows differently
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("model", "version"),
    [("digits", "1"), ("digits", ""), ("risk", "1"), ("risk", "2"), ("risk", "")],
)
def test_outputs_equal_triton_direct(clients, model: str, version: str) -> None:
    module, via, direct = clients
    got = infer(module, via, model, version, request_id="r-7")
    # Unversioned: whichever version the gateway's route chose, Triton's answer at that version.
    answered = version_of(got)
    assert answered == (version or answered) and answered
    want = infer(module, direct, model, answered)
    assert_same_outputs(got, want, model)
    reply = got.get_response()
    assert (reply["id"] if isinstance(reply, dict) else reply.id) == "r-7"


@pytest.mark.parametrize(("model", "version"), [("digits", ""), ("risk", "1"), ("risk", "")])
def test_metadata_and_health_equal_triton_direct(clients, model: str, version: str) -> None:
    module, via, direct = clients
    kw = {"as_json": True} if module is grpcclient else {}
    assert via.get_model_metadata(model, version, **kw) == direct.get_model_metadata(
        model, version, **kw
    )
    config, want = (
        via.get_model_config(model, version, **kw),
        direct.get_model_config(model, version, **kw),
    )
    if module is grpcclient:
        assert config == want
    else:  # the gateway reads the config over gRPC, which omits fields at their defaults
        assert_within(config, want)
    assert via.is_server_live() and via.is_server_ready()
    assert via.is_model_ready(model, version)
    assert via.is_model_ready("nope") == direct.is_model_ready("nope") is False
    assert via.is_model_ready(model, "77") == direct.is_model_ready(model, "77") is False


def assert_within(part: Any, whole: Any) -> None:
    """Every field of ``part`` is in ``whole`` with the same value."""
    if isinstance(part, dict):
        assert isinstance(whole, dict)
        for key, value in part.items():
            assert key in whole, key
            assert_within(value, whole[key])
    elif isinstance(part, list):
        assert isinstance(whole, list) and len(part) == len(whole)
        for a, b in zip(part, whole, strict=True):
            assert_within(a, b)
    else:
        assert part == whole


def status_of(call: Any) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    return str(info.value.status())


@pytest.mark.parametrize(
    ("case", "expected"),
    [("unknown model", {"grpc": "StatusCode.NOT_FOUND", "http": "404"}),
     ("unknown version", {"grpc": "StatusCode.NOT_FOUND", "http": "404"}),
     ("wrong shape", {"grpc": "StatusCode.INVALID_ARGUMENT", "http": "400"}),
     ("unknown output", {"grpc": "StatusCode.INVALID_ARGUMENT", "http": "400"})],
)  # fmt: skip
def test_errors_equal_triton_direct(clients, case: str, expected: dict[str, str]) -> None:
    module, via, direct = clients

    def call(client: Any) -> Any:
        if case == "unknown model":
            return client.infer("nope_model", [_input(module, ROWS["digits"])])
        if case == "unknown version":
            return infer(module, client, "digits", "77")
        if case == "unknown output":
            return client.infer("digits", [_input(module, ROWS["digits"])],
                                outputs=[module.InferRequestedOutput("zzz")])  # fmt: skip
        return client.infer("digits", [_input(module, ROWS["risk"][:, :3])])

    protocol = "grpc" if module is grpcclient else "http"
    assert status_of(lambda: call(via)) == status_of(lambda: call(direct)) == expected[protocol]


def _input(module: Any, x: np.ndarray) -> Any:
    inp = module.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def test_deadline_too_short_is_deadline_exceeded(gateway: GatewayProcess, triton) -> None:
    for url in (gateway.grpc_url, triton.grpc_url):
        client = grpcclient.InferenceServerClient(url)
        try:
            got = status_of(lambda c=client: infer(grpcclient, c, "digits", client_timeout=0.001))
        finally:
            client.close()
        assert got == "StatusCode.DEADLINE_EXCEEDED"
    # REST has no deadline of its own: the gateway's X-Deadline-Ms header gives one (504).
    client = httpclient.InferenceServerClient(gateway.url.removeprefix("http://"))
    try:
        got = status_of(
            lambda: infer(httpclient, client, "digits", headers={"X-Deadline-Ms": "0.05"})
        )
    finally:
        client.close()
    assert got == "504"


def test_stream_infer_through_the_gateway(gateway: GatewayProcess) -> None:
    results: list[Any] = []
    client = grpcclient.InferenceServerClient(gateway.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: results.append((result, error)))
        client.async_stream_infer("digits", [_input(grpcclient, ROWS["digits"])], request_id="s1")
        client.async_stream_infer(
            "nope_model", [_input(grpcclient, ROWS["digits"])], request_id="s2"
        )
        client.stop_stream()  # waits for the answers
    finally:
        client.close()
    ok = [r for r, e in results if e is None]
    errors = [e for _, e in results if e is not None]
    assert [r.get_response().id for r in ok] == ["s1"]
    assert ok[0].as_numpy("probabilities").shape == (6, 10)
    assert len(errors) == 1 and "nope_model" in errors[0].message()
