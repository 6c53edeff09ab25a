"""Decoding untrusted Open Inference Protocol (KServe v2) infer requests, for REST and gRPC.

Both front doors share the limits and the checks here, so a hostile request gets the same 4xx
over either, and every check runs before any allocation proportional to a size the request
merely declares (a shape, a length): what may be allocated is bounded by what was received.
REST's JSON and binary-tensor forms are decoded here; `v2_proto` holds the protobuf forms.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from gateway.backends.base import InferRequest, InferResponse
from gateway.errors import (
    ClientError,
    InvalidField,
    InvalidParameter,
    InvalidTensor,
    MalformedJSON,
    PayloadTooLarge,
)
from gateway.tensors import Tensor, to_bytes

Scalar = str | int | float | bool

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
    # numpy has no bfloat16 (ml_dtypes is not a dependency): its raw bits, which is all the
    # gateway moves. Raw only, as Triton takes it; JSON numbers for it are refused (_RAW_ONLY).
    "BF16": np.dtype("<u2"),
}
#: Datatypes that travel as raw bytes only: REST's binary extension, gRPC's raw contents.
_RAW_ONLY = frozenset({"BF16"})
#: Python types a JSON (or typed-proto) element may have, per kind of datatype.
# (BYTES: str from JSON, bytes from typed proto contents; never a number, which
# `bytes(n)` would turn into n zero bytes.)
_ELEMENT_TYPES: dict[str, set[type]] = {
    "b": {bool},
    "i": {int},
    "u": {int},
    "f": {int, float},
    "O": {str, bytes},
}
#: Request parameters the core reads, or Triton does, with the types each may have (exact
#: types: a bool is not an int here). Triton refuses the sequence ones otherwise too, but only
#: after a round trip; they travel on to Triton (`gateway.tensors.backend_parameters`).
_KNOWN_PARAMETERS: dict[str, tuple[type, ...]] = {
    "entity_id": (str,),
    "segment": (str,),
    "priority": (int,),
    "sequence_id": (int, str),
    "sequence_start": (bool,),
    "sequence_end": (bool,),
}
_LEN = struct.Struct("<I")
_FLOAT_MAX = {2: float(np.finfo(np.float16).max), 4: float(np.finfo(np.float32).max)}
_INT_RANGE = {
    d.char: (int(np.iinfo(d).min), int(np.iinfo(d).max))
    for d in DATATYPES.values()
    if d.kind in "iu"
}


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """What one infer request may hold, checked before anything is allocated for it."""

    max_elements: int
    max_bytes: int
    max_dims: int = 8
    max_inputs: int = 64
    max_outputs: int = 64
    max_name_len: int = 256
    max_string_len: int = 4096  # ids and string parameters; BYTES elements are bounded by size
    max_parameters: int = 64

    @classmethod
    @functools.lru_cache(maxsize=8)  # a value per configured limit: built once, not per call
    def for_body(cls, max_body_bytes: int) -> DecodeLimits:
        """Limits that follow from the body (and gRPC message) size limit. Every encoding
        spends at least one byte per element (raw BOOL/INT8; JSON two, `0,`; BYTES four, its
        length prefix), so an honest request never declares more elements than the limit has
        bytes; and no encoding expands more than 8x (a one-byte varint or a two-byte JSON
        literal into an 8-byte element), so decoded tensors never exceed 8x the limit."""
        return cls(max_elements=max_body_bytes, max_bytes=8 * max_body_bytes)


@dataclass(frozen=True, slots=True)
class RestOutputs:
    """How the REST response encodes each output: binary extension or JSON data."""

    binary: Mapping[str, bool]
    binary_default: bool = False
    client_id: str = ""  # echoed as "id" only when the client sent one, as Triton does


# -- shared checks --------------------------------------------------------------------------
def check_name(value: Any, limits: DecodeLimits, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > limits.max_name_len:
        raise InvalidField(
            f"{what} must be a non-empty string of at most {limits.max_name_len} characters",
            details={"field": what},
        )
    return value


def check_datatype(value: Any, name: str) -> np.dtype:
    if not isinstance(value, str):
        raise InvalidTensor(
            f"input {name!r}: datatype must be a string",
            details={"input": name, "field": "datatype"},
        )
    try:
        return DATATYPES[value]
    except KeyError:
        raise InvalidTensor(
            f"input {name!r}: unsupported datatype {value[:32]!r}",
            code="unsupported_datatype",
            details={"input": name, "field": "datatype"},
        ) from None


def check_shape(value: Any, name: str, limits: DecodeLimits) -> tuple[int, ...]:
    """A concrete shape (no -1), at most max_dims long, with at most max_elements elements,
    and whose non-zero dimensions multiply to at most max_elements too."""
    if not isinstance(value, list | tuple) or len(value) > limits.max_dims:
        raise InvalidTensor(
            f"input {name!r}: shape must be a list of at most {limits.max_dims} dimensions",
            details={"input": name, "field": "shape"},
        )
    count = extent = 1
    for d in value:
        if type(d) is not int or d < 0:
            raise InvalidTensor(
                f"input {name!r}: shape {list(value)[:16]} must hold non-negative integers",
                details={"input": name, "field": "shape"},
            )
        count *= d
        extent *= d or 1
    if count > limits.max_elements:
        raise PayloadTooLarge(
            f"input {name!r}: shape {list(value)} declares {count} elements, over the limit "
            f"of {limits.max_elements}",
            details={"input": name, "limit": limits.max_elements},
        )
    # A zero makes the count 0 whatever the other dimensions say, but numpy still multiplies
    # those (times the itemsize) into an intp, and refuses [0, 2**62, 2**62] with a
    # ValueError. So they are bounded as the count is: an honest empty batch keeps the
    # other dimensions of a tensor within the limits.
    if extent > limits.max_elements:
        raise InvalidTensor(
            f"input {name!r}: shape {list(value)} has dimensions over the element limit of "
            f"{limits.max_elements}",
            details={"input": name, "field": "shape", "limit": limits.max_elements},
        )
    return tuple(value)


class Budget:
    """Elements and bytes decoded so far in one request, against the limits."""

    __slots__ = ("bytes", "elements", "limits")

    def __init__(self, limits: DecodeLimits) -> None:
        self.limits, self.elements, self.bytes = limits, 0, 0

    def spend(self, name: str, elements: int, nbytes: int) -> None:
        self.elements += elements
        self.bytes += nbytes
        if self.elements > self.limits.max_elements or self.bytes > self.limits.max_bytes:
            raise PayloadTooLarge(
                f"input {name!r}: the request's tensors exceed the limit of "
                f"{self.limits.max_elements} elements or {self.limits.max_bytes} bytes",
                details={"input": name},
            )


def check_parameters(value: Any, limits: DecodeLimits, where: str) -> dict[str, Scalar]:
    """A parameters object: string keys to str, int, float or bool values."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > limits.max_parameters:
        raise InvalidParameter(
            f"{where}parameters must be an object of at most {limits.max_parameters} entries",
            details={"field": f"{where}parameters"},
        )
    for key, v in value.items():
        ok = isinstance(v, str | int | float) and (
            not isinstance(v, str) or len(v) <= limits.max_string_len
        )
        if (
            not ok
            or len(key) > limits.max_name_len
            or (isinstance(v, float) and not math.isfinite(v))
        ):
            raise InvalidParameter(
                f"{where}parameter {key[:64]!r} must be a string, number or boolean",
                details={"field": f"{where}parameters.{key[:64]}"},
            )
        wanted = _KNOWN_PARAMETERS.get(key)
        if wanted is not None and type(v) not in wanted:
            raise InvalidParameter(
                f"{where}parameter {key!r} must be of type "
                f"{' or '.join(t.__name__ for t in wanted)}",
                details={"field": f"{where}parameters.{key}"},
            )
    return value


def tensor_from_raw(
    name: str,
    datatype: str,
    dtype: np.dtype,
    shape: tuple[int, ...],
    raw: memoryview,
    budget: Budget,
) -> Tensor:
    """Raw little-endian contents (BYTES: each element uint32-length-prefixed)."""
    count = math.prod(shape)
    if dtype.kind != "O":
        if len(raw) != count * dtype.itemsize:
            raise InvalidTensor(
                f"input {name!r}: {len(raw)} bytes do not fit shape {list(shape)} of {datatype}",
                details={"input": name},
            )
        budget.spend(name, count, len(raw))
        return Tensor(name, datatype, _reshape(np.frombuffer(raw, dtype=dtype), shape, name))
    if count * _LEN.size > len(raw):  # each element needs its 4-byte length at least
        raise InvalidTensor(f"input {name!r}: truncated BYTES data", details={"input": name})
    budget.spend(name, count, len(raw))
    items, pos = [], 0
    for _ in range(count):
        if pos + _LEN.size > len(raw):
            raise InvalidTensor(f"input {name!r}: truncated BYTES data", details={"input": name})
        (n,) = _LEN.unpack_from(raw, pos)
        end = pos + _LEN.size + n
        if end > len(raw):
            raise InvalidTensor(f"input {name!r}: truncated BYTES data", details={"input": name})
        items.append(bytes(raw[pos + _LEN.size : end]))
        pos = end
    if pos != len(raw):
        raise InvalidTensor(f"input {name!r}: trailing BYTES data", details={"input": name})
    return Tensor(name, datatype, _object_array(items, shape, name))


def tensor_from_elements(
    name: str,
    datatype: str,
    dtype: np.dtype,
    shape: tuple[int, ...],
    flat: list[Any],
    budget: Budget,
) -> Tensor:
    """A flat list of Python scalars (JSON data, typed proto contents) of the right count."""
    count = math.prod(shape)
    if len(flat) != count:
        raise InvalidTensor(
            f"input {name!r}: {len(flat)} elements do not fit shape {list(shape)}",
            details={"input": name},
        )
    allowed = _ELEMENT_TYPES[dtype.kind]
    found = set(map(type, flat))
    if not found <= allowed:
        bad = sorted(t.__name__ for t in found - allowed)
        raise InvalidTensor(
            f"input {name!r}: {datatype} elements cannot be of type {', '.join(bad)}",
            details={"input": name},
        )
    if dtype.kind == "O":
        try:
            items = [s.encode() if type(s) is str else s for s in flat]
        except UnicodeEncodeError:
            raise InvalidTensor(
                f"input {name!r}: BYTES element is not valid UTF-8", details={"input": name}
            ) from None
        budget.spend(name, count, sum(map(len, items)))
        return Tensor(name, datatype, _object_array(items, shape, name))
    budget.spend(name, count, count * dtype.itemsize)
    return Tensor(name, datatype, _reshape(_numeric_array(name, dtype, flat), shape, name))


def _numeric_array(name: str, dtype: np.dtype, flat: list[Any]) -> np.ndarray:
    # Range first: numpy wraps out-of-range Python ints (with a DeprecationWarning) and casts
    # too-large floats to inf; neither is what the client sent.
    if not flat:
        return np.empty(0, dtype=dtype)
    if dtype.kind in "iu":
        lo, hi = _INT_RANGE[dtype.char]
        if min(flat) < lo or max(flat) > hi:
            raise InvalidTensor(
                f"input {name!r}: value out of range for {dtype.name}", details={"input": name}
            )
        return np.array(flat, dtype=dtype)
    if dtype.kind == "b":
        return np.array(flat, dtype=dtype)
    try:
        if dtype.itemsize < 8 and not max(map(abs, flat)) <= _FLOAT_MAX[dtype.itemsize]:
            with np.errstate(over="raise"):  # which value is a finite double too large?
                return np.array(flat, dtype=np.float64).astype(dtype)
        return np.array(flat, dtype=dtype)
    except (OverflowError, FloatingPointError):  # OverflowError: an int beyond any double
        raise InvalidTensor(
            f"input {name!r}: value out of range for {dtype.name}", details={"input": name}
        ) from None


def _object_array(items: list[bytes], shape: tuple[int, ...], name: str) -> np.ndarray:
    arr = np.empty(len(items), dtype=np.object_)
    arr[:] = items
    return _reshape(arr, shape, name)


def _reshape(arr: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    """``arr.reshape(shape)``, numpy's refusal a 400: check_shape should have refused any
    shape numpy cannot build, and this keeps a gap there a client error, never a 500."""
    try:
        return arr.reshape(shape)
    except ValueError as exc:
        raise InvalidTensor(
            f"input {name!r}: shape {list(shape)} cannot be built: {exc}",
            details={"input": name, "field": "shape"},
        ) from None


# -- REST: JSON header and binary-tensor extension -----------------------------------------
def decode_rest(
    model: str,
    version: str,
    body: bytes,
    header_length: str | None,
    limits: DecodeLimits,
    request_id: str = "",
) -> tuple[InferRequest, RestOutputs]:
    """A REST infer body (JSON, or JSON header + binary tensors when ``header_length`` is
    the Inference-Header-Content-Length header) -> the core's request and the output
    encoding. ``request_id`` names the request when the body has no ``id``."""
    header, binary = _split_body(body, header_length)
    if not isinstance(header, dict):
        raise ClientError("an inference request must be a JSON object", code="invalid_request")
    client_id = header.get("id", "")
    if not isinstance(client_id, str) or len(client_id) > limits.max_string_len:
        raise InvalidField("id must be a string", details={"field": "id"})
    params = dict(check_parameters(header.get("parameters"), limits, ""))
    binary_default = params.pop("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidParameter(
            "parameters.binary_data_output must be a boolean",
            details={"field": "parameters.binary_data_output"},
        )
    inputs = _rest_inputs(header.get("inputs"), binary, limits)
    names, binary_out = _rest_outputs(header.get("outputs"), limits)
    request = InferRequest(model, version, inputs, names, client_id or request_id, params)
    return request, RestOutputs(binary_out, binary_default, client_id)


def _split_body(body: bytes, header_length: str | None) -> tuple[Any, memoryview]:
    if header_length is None:
        n = len(body)
    else:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 <= n <= len(body):
            raise InvalidField(
                f"Inference-Header-Content-Length must be an integer in [0, {len(body)}]",
                details={"field": "Inference-Header-Content-Length"},
            )
    view = memoryview(body)
    try:
        header = orjson.loads(view[:n])
    except orjson.JSONDecodeError as exc:
        raise MalformedJSON(f"inference header is not valid JSON: {exc}") from None
    return header, view[n:]


def _rest_inputs(specs: Any, binary: memoryview, limits: DecodeLimits) -> tuple[Tensor, ...]:
    if not isinstance(specs, list) or not specs:
        raise ClientError("inference request needs a non-empty 'inputs' list",
                          code="invalid_request")  # fmt: skip
    if len(specs) > limits.max_inputs:
        raise PayloadTooLarge(f"more than {limits.max_inputs} inputs",
                              details={"limit": limits.max_inputs})  # fmt: skip
    tensors: list[Tensor] = []
    budget, offset, seen = Budget(limits), 0, set()
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise InvalidTensor(f"inputs[{i}] must be an object", details={"field": f"inputs[{i}]"})
        name = check_name(spec.get("name"), limits, f"inputs[{i}].name")
        if name in seen:
            raise InvalidTensor(f"input {name!r} appears twice", details={"input": name})
        seen.add(name)
        dtype = check_datatype(spec.get("datatype"), name)
        shape = check_shape(spec.get("shape"), name, limits)
        params = check_parameters(spec.get("parameters"), limits, f"inputs[{i}].")
        size = params.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0:
                raise InvalidParameter(
                    f"input {name!r}: binary_data_size must be a non-negative integer",
                    details={"field": f"inputs[{i}].parameters.binary_data_size"},
                )
            if offset + size > len(binary):
                raise InvalidTensor(f"input {name!r}: binary data is truncated",
                                    details={"input": name})  # fmt: skip
            raw = binary[offset : offset + size]
            offset += size
            tensors.append(tensor_from_raw(name, spec["datatype"], dtype, shape, raw, budget))
        elif "data" in spec:
            if spec["datatype"] in _RAW_ONLY:
                raise InvalidTensor(
                    f"input {name!r}: {spec['datatype']} travels as binary data only (the "
                    "binary tensor extension), not as JSON numbers",
                    details={"input": name},
                )
            flat = _flatten(spec["data"], shape, name)
            tensors.append(tensor_from_elements(name, spec["datatype"], dtype, shape, flat, budget))
        else:
            raise InvalidTensor(f"input {name!r} has no data", details={"input": name})
    if offset != len(binary):
        raise InvalidTensor("binary data does not match the inputs' binary_data_size",
                            details={"field": "binary_data_size"})  # fmt: skip
    return tuple(tensors)


def _flatten(data: Any, shape: tuple[int, ...], name: str) -> list[Any]:
    """JSON data in row-major order: flat, or nested exactly as the shape says. The walk
    compares each list with the shape as it goes, so its work is bounded by the data."""
    if not isinstance(data, list):
        raise InvalidTensor(f"input {name!r}: data must be a list", details={"input": name})
    if len(shape) <= 1 or not data or type(data[0]) is not list:
        return data  # flat; nested leftovers fail the element type check
    level: list[Any] = [data]
    for dim in shape:
        nxt: list[Any] = []
        for item in level:
            if type(item) is not list or len(item) != dim:
                raise InvalidTensor(
                    f"input {name!r}: nested data does not match shape {list(shape)}",
                    details={"input": name},
                )
            nxt.extend(item)
        level = nxt
    return level


def _rest_outputs(specs: Any, limits: DecodeLimits) -> tuple[tuple[str, ...], dict[str, bool]]:
    if specs is None:
        return (), {}
    if not isinstance(specs, list) or len(specs) > limits.max_outputs:
        raise InvalidField(f"outputs must be a list of at most {limits.max_outputs} objects",
                           details={"field": "outputs"})  # fmt: skip
    names: list[str] = []
    binary: dict[str, bool] = {}
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise InvalidField(
                f"outputs[{i}] must be an object", details={"field": f"outputs[{i}]"}
            )
        name = check_name(spec.get("name"), limits, f"outputs[{i}].name")
        params = check_parameters(spec.get("parameters"), limits, f"outputs[{i}].")
        if "classification" in params:
            raise ClientError("the classification extension is not supported", code="unsupported")
        flag = params.get("binary_data")
        if flag is not None and not isinstance(flag, bool):
            raise InvalidParameter(
                f"outputs[{i}].parameters.binary_data must be a boolean",
                details={"field": f"outputs[{i}].parameters.binary_data"},
            )
        if name in binary:
            raise InvalidField(f"output {name!r} is requested twice",
                               details={"field": f"outputs[{i}].name"})  # fmt: skip
        names.append(name)
        if flag is not None:
            binary[name] = flag
    return tuple(names), binary


def encode_rest(
    resp: InferResponse, want: RestOutputs, order: tuple[str, ...]
) -> tuple[bytes, int | None]:
    """The REST response body, and the JSON header's length when binary tensors follow it."""
    outputs, chunks = [], []
    for name in order or tuple(resp.outputs):
        t = resp.outputs.get(name)
        if t is None:
            continue
        entry: dict[str, Any] = {"name": name, "datatype": t.datatype, "shape": t.shape}
        # JSON has no numbers for a raw-only datatype (Triton refuses to write them): binary,
        # which every OIP client reads whatever it asked for.
        if t.datatype in _RAW_ONLY or want.binary.get(name, want.binary_default):
            raw = to_bytes(t)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif t.datatype == "BYTES":
            entry["data"] = [x.decode(errors="replace") for x in t.data.ravel()]
        else:
            entry["data"] = t.data.ravel().tolist()
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": resp.model, "model_version": resp.version}
    if want.client_id:
        body["id"] = want.client_id
    params = {k: v for k, v in resp.parameters.items() if v is not None}
    if params:
        body["parameters"] = params
    body["outputs"] = outputs
    head = orjson.dumps(body)
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)
