"""What stock tritonclient sends through the gateway reaches Triton as Triton would take it:
request parameters (sequence ids, custom ones) with their types, integer-keyed config maps,
BF16 tensors. A stand-in Triton gRPC server records what the real TritonBackend sends it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import ml_dtypes  # tritonclient's own dependency: its BF16 arrays
import numpy as np
import orjson
import pytest
import tritonclient.grpc.aio as grpcclient
import tritonclient.http.aio as httpclient
from aiohttp import web
from aiohttp.test_utils import TestClient
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from gateway.api.grpc_server import grpc_serving
from gateway.api.keys import SERVICE, SETTINGS
from gateway.app import build_app
from gateway.backends.triton import TritonBackend, proto_to_json
from gateway.tensors import Tensor
from gateway.tritonserver import free_port
from gateway.types import Deadline, InferRequest
from tests.unit.fakes import toy_backend, write_repo

ROW = np.array([[0.5, 0.0, -1.0]], np.float32)
BF16 = np.array([[1.5, -2.0, 3.0e38]], dtype=ml_dtypes.bfloat16)

CONFIG = model_config_pb2.ModelConfig(name="toy", max_batch_size=8)
CONFIG.dynamic_batching.priority_levels = 2
CONFIG.dynamic_batching.default_priority_level = 2
CONFIG.dynamic_batching.priority_queue_policy[1].max_queue_size = 16


class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Answers ModelInfer with a score per row (a BF16 input: that input back, as Triton
    sends a BF16 output), and records each request."""

    def __init__(self) -> None:
        self.seen: list[service_pb2.ModelInferRequest] = []

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        self.seen.append(request)
        r = service_pb2.ModelInferResponse(
            model_name=request.model_name, model_version="2", id=request.id
        )
        if request.inputs[0].datatype == "BF16":
            spec = request.inputs[0]
            r.outputs.add(name="y", datatype=spec.datatype, shape=spec.shape)
            r.raw_output_contents.append(request.raw_input_contents[0])
            return r
        rows = request.inputs[0].shape[0]
        r.outputs.add(name="score", datatype="FP32", shape=[rows, 1])
        r.raw_output_contents.append(np.full((rows, 1), 0.5, np.float32).tobytes())
        return r

    async def ModelReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ModelReadyResponse(ready=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerReadyResponse(ready=True)

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        return service_pb2.ModelConfigResponse(config=CONFIG)


@pytest.fixture
async def triton() -> AsyncIterator[tuple[FakeTriton, str]]:
    fake, port = FakeTriton(), free_port()
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(fake, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    yield fake, f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.fixture
async def gateway(
    tmp_path: Path, triton: tuple[FakeTriton, str], aiohttp_client
) -> tuple[web.Application, TestClient]:
    """The app on the real TritonBackend, with its gRPC front door, and a REST client."""
    settings = write_repo(tmp_path)
    server = dataclasses.replace(settings.server, host="127.0.0.1", grpc_port=free_port())
    settings = dataclasses.replace(settings, server=server)
    app = build_app(settings, backend=TritonBackend(triton[1]))
    app.cleanup_ctx.append(grpc_serving(settings))
    return app, await aiohttp_client(app)


def sent_parameters(msg: service_pb2.ModelInferRequest) -> dict[str, tuple[str, Any]]:
    """Each parameter as (its InferParameter kind, its value)."""
    out = {}
    for key, p in msg.parameters.items():
        kind = p.WhichOneof("parameter_choice")
        out[key] = (kind, getattr(p, kind))
    return out


def last_infer(fake: FakeTriton) -> service_pb2.ModelInferRequest:
    return [m for m in fake.seen if m.id != "warm-probe"][-1]


async def test_rest_request_parameters_reach_triton_with_their_types(gateway, triton) -> None:
    """Sequence parameters and custom ones were dropped: a sequence model saw every request
    as a new sequence without a correlation id, and custom parameters were lost."""
    c = httpclient.InferenceServerClient(f"127.0.0.1:{gateway[1].port}")
    try:
        inp = httpclient.InferInput("features", [1, 3], "FP32")
        inp.set_data_from_numpy(ROW)
        await c.infer("toy", [inp], sequence_id=42, sequence_start=True, sequence_end=False,
                      timeout=10**9,  # the client's own: the gateway sends the time left
                      parameters={"temperature": 0.7, "mode": "fast", "n": 3, "entity_id": "e1",
                                  "segment": "eu"})  # fmt: skip
    finally:
        await c.close()
    got = sent_parameters(last_infer(triton[0]))
    timeout = got.pop("timeout")
    assert timeout[0] == "int64_param" and 0 < timeout[1] < 10**9
    assert got == {
        "sequence_id": ("int64_param", 42),
        "sequence_start": ("bool_param", True),
        "sequence_end": ("bool_param", False),
        "temperature": ("double_param", 0.7),
        "mode": ("string_param", "fast"),
        "n": ("int64_param", 3),
    }  # the gateway's own (entity_id, segment, binary_data_output) stay with the gateway


async def test_grpc_request_parameters_reach_triton_with_their_types(gateway, triton) -> None:
    app, _ = gateway
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{app[SETTINGS].server.grpc_port}")
    try:
        inp = grpcclient.InferInput("features", [1, 3], "FP32")
        inp.set_data_from_numpy(ROW)
        await c.infer("toy", [inp], sequence_id="user-7", sequence_start=True,
                      sequence_end=True, parameters={"flag": False, "ratio": 0.25})  # fmt: skip
    finally:
        await c.close()
    got = sent_parameters(last_infer(triton[0]))
    assert got.pop("timeout")[0] == "int64_param"
    assert got == {
        "sequence_id": ("string_param", "user-7"),
        "sequence_start": ("bool_param", True),
        "sequence_end": ("bool_param", True),
        "flag": ("bool_param", False),
        "ratio": ("double_param", 0.25),
    }


@pytest.mark.parametrize(
    ("params", "field"),
    [({"sequence_start": 1}, "sequence_start"), ({"sequence_end": "yes"}, "sequence_end"),
     ({"sequence_id": 1.5}, "sequence_id"), ({"sequence_id": True}, "sequence_id")],
)  # fmt: skip
async def test_a_mistyped_sequence_parameter_is_400_before_triton(
    gateway, triton, params: dict[str, Any], field: str
) -> None:
    """Triton refuses these too, but only after a round trip; the gateway knows first."""
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 3],
                        "data": ROW.ravel().tolist()}], "parameters": params}  # fmt: skip
    resp = await gateway[1].post("/v2/models/toy/infer", data=orjson.dumps(body))
    got = await resp.json()
    assert (resp.status, got["code"]) == (400, "invalid_parameter"), got
    assert field in got["error"]
    assert [m for m in triton[0].seen if m.id != "warm-probe"] == []


async def test_requests_with_sequence_parameters_are_never_merged(gateway, triton) -> None:
    """Merged rows travel under the first member's parameters: two sequences' rows must
    never share a call. Plain rows arriving together do (the control)."""
    app, _ = gateway
    service, fake = app[SERVICE], triton[0]

    def request(i: int, params: dict[str, Any]) -> InferRequest:
        return InferRequest("toy", "", (Tensor("features", "FP32", ROW + i),), (), f"r{i}",
                            params)  # fmt: skip

    plain = [request(i, {}) for i in range(2)]
    await asyncio.gather(*(service.infer(r, Deadline.after(5)) for r in plain))
    calls = [m for m in fake.seen if m.id != "warm-probe"]
    assert [m.inputs[0].shape[0] for m in calls] == [2]  # the control: these were merged
    fake.seen.clear()
    sequences = [request(i, {"sequence_id": 100 + i, "sequence_start": True}) for i in range(2)]
    await asyncio.gather(*(service.infer(r, Deadline.after(5)) for r in sequences))
    calls = [m for m in fake.seen if m.id != "warm-probe"]
    assert sorted(m.parameters["sequence_id"].int64_param for m in calls) == [100, 101]
    assert [m.inputs[0].shape[0] for m in calls] == [1, 1]


async def test_rest_config_with_an_integer_keyed_map_is_triton_json(gateway) -> None:
    """priority_queue_policy is a map<uint64, ...>: its keys came back ints, which orjson
    refuses as JSON object keys (a 500). Triton answers string keys, as protobuf JSON does."""
    app, rest = gateway
    c = httpclient.InferenceServerClient(f"127.0.0.1:{rest.port}")
    try:
        got = await c.get_model_config("toy")
    finally:
        await c.close()
    assert got["dynamic_batching"]["priority_queue_policy"] == {"1": {"max_queue_size": 16}}
    assert got["dynamic_batching"]["priority_levels"] == 2  # 64-bit ints stay numbers
    g = grpcclient.InferenceServerClient(f"127.0.0.1:{app[SETTINGS].server.grpc_port}")
    try:
        over_grpc = await g.get_model_config("toy")
    finally:
        await g.close()
    assert over_grpc.config == CONFIG  # and back into the proto over gRPC


def test_proto_to_json_map_keys_are_strings_as_in_protobuf_json() -> None:
    want = json_format.MessageToDict(CONFIG, preserving_proto_field_name=True)
    got = proto_to_json(CONFIG)
    assert got["dynamic_batching"]["priority_queue_policy"].keys() == (
        want["dynamic_batching"]["priority_queue_policy"].keys()
    )


async def test_bf16_round_trips_through_the_triton_backend(gateway, triton) -> None:
    """BF16 in over REST's binary extension, to Triton raw, and Triton's BF16 output
    decoded and sent back bit for bit."""
    c = httpclient.InferenceServerClient(f"127.0.0.1:{gateway[1].port}")
    try:
        inp = httpclient.InferInput("x", list(BF16.shape), "BF16")
        inp.set_data_from_numpy(BF16, binary_data=True)
        res = await c.infer("toy", [inp])
    finally:
        await c.close()
    out = res.as_numpy("y")
    assert out.dtype == ml_dtypes.bfloat16 and out.tobytes() == BF16.tobytes()
    msg = last_infer(triton[0])
    assert (msg.inputs[0].datatype, list(msg.inputs[0].shape)) == ("BF16", [1, 3])
    assert msg.raw_input_contents[0] == BF16.tobytes()


async def test_bf16_output_asked_for_as_json_comes_as_binary(tmp_path: Path, aiohttp_client):
    """JSON has no BF16 numbers (Triton refuses to write them): the output rides in the
    binary extension, which every OIP client reads."""

    def echo(inputs: Any) -> dict[str, Tensor]:
        return {"y": Tensor("y", "BF16", inputs["x"].data)}

    backend = toy_backend()
    client = await aiohttp_client(build_app(write_repo(tmp_path), backend=backend))
    backend.models["toy"].fn = echo  # after the warm-up probe, which sends features
    raw = BF16.tobytes()
    head = (b'{"inputs":[{"name":"x","datatype":"BF16","shape":[1,3],'
            b'"parameters":{"binary_data_size":%d}}],"outputs":[{"name":"y",'
            b'"parameters":{"binary_data":false}}]}' % len(raw))  # fmt: skip
    headers = {"Inference-Header-Content-Length": str(len(head))}
    resp = await client.post("/v2/models/toy/infer", data=head + raw, headers=headers)
    body = await resp.read()
    assert resp.status == 200, body
    n = int(resp.headers["Inference-Header-Content-Length"])
    out = orjson.loads(body[:n])["outputs"][0]
    assert out["parameters"] == {"binary_data_size": len(raw)} and "data" not in out
    assert body[n:] == raw


async def test_bf16_json_data_is_400(tmp_path: Path, aiohttp_client) -> None:
    """JSON numbers for BF16 would need a rounding the client did not choose: refused, as
    Triton does, and as FP16 typed contents are over gRPC."""
    backend = toy_backend()
    client = await aiohttp_client(build_app(write_repo(tmp_path), backend=backend))
    body = b'{"inputs":[{"name":"x","datatype":"BF16","shape":[2],"data":[1.5,2.0]}]}'
    resp = await client.post("/v2/models/toy/infer", data=body)
    got = await resp.json()
    assert (resp.status, got["code"]) == (400, "invalid_tensor"), got
    assert "binary" in got["error"]
    assert backend.calls == []
