"""The Open Inference Protocol (KServe v2) REST surface, so stock `tritonclient.http` and other
OIP clients work through the gateway unchanged. JSON tensors and Triton's binary-tensor
extension (`Inference-Header-Content-Length`) are both supported, in requests and responses.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from gateway.api.keys import LOG_FIELDS, REQUEST_ID, SERVICE, SETTINGS
from gateway.api.middleware import json_response
from gateway.api.schemas import read_json
from gateway.errors import ClientError, MalformedJSON, NotReady, SwitchyardError
from gateway.tensors import Tensor, from_bytes, numpy_dtype, to_bytes
from gateway.types import InferRequest, InferResponse

routes = web.RouteTableDef()

HEADER_LENGTH = "Inference-Header-Content-Length"
DEADLINE_HEADER = "X-Deadline-Ms"
ENTITY_HEADER = "X-Entity-ID"


def _model_and_version(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


@routes.get("/v2")
async def server_metadata(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return json_response(await service.backend.server_metadata(service.control_timeout_s))


@routes.get("/v2/health/live")
async def server_live(request: web.Request) -> web.Response:
    return web.Response(status=200)


@routes.get("/v2/health/ready")
async def server_ready(request: web.Request) -> web.Response:
    try:
        await request.app[SERVICE].ready()
    except NotReady:
        return web.Response(status=503)
    return web.Response(status=200)


@routes.get("/v2/models/{model}/ready")
@routes.get("/v2/models/{model}/versions/{version}/ready")
async def model_ready(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    model, version = _model_and_version(request)
    try:
        ok = await service.backend.model_ready(model, version, service.control_timeout_s)
    except SwitchyardError:
        ok = False
    return web.Response(status=200 if ok else 400)


@routes.get("/v2/models/{model}")
@routes.get("/v2/models/{model}/versions/{version}")
async def model_metadata(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    model, version = _model_and_version(request)
    return json_response(
        await service.backend.model_metadata(model, version, service.control_timeout_s)
    )


@routes.get("/v2/models/{model}/config")
@routes.get("/v2/models/{model}/versions/{version}/config")
async def model_config(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    model, version = _model_and_version(request)
    return json_response(
        await service.backend.model_config(model, version, service.control_timeout_s)
    )


@routes.post("/v2/models/{model}/infer")
@routes.post("/v2/models/{model}/versions/{version}/infer")
async def infer(request: web.Request) -> web.Response:
    service, settings = request.app[SERVICE], request.app[SETTINGS]
    model, version = _model_and_version(request)
    header, binary = await _read_infer_body(request, settings.server.max_body_bytes)
    inputs = _parse_inputs(header, binary)
    wanted, binary_out = _parse_outputs(header)
    client_id = str(header.get("id", ""))
    request_id = client_id or request[REQUEST_ID]  # every logged prediction has an id
    deadline_ms = request.headers.get(DEADLINE_HEADER)
    context = {"deadline_ms": float(deadline_ms)} if deadline_ms else {}
    parameters = dict(header.get("parameters") or {})
    if ENTITY_HEADER in request.headers:
        parameters.setdefault("entity_id", request.headers[ENTITY_HEADER])
    request[LOG_FIELDS]["model"] = model
    resp = await service.infer(
        InferRequest(model, version, tuple(inputs), tuple(wanted), request_id, parameters),
        service.deadline_for(context, service.routes.current.routes.get(model)),
    )
    request[LOG_FIELDS].update(version=resp.version, fallback=resp.fallback_used)
    if not client_id:  # like Triton, echo "id" only when the client sent one
        resp = dataclasses.replace(resp, request_id="")
    return _infer_response(resp, wanted, binary_out)


async def _read_infer_body(
    request: web.Request, max_bytes: int
) -> tuple[dict[str, Any], memoryview]:
    length = request.headers.get(HEADER_LENGTH)
    if length is None:
        header = await read_json(request, max_bytes)
        binary = memoryview(b"")
    else:
        raw = await request.read()
        try:
            n = int(length)
            header = orjson.loads(raw[:n])
        except (ValueError, orjson.JSONDecodeError) as exc:
            raise MalformedJSON(f"inference header is not valid JSON: {exc}") from None
        binary = memoryview(raw)[n:]
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise ClientError("inference request needs an 'inputs' list", code="invalid_request")
    return header, binary


def _parse_inputs(header: dict[str, Any], binary: memoryview) -> list[Tensor]:
    tensors, offset = [], 0
    for spec in header["inputs"]:
        try:
            name, datatype, shape = spec["name"], spec["datatype"], [int(d) for d in spec["shape"]]
        except (KeyError, TypeError, ValueError):
            raise ClientError(
                "each input needs name, datatype and shape", code="invalid_tensor"
            ) from None
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if offset + size > len(binary):
                raise ClientError(
                    f"input {name!r}: binary data is truncated", code="invalid_tensor"
                )
            tensors.append(from_bytes(name, datatype, shape, binary[offset : offset + size]))
            offset += size
        elif "data" in spec:
            tensors.append(_json_tensor(name, datatype, shape, spec["data"]))
        else:
            raise ClientError(f"input {name!r} has no data", code="invalid_tensor")
    if offset != len(binary):
        raise ClientError("binary data does not match the inputs' sizes", code="invalid_tensor")
    return tensors


def _json_tensor(name: str, datatype: str, shape: list[int], data: Any) -> Tensor:
    dtype = numpy_dtype(datatype)
    try:
        if datatype == "BYTES":
            flat = np.asarray(data, dtype=np.object_).ravel()
            arr = np.empty(flat.size, dtype=np.object_)
            arr[:] = [x.encode() if isinstance(x, str) else bytes(x) for x in flat]
        else:
            arr = np.asarray(data, dtype=dtype).ravel()
        return Tensor(name, datatype, arr.reshape(shape))
    except (ValueError, TypeError) as exc:
        raise ClientError(f"input {name!r}: {exc}", code="invalid_tensor") from None


def _parse_outputs(header: dict[str, Any]) -> tuple[list[str], dict[str, bool]]:
    default_binary = bool((header.get("parameters") or {}).get("binary_data_output", False))
    names, binary = [], {}
    for spec in header.get("outputs") or []:
        params = spec.get("parameters") or {}
        if "classification" in params:
            raise ClientError("the classification extension is not supported", code="unsupported")
        names.append(spec["name"])
        binary[spec["name"]] = bool(params.get("binary_data", default_binary))
    binary["*"] = default_binary
    return names, binary


def _infer_response(
    resp: InferResponse, wanted: list[str], binary: dict[str, bool]
) -> web.Response:
    order = wanted or list(resp.outputs)
    outputs, chunks = [], []
    for name in order:
        t = resp.outputs[name]
        entry: dict[str, Any] = {"name": name, "datatype": t.datatype, "shape": t.shape}
        if binary.get(name, binary["*"]):
            raw = to_bytes(t)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif t.datatype == "BYTES":
            entry["data"] = [x.decode(errors="replace") for x in t.data.ravel()]
        else:
            entry["data"] = t.data.ravel().tolist()
        outputs.append(entry)
    body: dict[str, Any] = {
        "model_name": resp.model,
        "model_version": resp.version,
        "outputs": outputs,
    }
    if resp.request_id:
        body["id"] = resp.request_id
    if resp.parameters:
        body["parameters"] = dict(resp.parameters)
    head = orjson.dumps(body)
    if not chunks:
        return web.Response(body=head, content_type="application/json")
    return web.Response(
        body=b"".join([head, *chunks]),
        headers={HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"},
    )
