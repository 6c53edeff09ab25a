"""OIP gRPC messages (KServe v2 `ModelInferRequest`/`ModelInferResponse`) <-> the core's types.

Requests may carry tensors as `raw_input_contents` or in the typed `contents` fields; both go
through the limits and checks of `v2_codec`. Responses use `raw_output_contents`, as Triton
does, so `tritonclient.grpc`'s `as_numpy` reads them unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from tritonclient.grpc import service_pb2

from gateway.api.v2_codec import (
    Budget,
    DecodeLimits,
    Scalar,
    check_datatype,
    check_name,
    check_parameters,
    check_shape,
    tensor_from_elements,
    tensor_from_raw,
)
from gateway.backends.base import InferRequest, InferResponse
from gateway.backends.triton import set_parameter
from gateway.errors import ClientError, InvalidField, InvalidParameter, InvalidTensor
from gateway.tensors import Tensor, to_bytes

#: The typed `InferTensorContents` field each datatype is sent in (FP16 and BF16 have none:
#: they travel raw only, and typed contents for them are refused).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameters_from_proto(
    params: Mapping[str, Any], limits: DecodeLimits, where: str
) -> dict[str, Scalar]:
    """A map<string, InferParameter> -> Python scalars (each InferParameter is a oneof)."""
    out: dict[str, Scalar] = {}
    for key, p in params.items():
        kind = p.WhichOneof("parameter_choice")
        if kind is None:
            raise InvalidParameter(
                f"{where}parameter {key[:64]!r} has no value",
                details={"field": f"{where}parameters.{key[:64]}"},
            )
        out[key] = getattr(p, kind)
    return check_parameters(out, limits, where)


def decode_proto(
    msg: service_pb2.ModelInferRequest, limits: DecodeLimits, request_id: str = ""
) -> InferRequest:
    """A ModelInferRequest -> the core's request; ``request_id`` names it when ``id`` is
    empty."""
    model = check_name(msg.model_name, limits, "model_name")
    if len(msg.model_version) > limits.max_name_len or len(msg.id) > limits.max_string_len:
        raise InvalidField("model_version or id is too long", details={"field": "id"})
    params = parameters_from_proto(msg.parameters, limits, "")
    if not msg.inputs:
        raise ClientError("inference request needs at least one input", code="invalid_request")
    if len(msg.inputs) > limits.max_inputs or len(msg.outputs) > limits.max_outputs:
        raise InvalidField(
            f"at most {limits.max_inputs} inputs and {limits.max_outputs} outputs",
            details={"field": "inputs"},
        )
    raw = msg.raw_input_contents
    if raw and len(raw) != len(msg.inputs):
        raise InvalidTensor(
            f"{len(raw)} raw_input_contents for {len(msg.inputs)} inputs",
            details={"field": "raw_input_contents"},
        )
    budget, seen = Budget(limits), set()
    tensors: list[Tensor] = []
    for i, spec in enumerate(msg.inputs):
        name = check_name(spec.name, limits, f"inputs[{i}].name")
        if name in seen:
            raise InvalidTensor(f"input {name!r} appears twice", details={"input": name})
        seen.add(name)
        dtype = check_datatype(spec.datatype, name)
        shape = check_shape(list(spec.shape), name, limits)
        if "shared_memory_region" in spec.parameters:
            raise ClientError("shared-memory tensors are not supported", code="unsupported")
        if raw:
            tensors.append(
                tensor_from_raw(name, spec.datatype, dtype, shape, memoryview(raw[i]), budget)
            )
            continue
        field = _CONTENTS_FIELD.get(spec.datatype)
        if field is None:
            raise InvalidTensor(
                f"input {name!r}: {spec.datatype} travels in raw_input_contents only",
                details={"input": name},
            )
        contents = getattr(spec.contents, field)
        if len(contents) != math.prod(shape):  # before copying the field out
            raise InvalidTensor(
                f"input {name!r}: {len(contents)} elements do not fit shape {list(shape)}",
                details={"input": name},
            )
        tensors.append(
            tensor_from_elements(name, spec.datatype, dtype, shape, list(contents), budget)
        )
    outputs: list[str] = []
    for i, out in enumerate(msg.outputs):
        outputs.append(check_name(out.name, limits, f"outputs[{i}].name"))
        if "classification" in out.parameters:
            raise ClientError("the classification extension is not supported", code="unsupported")
    if len(set(outputs)) != len(outputs):
        raise InvalidField("an output is requested twice", details={"field": "outputs"})
    return InferRequest(
        model, msg.model_version, tuple(tensors), tuple(outputs), msg.id or request_id, params
    )


def encode_proto(
    resp: InferResponse, order: tuple[str, ...], client_id: str
) -> service_pb2.ModelInferResponse:
    """The core's response -> ModelInferResponse with raw_output_contents, as Triton sends."""
    msg = service_pb2.ModelInferResponse(
        model_name=resp.model, model_version=resp.version, id=client_id
    )
    for key, value in resp.parameters.items():
        if value is not None:
            set_parameter(msg.parameters[key], value)
    for name in order or tuple(resp.outputs):
        t = resp.outputs.get(name)
        if t is None:
            continue
        out = msg.outputs.add()
        out.name, out.datatype = name, t.datatype
        out.shape.extend(t.data.shape)
        msg.raw_output_contents.append(to_bytes(t))
    return msg
