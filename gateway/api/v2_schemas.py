"""The Open Inference Protocol (KServe v2) REST bodies as pydantic models, for the OpenAPI
document (`gateway.api.openapi`).

Infer requests are decoded by `gateway.api.v2_codec`, which also takes Triton's binary-tensor
extension and shares its checks with gRPC; these models state the JSON form it accepts, with
the codec's own limits (`DecodeLimits`) as their bounds, and the responses the gateway (or
Triton behind it) sends. The schemathesis run (tests/integration/test_api_fuzz.py) holds the
two to each other: requests made from these models, responses checked against them.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from gateway.api.v2_codec import DATATYPES, DecodeLimits

_DEFAULT = DecodeLimits(max_elements=1, max_bytes=1)  # only the count and length bounds
Datatype = Annotated[str, WithJsonSchema({"type": "string", "enum": list(DATATYPES)})]
Name = Annotated[str, Field(min_length=1, max_length=_DEFAULT.max_name_len)]
Scalar = Annotated[str, Field(max_length=_DEFAULT.max_string_len)] | int | float | bool
Parameters = Annotated[dict[str, Scalar], Field(max_length=_DEFAULT.max_parameters)]
Shape = Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=_DEFAULT.max_dims)]


class InferInput(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Name
    datatype: Datatype
    shape: Shape
    data: list[Any] | None = Field(None, description="row-major, flat or nested as the shape")
    parameters: Parameters | None = None


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Name
    parameters: Parameters | None = None


class InferRequest(BaseModel):
    """`POST /v2/models/{model}[/versions/{version}]/infer`, JSON form."""

    model_config = ConfigDict(extra="allow")
    id: Annotated[str, Field(max_length=_DEFAULT.max_string_len)] | None = None
    parameters: Parameters | None = None
    inputs: Annotated[list[InferInput], Field(min_length=1, max_length=_DEFAULT.max_inputs)]
    outputs: Annotated[list[RequestedOutput], Field(max_length=_DEFAULT.max_outputs)] | None = None


class OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[OutputTensor]


class ServerMetadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    version: str
    extensions: list[str] = []


class TensorMetadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    versions: list[str] = []
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
