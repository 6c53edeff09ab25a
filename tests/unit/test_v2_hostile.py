"""Hostile /v2 infer input through the real aiohttp app: each gets its 4xx and code, is
decided before any large allocation, and never reaches the backend (issue 11, item 6)."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient

from gateway.api.v2_codec import (
    Budget,
    DecodeLimits,
    RestOutputs,
    encode_rest,
    tensor_from_elements,
    tensor_from_raw,
)
from gateway.app import build_app
from gateway.backends.base import InferResponse
from gateway.errors import InvalidTensor
from gateway.tensors import Tensor
from tests.unit.fake_backend import FakeBackend
from tests.unit.fakes import toy_backend, write_repo

URL = "/v2/models/toy/infer"
FEATURES = {"name": "features", "datatype": "FP32", "shape": [1, 3], "data": [0.5, 0.0, -1.0]}


@pytest.fixture
def backend() -> FakeBackend:
    return toy_backend()


@pytest.fixture
async def client(tmp_path: Path, backend: FakeBackend, aiohttp_client) -> TestClient:
    return await aiohttp_client(build_app(write_repo(tmp_path), backend=backend))


def binary_body(header: dict[str, Any], raw: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


async def post(client: TestClient, body: Any, headers: dict[str, str] | None = None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = await client.post(URL, data=data, headers=headers or {})
    return resp.status, await resp.json()


def with_input(**changes: Any) -> dict[str, Any]:
    return {"inputs": [{**FEATURES, **changes}]}


def fp32_binary(shape: Any, n: int = 3, **params: Any) -> tuple[bytes, dict[str, str]]:
    raw = np.zeros(n, np.float32).tobytes()
    spec = {"name": "features", "datatype": "FP32", "shape": shape,
            "parameters": {"binary_data_size": len(raw), **params}}  # fmt: skip
    return binary_body({"inputs": [spec]}, raw)


@pytest.mark.parametrize("value", ["abc", "nan", "inf", "-inf", "-5", "0", "1e9", ""])
async def test_bad_deadline_header_is_400(client: TestClient, backend, value: str) -> None:
    status, body = await post(client, with_input(), {"X-Deadline-Ms": value})
    assert (status, body["code"]) == (400, "invalid_deadline"), body
    assert backend.calls == []


async def test_overlong_entity_header_is_400(client: TestClient, backend) -> None:
    status, body = await post(client, with_input(), {"X-Entity-ID": "e" * 5000})
    assert (status, body["code"]) == (400, "invalid_parameter"), body
    assert backend.calls == []


def _binary_size(value: Any) -> tuple[bytes, dict[str, str]]:
    return fp32_binary([1, 3], binary_data_size=value)


def _shape(shape: Any, n: int = 3) -> tuple[bytes, dict[str, str]]:
    return fp32_binary(shape, n)


def _bytes_shape(shape: list[int]) -> tuple[bytes, dict[str, str]]:
    raw = b"\x01\x00\x00\x00a"
    spec = {"name": "features", "datatype": "BYTES", "shape": shape,
            "parameters": {"binary_data_size": len(raw)}}  # fmt: skip
    return binary_body({"inputs": [spec]}, raw)


JSON_CASES: list[tuple[str, Any, int, str]] = [
    ("datatype as a list", with_input(datatype=["FP32"]), 400, "invalid_tensor"),
    ("unknown datatype", with_input(datatype="FP33"), 400, "unsupported_datatype"),
    ("top-level parameters a list", {**with_input(), "parameters": [1]}, 400, "invalid_parameter"),
    ("top-level parameters a string", {**with_input(), "parameters": "x"}, 400,
     "invalid_parameter"),
    ("input parameters a list", with_input(parameters=[]), 400, "invalid_parameter"),
    ("parameter value an object", {**with_input(), "parameters": {"a": {"b": 1}}}, 400,
     "invalid_parameter"),
    ("entity_id a number", {**with_input(), "parameters": {"entity_id": 7}}, 400,
     "invalid_parameter"),
    ("outputs as an object", {**with_input(), "outputs": {"name": "score"}}, 400,
     "invalid_field"),
    ("output without a name", {**with_input(), "outputs": [{"parameters": {}}]}, 400,
     "invalid_field"),
    ("output name a number", {**with_input(), "outputs": [{"name": 3}]}, 400, "invalid_field"),
    ("name as a list", with_input(name=["features"]), 400, "invalid_field"),
    ("id as a number", {**with_input(), "id": 5}, 400, "invalid_field"),
    ("inputs missing", {"outputs": []}, 400, "invalid_request"),
    ("inputs an object", {"inputs": {"name": "features"}}, 400, "invalid_request"),
    ("input not an object", {"inputs": [1]}, 400, "invalid_tensor"),
    ("shape with -1", with_input(shape=[-1, 3]), 400, "invalid_tensor"),
    ("shape of strings", with_input(shape=["1", "3"]), 400, "invalid_tensor"),
    ("shape of bools", with_input(shape=[True, 3]), 400, "invalid_tensor"),
    ("element count mismatch", with_input(data=[1.0, 2.0]), 400, "invalid_tensor"),
    ("nested depth mismatch", with_input(data=[[[0.5, 0.0, -1.0]]]), 400, "invalid_tensor"),
    ("nested size mismatch", with_input(shape=[2, 3], data=[[1, 2, 3], [4, 5]]), 400,
     "invalid_tensor"),
    ("ragged nested", with_input(shape=[1, 3], data=[[1, [2], 3]]), 400, "invalid_tensor"),
    ("string in FP32 data", with_input(data=["1", 2, 3]), 400, "invalid_tensor"),
    ("bool in FP32 data", with_input(data=[True, 2, 3]), 400, "invalid_tensor"),
    ("FP32 overflow", with_input(data=[1e300, 0, 0]), 400, "invalid_tensor"),
    ("INT8 out of range", with_input(datatype="INT8", data=[300, 0, 0]), 400, "invalid_tensor"),
    ("INT64 beyond 64 bits", with_input(datatype="INT64", data=[2**70, 0, 0]), 400,
     "invalid_tensor"),
    ("data not a list", with_input(data="abc"), 400, "invalid_tensor"),
    ("no data", {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 3]}]}, 400,
     "invalid_tensor"),
    ("duplicate input", {"inputs": [FEATURES, FEATURES]}, 400, "invalid_tensor"),
    ("too many elements declared", with_input(shape=[10**6, 10**6]), 413, "payload_too_large"),
    ("classification", {**with_input(), "outputs": [{"name": "score",
     "parameters": {"classification": 2}}]}, 400, "unsupported"),
    ("binary_data_output not a bool", {**with_input(), "parameters":
     {"binary_data_output": "yes"}}, 400, "invalid_parameter"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "body", "status", "code"), JSON_CASES, ids=[c[0] for c in JSON_CASES]
)
async def test_hostile_json_is_4xx(client: TestClient, backend, case, body, status, code) -> None:
    got_status, got = await post(client, body)
    assert (got_status, got["code"]) == (status, code), got
    assert backend.calls == []


BINARY_CASES = [
    ("binary_data_size a string", _binary_size("12"), 400, "invalid_parameter"),
    ("binary_data_size a float", _binary_size(12.0), 400, "invalid_parameter"),
    ("binary_data_size negative", _binary_size(-4), 400, "invalid_parameter"),
    ("binary_data_size a bool", _binary_size(True), 400, "invalid_parameter"),
    ("binary_data_size past the end", _binary_size(10**6), 400, "invalid_tensor"),
    ("binary shape [-1,-1]", _shape([-1, -1], 1), 400, "invalid_tensor"),
    ("binary shape of 40 dims", _shape([1] * 40, 1), 400, "invalid_tensor"),
    ("binary bytes do not fit the shape", _shape([1, 4]), 400, "invalid_tensor"),
    ("binary shape too large", _shape([2**40]), 413, "payload_too_large"),
    ("BYTES with shape [-1]", _bytes_shape([-1]), 400, "invalid_tensor"),
    ("BYTES count past the data", _bytes_shape([10**6]), 400, "invalid_tensor"),
    ("header length not a number", (b"{}", {"Inference-Header-Content-Length": "x"}), 400,
     "invalid_field"),
    ("header length negative", (b"{}", {"Inference-Header-Content-Length": "-1"}), 400,
     "invalid_field"),
    ("header length past the body", (b"{}", {"Inference-Header-Content-Length": "99"}), 400,
     "invalid_field"),
    ("trailing binary data", binary_body(with_input(), b"xx"), 400, "invalid_tensor"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "sent", "status", "code"), BINARY_CASES, ids=[c[0] for c in BINARY_CASES]
)
async def test_hostile_binary_is_4xx(client: TestClient, backend, case, sent, status, code) -> None:
    body, headers = sent
    got_status, got = await post(client, body, headers)
    assert (got_status, got["code"]) == (status, code), got
    assert backend.calls == []


async def test_json_bytes_of_numbers_is_400_without_allocating(client: TestClient) -> None:
    # 95 bytes in; bytes(200000000) would make 200 MB of zeros per element.
    body = with_input(datatype="BYTES", shape=[3], data=[200_000_000] * 3)
    tracemalloc.start()
    try:
        status, got = await post(client, body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (status, got["code"]) == (400, "invalid_tensor"), got
    assert peak < 5 << 20, peak


async def test_good_json_and_binary_requests_reach_the_core(client: TestClient, backend) -> None:
    body = {**with_input(), "parameters": {"entity_id": "e1", "segment": "eu", "priority": 2}}
    status, got = await post(client, body, {"X-Deadline-Ms": "250.5"})
    assert status == 200, got
    assert [o["name"] for o in got["outputs"]] == ["score", "decision", "confidence"]
    assert dict(backend.calls[-1].parameters) == {"entity_id": "e1", "segment": "eu",
                                                   "priority": 2}  # fmt: skip
    raw = np.array([[0.5, 0.0, -1.0]], np.float32)
    sent, headers = fp32_binary([1, 3])
    sent = sent[: -raw.nbytes] + raw.tobytes()
    resp = await client.post(URL, data=sent, headers={**headers, "X-Entity-ID": "e2"})
    assert resp.status == 200, await resp.text()
    got_bin = await resp.json()
    assert got_bin["outputs"] == got["outputs"]
    assert backend.calls[-1].parameters == {"entity_id": "e2"}
    np.testing.assert_array_equal(backend.calls[-1].inputs[0].data, raw)


async def test_nested_json_data_decodes_in_row_major_order(client: TestClient, backend) -> None:
    status, got = await post(client, with_input(shape=[2, 3], data=[[1, 2, 3], [4, 5, 6]]))
    assert status == 200, got
    np.testing.assert_array_equal(
        backend.calls[-1].inputs[0].data, np.arange(1, 7, dtype=np.float32).reshape(2, 3)
    )


def test_response_parameters_are_emitted_without_none() -> None:
    resp = InferResponse(
        "toy",
        "2",
        {"score": Tensor("score", "FP32", np.array([[0.25]], np.float32))},
        parameters={"policy_version": "routes@abc", "fallback_used": None, "request_id": "r"},
    )
    body, header_length = encode_rest(resp, RestOutputs({}, client_id="c1"), ())
    assert header_length is None
    assert json.loads(body) == {
        "model_name": "toy",
        "model_version": "2",
        "id": "c1",
        "parameters": {"policy_version": "routes@abc", "request_id": "r"},
        "outputs": [{"name": "score", "datatype": "FP32", "shape": [1, 1], "data": [0.25]}],
    }


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
async def test_a_non_finite_feature_row_is_400_and_never_reaches_the_model(
    client: TestClient, backend, value: float
) -> None:
    """The binary extension (and gRPC's raw contents) can carry NaN and inf, which JSON
    cannot. The model refuses them with an error Triton reports as INTERNAL, a server
    failure: five such requests from one client would open the breakers every client
    shares. The gateway refuses them first, as /v1 does."""
    raw = np.array([0.5, value, -1.0], np.float32).tobytes()
    spec = {"name": "features", "datatype": "FP32", "shape": [1, 3],
            "parameters": {"binary_data_size": len(raw)}}  # fmt: skip
    status, body = await post(client, *binary_body({"inputs": [spec]}, raw))
    assert (status, body["code"]) == (400, "non_finite_input")
    assert "row 0" in body["error"]
    assert backend.calls == []


# A zero makes the element count 0 whatever the other dimensions are, so the count alone
# let these through to numpy, whose reshape raised ValueError: a 500 instead of a 400.
ZERO_SIZED_HUGE = [[0, 2**62, 2**62], [0, 2**63], [0] + [2**16] * 5]


@pytest.mark.parametrize("shape", ZERO_SIZED_HUGE, ids=str)
async def test_a_zero_sized_shape_with_huge_dimensions_is_400(
    client: TestClient, backend, shape: list[int]
) -> None:
    status, got = await post(client, with_input(shape=shape, data=[]))
    assert (status, got["code"]) == (400, "invalid_tensor"), got
    status, got = await post(client, *fp32_binary(shape, 0))
    assert (status, got["code"]) == (400, "invalid_tensor"), got
    assert backend.calls == []


def test_a_shape_numpy_cannot_build_is_invalid_tensor_not_value_error() -> None:
    """The decoders' backstop, should a shape get past check_shape: numpy's ValueError
    becomes the client's 400, never a 500."""
    limits = DecodeLimits.for_body(1 << 20)
    shape = (0, 2**62, 2**62)
    with pytest.raises(InvalidTensor):
        tensor_from_raw("x", "FP32", np.dtype("<f4"), shape, memoryview(b""), Budget(limits))
    with pytest.raises(InvalidTensor):
        tensor_from_elements("x", "FP32", np.dtype("<f4"), shape, [], Budget(limits))
    with pytest.raises(InvalidTensor):
        tensor_from_raw("x", "BYTES", np.dtype(object), shape, memoryview(b""), Budget(limits))


async def raw_post(client: TestClient, extra: bytes, body: bytes) -> tuple[int, dict[str, Any]]:
    """A request sent byte for byte: aiohttp's client refuses header values that are not
    text, and those are what this checks."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(
            b"POST " + URL.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + extra + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        )  # fmt: skip
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head[9:12]), json.loads(payload)


@pytest.mark.parametrize("value", [b"\xff\xfe", b"e\xc3", b"a\tb"], ids=repr)
async def test_an_entity_header_that_is_not_utf8_text_is_400_before_the_model_runs(
    client: TestClient, backend, value: bytes
) -> None:
    """aiohttp decodes header bytes with surrogateescape: the value got past the length
    check, the model ran, and only the prediction log's hash failed on it, a 500 for an
    answer computed and never logged."""
    status, got = await raw_post(client, b"X-Entity-ID: " + value + b"\r\n",
                                 json.dumps(with_input()).encode())  # fmt: skip
    assert (status, got["code"]) == (400, "invalid_parameter"), got
    assert backend.calls == []


async def test_a_utf8_entity_header_reaches_the_core(client: TestClient, backend) -> None:
    status, got = await raw_post(client, "X-Entity-ID: café\r\n".encode(),
                                 json.dumps(with_input()).encode())  # fmt: skip
    assert status == 200, got
    assert backend.calls[-1].parameters == {"entity_id": "café"}
