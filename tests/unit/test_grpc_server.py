"""The OIP gRPC front door on a FakeBackend: stock tritonclient.grpc.aio against it, error
statuses from the error tree, the gRPC deadline, streaming, and cancellation into the core."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import grpc
import ml_dtypes  # tritonclient's own dependency: its BF16 arrays
import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient
from aiohttp import web
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from gateway.api.grpc_server import CODE_METADATA, grpc_serving
from gateway.api.keys import SERVICE, SETTINGS
from gateway.api.v2_proto import encode_proto
from gateway.app import build_app
from gateway.backends.base import InferResponse
from gateway.errors import BackendUnavailable, Overloaded
from gateway.tensors import Tensor
from gateway.tritonserver import free_port
from tests.unit.fake_backend import FakeBackend
from tests.unit.fakes import toy_backend, toy_fn, write_repo

X = np.array([[0.5, 0.0, -1.0], [1.0, 2.0, 3.0]], np.float32)


@pytest.fixture
def backend() -> FakeBackend:
    return toy_backend()


@pytest.fixture
def app(tmp_path: Path, backend: FakeBackend) -> web.Application:
    settings = write_repo(tmp_path)
    server = dataclasses.replace(settings.server, host="127.0.0.1", grpc_port=free_port())
    settings = dataclasses.replace(settings, server=server)
    app = build_app(settings, backend=backend)
    app.cleanup_ctx.append(grpc_serving(settings))
    return app


@pytest.fixture
async def address(app: web.Application, aiohttp_client) -> str:
    await aiohttp_client(app)  # starts the app, and with it the gRPC server
    return f"127.0.0.1:{app[SETTINGS].server.grpc_port}"


@pytest.fixture
async def client(address: str) -> AsyncIterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(address)
    yield c
    await c.close()


def features(x: np.ndarray = X) -> grpcclient.InferInput:
    inp = grpcclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


async def poll(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_stock_client_infers_through_the_core(client, backend) -> None:
    res = await client.infer(
        "toy", [features()], request_id="r-1", parameters={"entity_id": "e1"}, priority=3
    )
    expected = toy_fn({"features": features_tensor()})
    np.testing.assert_array_equal(res.as_numpy("score"), expected["score"].data)
    np.testing.assert_array_equal(res.as_numpy("decision"), expected["decision"].data)
    reply = res.get_response()
    assert (reply.model_name, reply.id) == ("toy", "r-1")
    sent = backend.calls[-1]
    assert dict(sent.parameters) == {"entity_id": "e1", "priority": 3}
    assert sent.request_id == "r-1" and sent.version == "2"  # the route's champion
    np.testing.assert_array_equal(sent.inputs[0].data, X)


def features_tensor() -> Tensor:
    return Tensor("features", "FP32", X)


async def test_typed_contents_equal_raw_contents(address: str, backend) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        msg = service_pb2.ModelInferRequest(model_name="toy", model_version="1")
        spec = msg.inputs.add(name="features", datatype="FP32", shape=list(X.shape))
        spec.contents.fp32_contents.extend(X.ravel().tolist())
        msg.outputs.add(name="score")
        reply = await stub.ModelInfer(msg, timeout=5)
    assert [o.name for o in reply.outputs] == ["score"] and reply.model_version == "1"
    np.testing.assert_array_equal(backend.calls[-1].inputs[0].data, X)
    score = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(
        list(reply.outputs[0].shape)
    )
    np.testing.assert_array_equal(score, toy_fn({"features": features_tensor()})["score"].data)


async def test_health_and_metadata(client) -> None:
    assert await client.is_server_live()
    assert await client.is_server_ready()
    assert await client.is_model_ready("toy", "2")
    assert not await client.is_model_ready("toy", "9")
    assert not await client.is_model_ready("nope")
    meta = await client.get_model_metadata("toy", as_json=True)
    assert meta["name"] == "toy" and meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": ["-1", "3"]}]
    config = await client.get_model_config("toy", as_json=True)
    assert config["config"]["name"] == "toy"
    server = await client.get_server_metadata(as_json=True)
    assert server["name"] == "fake"


@pytest.mark.parametrize(
    ("call", "status", "code"),
    [
        (lambda c: c.infer("nope", [features()]), "NOT_FOUND", "model_not_found"),
        (lambda c: c.infer("toy", [features()], model_version="9"), "NOT_FOUND",
         "version_not_found"),
        (lambda c: c.get_model_metadata("nope"), "NOT_FOUND", "model_not_found"),
        (lambda c: c.get_model_config("nope"), "NOT_FOUND", "model_not_found"),
        (lambda c: c.infer("toy", [grpcclient.InferInput("features", [-1, 3], "FP32")]),
         "INVALID_ARGUMENT", "invalid_tensor"),
    ],
)  # fmt: skip
async def test_errors_map_to_grpc_status(address: str, client, call, status, code) -> None:
    with pytest.raises(InferenceServerException) as info:
        await call(client)
    assert info.value.status() == f"StatusCode.{status}", info.value


async def test_error_code_rides_in_trailing_metadata(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        msg = service_pb2.ModelInferRequest(model_name="toy")
        msg.inputs.add(name="features", datatype="FP32", shape=[1, 40] + [1] * 40)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(msg, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (CODE_METADATA, "invalid_tensor") in tuple(info.value.trailing_metadata())


async def test_message_over_the_body_limit_is_resource_exhausted(client, backend) -> None:
    x = np.zeros((1, (1 << 20) // 4 + 16), np.float32)  # just over server.max_body_bytes
    with pytest.raises(InferenceServerException) as info:
        await client.infer("toy", [features(x)])
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert backend.calls == []


@pytest.mark.parametrize(
    ("exc", "status"),
    [(BackendUnavailable("down"), "UNAVAILABLE"), (Overloaded("busy"), "RESOURCE_EXHAUSTED")],
)
async def test_backend_failures_map_by_class(client, backend, exc, status) -> None:
    backend.fail_with = exc
    with pytest.raises(InferenceServerException) as info:
        await client.infer("toy", [features()])
    assert info.value.status() == f"StatusCode.{status}"


async def test_grpc_deadline_is_the_request_deadline(client, app, monkeypatch) -> None:
    service, left = app[SERVICE], []
    core = service.infer

    async def infer(request, deadline):
        left.append(deadline.remaining())
        return await core(request, deadline)

    monkeypatch.setattr(service, "infer", infer)
    await client.infer("toy", [features()], client_timeout=20)
    await client.infer("toy", [features()])  # no gRPC deadline: the default (1 s)
    # upper bounds decide it (20 s given, the 1 s default otherwise); the lower ones only say
    # time was left, with slack for a loaded CI machine. grpc computes time_remaining from
    # its cached clock, which can lag the client's by a tick: 20.099 s was seen for 20 s.
    assert 10 < left[0] <= 20.5 and 0 < left[1] <= 1.0, left


async def test_passed_grpc_deadline_is_deadline_exceeded(client, backend) -> None:
    backend.hang = True  # answers only when the deadline it was given runs out
    with pytest.raises(InferenceServerException) as info:
        await client.infer("toy", [features()], client_timeout=0.2)
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    await poll(lambda: backend.in_flight == 0)  # the server gave up on the call too


async def test_client_cancel_cancels_the_backend_call(address: str, backend) -> None:
    backend.hang = True
    async with grpc.aio.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        msg = service_pb2.ModelInferRequest(model_name="toy")
        spec = msg.inputs.add(name="features", datatype="FP32", shape=[1, 3])
        msg.raw_input_contents.append(np.zeros(3, np.float32).tobytes())
        call = stub.ModelInfer(msg, timeout=25)  # the backend would hang for 25 s
        await poll(lambda: backend.in_flight == 1)
        assert spec.name == "features"
        started = time.monotonic()
        call.cancel()
        await poll(lambda: backend.in_flight == 0, timeout_s=5)
    assert time.monotonic() - started < 5
    with pytest.raises(asyncio.CancelledError):
        await call


async def test_stream_answers_each_request_and_reports_errors_in_band(client, backend) -> None:
    results: list[tuple[object, object]] = []

    async def requests():
        yield {"model_name": "toy", "inputs": [features()], "request_id": "a"}
        yield {"model_name": "nope", "inputs": [features()], "request_id": "b"}
        yield {"model_name": "toy", "inputs": [features()], "request_id": "c"}

    async for result, error in client.stream_infer(requests(), stream_timeout=10):
        results.append((result, error))
    assert [r.get_response().id for r, e in results if e is None] == ["a", "c"]
    errors = [e for _, e in results if e is not None]
    assert len(errors) == 1 and "nope" in errors[0].message()
    assert len(backend.calls) == 2  # the unknown model got its NOT_FOUND before the backend


def test_response_parameters_become_infer_parameters() -> None:
    params = {"policy_version": "routes@abc", "fallback_used": None, "cached": True,
              "rung": 2, "big": 2**63, "share": 0.5}  # fmt: skip
    msg = encode_proto(InferResponse("toy", "2", {}, parameters=params), (), "id-1")
    got = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in msg.parameters.items()}
    assert got == {"policy_version": "routes@abc", "cached": True, "rung": 2, "big": 2**63,
                   "share": 0.5}  # fmt: skip
    assert msg.parameters["big"].WhichOneof("parameter_choice") == "uint64_param"
    assert (msg.id, msg.model_version) == ("id-1", "2")


async def test_grpc_calls_need_a_key_with_the_scope_when_auth_is_on(
    tmp_path: Path, aiohttp_client
) -> None:
    """The same guard as REST: no key UNAUTHENTICATED, a key without `predict`
    PERMISSION_DENIED, a `predict` key answers; ServerLive stays open."""
    from tests.unit.test_security_rest import add_key, with_auth

    keys_file = tmp_path / "auth" / "keys.yaml"
    settings = with_auth(write_repo(tmp_path), keys_file)
    server = dataclasses.replace(settings.server, host="127.0.0.1", grpc_port=free_port())
    settings = dataclasses.replace(settings, server=server)
    feedback_only = add_key(keys_file, "fb", "feedback")
    predict = add_key(keys_file, "app", "predict")
    app = build_app(settings, backend=toy_backend())
    app.cleanup_ctx.append(grpc_serving(settings))
    await aiohttp_client(app)
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    try:
        assert await c.is_server_live()
        for headers, status in [(None, "UNAUTHENTICATED"),
                                ({"authorization": f"Bearer {feedback_only}"},
                                 "PERMISSION_DENIED")]:  # fmt: skip
            with pytest.raises(InferenceServerException) as info:
                await c.infer("toy", [features()], headers=headers)
            assert info.value.status() == f"StatusCode.{status}"
        res = await c.infer("toy", [features()], headers={"authorization": f"Bearer {predict}"})
        assert res.as_numpy("score").shape == (2, 1)
    finally:
        await c.close()


async def test_a_zero_sized_shape_with_huge_dimensions_is_invalid_argument(
    address: str, backend
) -> None:
    """0 elements whatever the other dimensions say: numpy's reshape refused it with a
    ValueError, which came back INTERNAL."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        msg = service_pb2.ModelInferRequest(model_name="toy")
        msg.inputs.add(name="features", datatype="FP32", shape=[0, 2**62, 2**62])
        msg.raw_input_contents.append(b"")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(msg, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (CODE_METADATA, "invalid_tensor") in tuple(info.value.trailing_metadata())
    assert backend.calls == []


def _echo(inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {f"OUT_{k}": Tensor(f"OUT_{k}", t.datatype, t.data) for k, t in inputs.items()}


async def test_bf16_travels_raw_both_ways(client, backend) -> None:
    """BF16 as Triton takes it over gRPC: raw_input_contents, 2 bytes an element, and back
    in raw_output_contents bit for bit (stock tritonclient uses ml_dtypes.bfloat16)."""
    backend.models["toy"].fn = _echo
    x = np.array([[1.5, -2.0, 3.0e38]], dtype=ml_dtypes.bfloat16)
    inp = grpcclient.InferInput("x", list(x.shape), "BF16")
    inp.set_data_from_numpy(x)
    res = await client.infer("toy", [inp])
    out = res.as_numpy("OUT_x")
    assert out.dtype == ml_dtypes.bfloat16 and out.tobytes() == x.tobytes()
    sent = backend.calls[-1].inputs[0]
    assert (sent.datatype, sent.data.shape, sent.data.tobytes()) == ("BF16", (1, 3), x.tobytes())


async def test_bf16_in_typed_contents_is_invalid_argument(address: str, backend) -> None:
    """BF16 has no typed contents field; fp32_contents for it would be a silent
    reinterpretation, so it is refused as FP16's is."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        msg = service_pb2.ModelInferRequest(model_name="toy")
        spec = msg.inputs.add(name="x", datatype="BF16", shape=[2])
        spec.contents.fp32_contents.extend([1.5, -2.0])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(msg, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert backend.calls == []
