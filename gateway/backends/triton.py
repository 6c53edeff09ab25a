"""Triton over gRPC: one pooled channel per server, protobufs built directly, raw tensors.

tritonclient provides the generated stubs; the request is built here rather than through
`InferInput` objects so the hot path does one copy per tensor and no per-call client objects.
Every grpc error is translated to `gateway.errors` right here (the boundary).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway import errors
from gateway.backends.base import InferRequest, InferResponse
from gateway.tensors import from_bytes, to_bytes

_MAX_MESSAGE = 2**31 - 1
_INT64_TYPES = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


@contextmanager
def map_grpc_errors(server: str, model: str = "") -> Iterator[None]:
    """Translate grpc failures into the gateway's exception tree."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        code, detail = exc.code(), exc.details() or ""
        where = {"server": server, "model": model} if model else {"server": server}
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise errors.DeadlineExceeded("backend call ran out of time", details=where) from exc
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            raise errors.BackendUnavailable(
                f"backend unavailable: {detail}", details=where
            ) from exc
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise errors.Overloaded(f"backend overloaded: {detail}", details=where) from exc
        if code == grpc.StatusCode.NOT_FOUND or "unknown model" in detail:
            raise errors.ModelNotFound(detail, details=where) from exc
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            if "not found" in detail and "version" in detail:
                raise errors.VersionNotFound(detail, details=where) from exc
            raise errors.ClientError(detail, code="invalid_tensor", details=where) from exc
        raise errors.BackendError(f"backend error ({code.name}): {detail}", details=where) from exc


def proto_to_json(msg: Message) -> dict[str, Any]:
    """Like json_format.MessageToDict, but 64-bit integers stay numbers, as Triton's REST API
    prints them."""
    out: dict[str, Any] = {}
    for fd, value in msg.ListFields():
        out[fd.name] = _field_value(fd, value)
    return out


def _field_value(fd: FieldDescriptor, value: Any) -> Any:
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        vfd = fd.message_type.fields_by_name["value"]
        return {k: _scalar(vfd, v) for k, v in value.items()}
    if fd.label == FieldDescriptor.LABEL_REPEATED:
        return [_scalar(fd, v) for v in value]
    return _scalar(fd, value)


def _scalar(fd: FieldDescriptor, value: Any) -> Any:
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        return proto_to_json(value)
    if fd.type == FieldDescriptor.TYPE_ENUM:
        return fd.enum_type.values_by_number[value].name
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return value.decode(errors="replace")
    if fd.type in _INT64_TYPES:
        return int(value)
    return value


class TritonBackend:
    """A Triton server reached over one long-lived gRPC channel."""

    def __init__(self, url: str, name: str | None = None) -> None:
        self.name = name or url
        self.url = url
        self._channel = grpc.aio.insecure_channel(
            url,
            options=[
                ("grpc.max_send_message_length", _MAX_MESSAGE),
                ("grpc.max_receive_message_length", _MAX_MESSAGE),
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    async def infer(self, request: InferRequest, timeout_s: float) -> InferResponse:
        msg = service_pb2.ModelInferRequest(
            model_name=request.model, model_version=request.version, id=request.request_id
        )
        for t in request.inputs:
            spec = msg.inputs.add()
            spec.name, spec.datatype = t.name, t.datatype
            spec.shape.extend(t.data.shape)
            msg.raw_input_contents.append(to_bytes(t))
        for name in request.outputs:
            msg.outputs.add().name = name
        with map_grpc_errors(self.name, request.model):
            reply = await self._stub.ModelInfer(msg, timeout=timeout_s)
        outputs = {
            o.name: from_bytes(o.name, o.datatype, list(o.shape), raw)
            for o, raw in zip(reply.outputs, reply.raw_output_contents, strict=True)
        }
        return InferResponse(reply.model_name, reply.model_version, outputs, reply.id)

    async def server_live(self, timeout_s: float) -> bool:
        with map_grpc_errors(self.name):
            r = await self._stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=timeout_s)
        return bool(r.live)

    async def server_ready(self, timeout_s: float) -> bool:
        with map_grpc_errors(self.name):
            r = await self._stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout_s)
        return bool(r.ready)

    async def model_ready(self, model: str, version: str, timeout_s: float) -> bool:
        req = service_pb2.ModelReadyRequest(name=model, version=version)
        with map_grpc_errors(self.name, model):
            r = await self._stub.ModelReady(req, timeout=timeout_s)
        return bool(r.ready)

    async def server_metadata(self, timeout_s: float) -> dict[str, Any]:
        with map_grpc_errors(self.name):
            r = await self._stub.ServerMetadata(
                service_pb2.ServerMetadataRequest(), timeout=timeout_s
            )
        return proto_to_json(r)

    async def model_metadata(self, model: str, version: str, timeout_s: float) -> dict[str, Any]:
        req = service_pb2.ModelMetadataRequest(name=model, version=version)
        with map_grpc_errors(self.name, model):
            r = await self._stub.ModelMetadata(req, timeout=timeout_s)
        return proto_to_json(r)

    async def model_config(self, model: str, version: str, timeout_s: float) -> dict[str, Any]:
        req = service_pb2.ModelConfigRequest(name=model, version=version)
        with map_grpc_errors(self.name, model):
            r = await self._stub.ModelConfig(req, timeout=timeout_s)
        return proto_to_json(r.config)

    async def close(self) -> None:
        await self._channel.close()
