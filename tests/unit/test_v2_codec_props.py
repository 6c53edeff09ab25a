"""Property tests of the OIP decoders (REST JSON, REST binary, gRPC proto): every generated
request either raises a ClientError (a 4xx) or decodes to tensors that match their declared
datatype and shape, and decoding never allocates much more than the request's own size."""

from __future__ import annotations

import json
import math
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from gateway.api.v2_codec import DATATYPES, DecodeLimits, decode_rest
from gateway.api.v2_proto import decode_proto
from gateway.backends.base import InferRequest
from gateway.errors import ClientError

LIMITS = DecodeLimits.for_body(1 << 16)
PROPS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
NAMES = sorted(DATATYPES)
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
JSON_ANY = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=12,
)


def mostly(valid: st.SearchStrategy[Any], junk: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` nine times in ten, so requests often get past the first checks."""
    return st.sampled_from([True] * 9 + [False]).flatmap(lambda ok: valid if ok else junk)


SHAPES = st.lists(st.integers(-2, 4), max_size=4) | st.lists(st.integers(0, 2**40), max_size=3)
SANE_SHAPES = st.lists(st.integers(0, 4), max_size=3)


def element(datatype: str) -> st.SearchStrategy[Any]:
    """A JSON element that fits the datatype."""
    dtype = DATATYPES.get(datatype, np.dtype(np.float64))
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return st.integers(int(info.min), int(info.max))
    return {
        "b": st.booleans(),
        "O": st.text(max_size=6),
        "f": st.floats(-1e4, 1e4) if dtype.itemsize == 2 else st.floats(-1e30, 1e30),
    }[dtype.kind]


@st.composite
def json_tensor(draw: st.DrawFn) -> dict[str, Any]:
    datatype = draw(mostly(st.sampled_from(NAMES), JSON_ANY))
    shape = draw(mostly(SANE_SHAPES, SHAPES | JSON_ANY))
    name = draw(mostly(st.sampled_from(["x", "y", "z"]), JSON_ANY))
    spec: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    concrete = isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
    count = math.prod(shape) if concrete else 0
    if count <= 64 and isinstance(datatype, str) and draw(st.sampled_from([True] * 9 + [False])):
        fits = element(datatype)
        elements = draw(
            mostly(st.just(fits), st.just(fits | JSON_SCALARS | st.integers(-300, 70_000)))
        )
        flat = draw(st.lists(elements, min_size=count, max_size=count))
        nested = count > 0 and draw(st.booleans())
        spec["data"] = np.array(flat, dtype=object).reshape(shape).tolist() if nested else flat
    else:
        spec["data"] = draw(JSON_ANY)
    if draw(st.sampled_from([True] * 9 + [False])) == 0:
        spec["parameters"] = draw(JSON_ANY)
    return spec


@st.composite
def json_request(draw: st.DrawFn) -> dict[str, Any]:
    inputs = st.lists(json_tensor(), min_size=1, max_size=3, unique_by=lambda s: str(s["name"]))
    body: dict[str, Any] = {"inputs": draw(mostly(inputs, JSON_ANY))}
    params = st.fixed_dictionaries(
        {},
        optional={
            "entity_id": mostly(st.text(max_size=4), JSON_SCALARS),
            "segment": mostly(st.text(max_size=4), JSON_SCALARS),
            "priority": mostly(st.integers(0, 9), JSON_SCALARS),
            "k": JSON_SCALARS,
        },
    )
    outputs = st.lists(st.sampled_from(["score", "decision"]), unique=True).map(
        lambda names: [{"name": n} for n in names]
    )
    for key, values in (
        ("id", mostly(st.text(max_size=4), JSON_ANY)),
        ("parameters", mostly(params, JSON_ANY)),
        ("outputs", mostly(outputs, st.lists(st.fixed_dictionaries({"name": JSON_ANY})))),
    ):
        if draw(st.booleans()):
            body[key] = draw(values)
    return body


@st.composite
def binary_request(draw: st.DrawFn) -> tuple[bytes, str]:
    """JSON header + binary tensors, with sizes that fit (mostly) or lie."""
    specs, chunks = [], []
    for name in draw(
        st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3, unique=True)
    ):
        datatype = draw(st.sampled_from(NAMES))
        shape = draw(mostly(SANE_SHAPES, SHAPES))
        count = math.prod(shape) if all(d >= 0 for d in shape) else 0
        if datatype == "BYTES" and count <= 32 and draw(st.sampled_from([True] * 9 + [False])):
            items = draw(st.lists(st.binary(max_size=5), min_size=count, max_size=count))
            raw = b"".join(len(b).to_bytes(4, "little") + b for b in items)
        elif count <= 64 and draw(st.sampled_from([True] * 9 + [False])):
            n = count * DATATYPES[datatype].itemsize
            raw = draw(st.binary(min_size=n, max_size=n))
        else:
            raw = draw(st.binary(max_size=64))
        size = draw(mostly(st.just(len(raw)), JSON_SCALARS))
        params = {"binary_data_size": size}
        specs.append({"name": name, "datatype": datatype, "shape": shape, "parameters": params})
        chunks.append(raw)
    head = json.dumps({"inputs": specs}).encode()
    body = head + b"".join(chunks) + draw(mostly(st.just(b""), st.binary(max_size=8)))
    return body, draw(mostly(st.just(str(len(head))), st.text(max_size=4)))


_TYPED = {
    "BOOL": ("bool_contents", st.booleans()),
    "INT8": ("int_contents", st.integers(-(2**31), 2**31 - 1)),
    "INT32": ("int_contents", st.integers(-(2**31), 2**31 - 1)),
    "UINT16": ("uint_contents", st.integers(0, 2**32 - 1)),
    "INT64": ("int64_contents", st.integers(-(2**63), 2**63 - 1)),
    "UINT64": ("uint64_contents", st.integers(0, 2**64 - 1)),
    "FP32": ("fp32_contents", st.floats(width=32)),
    "FP64": ("fp64_contents", st.floats()),
    "BYTES": ("bytes_contents", st.binary(max_size=5)),
}


_PARAMETERS = [
    ("entity_id", "string_param", st.text(max_size=4)),
    ("priority", "uint64_param", st.integers(0, 2**64 - 1)),
    ("segment", "string_param", st.text(max_size=4)),
    ("segment", "int64_param", st.integers(-5, 5)),  # not a string: invalid_parameter
    ("k", "double_param", st.floats()),
]


@st.composite
def proto_request(draw: st.DrawFn) -> service_pb2.ModelInferRequest:
    msg = service_pb2.ModelInferRequest(model_name=draw(mostly(st.just("m"), st.just(""))))
    raw = draw(st.booleans())
    names = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3, unique=True)
    for name in draw(mostly(names, st.lists(st.sampled_from(["a", ""]), max_size=3))):
        datatype = draw(mostly(st.sampled_from(NAMES), st.sampled_from(["FP8", "", "bf16"])))
        shape = draw(mostly(SANE_SHAPES, st.lists(st.integers(-(2**62), 2**62), max_size=9)))
        spec = msg.inputs.add(name=name, datatype=datatype, shape=shape)
        count = math.prod(shape) if all(d >= 0 for d in shape) else 0
        n = (
            count
            if count <= 64 and draw(st.sampled_from([True] * 9 + [False]))
            else draw(st.integers(0, 8))
        )
        if raw:
            itemsize = DATATYPES[datatype].itemsize if datatype in DATATYPES else 1
            msg.raw_input_contents.append(
                draw(st.binary(min_size=n * itemsize, max_size=n * itemsize))
            )
        elif datatype in _TYPED:
            field, values = _TYPED[datatype]
            getattr(spec.contents, field).extend(draw(st.lists(values, min_size=n, max_size=n)))
    for key, kind, values in draw(st.lists(st.sampled_from(_PARAMETERS), max_size=3)):
        setattr(msg.parameters[key], kind, draw(values))
    if not draw(st.integers(0, 9)):
        msg.raw_input_contents.append(b"junk")
    return msg


def decodes_or_4xx(decode: Callable[[], InferRequest], size: int) -> None:
    tracemalloc.start()
    try:
        try:
            req = decode()
        except ClientError as exc:
            assert 400 <= exc.status < 500 and exc.code
            event(f"4xx {exc.code}")  # --hypothesis-show-statistics: how the inputs spread
            return
        finally:
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    event("decoded")
    assert peak < 64 * size + (256 << 10), (peak, size)
    total = 0
    for t in req.inputs:
        assert isinstance(t.datatype, str) and t.data.dtype == DATATYPES[t.datatype]
        total += t.data.size
        if t.datatype == "BYTES":
            assert all(type(x) is bytes for x in t.data.ravel())
    assert total <= LIMITS.max_elements
    for key in ("entity_id", "segment"):
        assert type(req.parameters.get(key, "")) is str


def shapes_match(req: InferRequest, declared: list[list[int]]) -> None:
    assert [list(t.data.shape) for t in req.inputs] == declared


@PROPS
@given(json_request())
def test_rest_json_decodes_or_is_4xx(body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()  # stdlib: integers beyond 64 bits too

    def decode() -> InferRequest:
        req, _ = decode_rest("m", "", raw, None, LIMITS)
        shapes_match(req, [spec["shape"] for spec in body["inputs"]])
        return req

    decodes_or_4xx(decode, len(raw))


@PROPS
@given(binary_request())
def test_rest_binary_decodes_or_is_4xx(sent: tuple[bytes, str]) -> None:
    body, header_length = sent

    def decode() -> InferRequest:
        req, _ = decode_rest("m", "", body, header_length, LIMITS)
        specs = orjson.loads(body[: int(header_length)])["inputs"]
        shapes_match(req, [spec["shape"] for spec in specs])
        return req

    decodes_or_4xx(decode, len(body))


@PROPS
@given(proto_request())
def test_grpc_proto_decodes_or_is_4xx(msg: service_pb2.ModelInferRequest) -> None:
    def decode() -> InferRequest:
        req = decode_proto(msg, LIMITS)
        shapes_match(req, [list(spec.shape) for spec in msg.inputs])
        return req

    decodes_or_4xx(decode, msg.ByteSize())


@PROPS
@given(st.lists(st.integers(0, 2**16 - 1), max_size=16), st.booleans())
def test_bf16_raw_contents_decode_bit_for_bit(bits: list[int], over_grpc: bool) -> None:
    """BF16 (any 16 bits: NaNs, infinities, subnormals) is carried, never converted."""
    raw = np.array(bits, "<u2").tobytes()
    if over_grpc:
        msg = service_pb2.ModelInferRequest(model_name="m")
        msg.inputs.add(name="x", datatype="BF16", shape=[len(bits)])
        msg.raw_input_contents.append(raw)
        req = decode_proto(msg, LIMITS)
    else:
        spec = {"name": "x", "datatype": "BF16", "shape": [len(bits)],
                "parameters": {"binary_data_size": len(raw)}}  # fmt: skip
        head = orjson.dumps({"inputs": [spec]})
        req, _ = decode_rest("m", "", head + raw, str(len(head)), LIMITS)
    t = req.inputs[0]
    assert (t.datatype, t.shape, t.data.tobytes()) == ("BF16", [len(bits)], raw)
