"""The Open Inference Protocol gRPC front door: KServe v2 `inference.GRPCInferenceService`.

Stock `tritonclient.grpc` (and any OIP gRPC client) works against the gateway unchanged and
goes through the same core as REST (`InferenceService.infer`): routing, fallback, the
prediction log. It runs on grpc.aio in the REST app's process and event loop, started and
stopped with the app (`grpc_serving`, an aiohttp cleanup_ctx entry).

- Deadline: the call's gRPC deadline (none set: the route's default), capped like REST's.
- Errors: each class of `gateway.errors` names its grpc status (`grpc_status`); the stable
  error code rides along in the trailing metadata key ``switchyard-code``.
- Cancellation: grpc.aio cancels the handler's task when the client cancels or its deadline
  passes; nothing here catches CancelledError, so the core's Triton call is cancelled too.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
import structlog
from aiohttp import web
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from gateway.api.keys import SERVICE
from gateway.api.v2_codec import DecodeLimits
from gateway.api.v2_proto import decode_proto, encode_proto
from gateway.config import Settings
from gateway.errors import BackendError, NotReady, SwitchyardError
from gateway.security.authn import presented_key
from gateway.security.guard import Guard
from gateway.security.rest import GUARD
from gateway.service import InferenceService
from gateway.tls import grpc_server_credentials
from gateway.types import Deadline

log = structlog.get_logger(__name__)

T = TypeVar("T")
CODE_METADATA = "switchyard-code"


async def _abort(context: grpc.aio.ServicerContext, exc: SwitchyardError) -> NoReturn:
    await context.abort(
        grpc.StatusCode[exc.grpc_status],
        exc.message,
        trailing_metadata=((CODE_METADATA, exc.code),),
    )
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def _from_json(data: dict[str, Any], message: Any) -> Any:
    """A backend's JSON form of a metadata proto (`proto_to_json`) back into the proto."""
    try:
        return json_format.ParseDict(data, message, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise BackendError(f"backend metadata does not fit the OIP schema: {exc}") from None


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Each RPC is a thin adapter over the core; `_call` maps errors and logs one line."""

    def __init__(
        self, service: InferenceService, limits: DecodeLimits, guard: Guard | None = None
    ) -> None:
        self.service = service
        self.limits = limits
        self.guard = guard  # API keys and rate limits, the same as REST's (None: open)

    async def _admit(self, method: str, context: grpc.aio.ServicerContext) -> None:
        """The `authorization` (or `x-api-key`) metadata through the REST guard."""
        guard = self.guard
        if guard is None or not guard.authenticator.enabled:
            return
        scope = guard.grpc_scope_for(method)
        if scope is None:
            return
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        await guard.admit(
            presented_key(metadata.get("authorization"), metadata.get("x-api-key")), scope
        )

    async def _call(
        self, method: str, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[T]]
    ) -> T:
        started, status = time.perf_counter(), "OK"
        try:
            await self._admit(method, context)
            return await work()
        except SwitchyardError as exc:
            status = exc.grpc_status
            await _abort(context, exc)
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise  # the client cancelled or its deadline passed: cancel the core's call too
        except Exception:
            status = "INTERNAL"
            log.exception("grpc_unhandled_error", method=method)
            await _abort(context, SwitchyardError("internal error"))
        finally:
            log.info(
                "grpc_request",
                method=method,
                status=status,
                latency_ms=round((time.perf_counter() - started) * 1000, 3),
            )

    # -- health and metadata ---------------------------------------------------------------
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def ready() -> Any:
            try:
                await self.service.ready()
            except NotReady:
                return service_pb2.ServerReadyResponse(ready=False)
            return service_pb2.ServerReadyResponse(ready=True)

        return await self._call("ServerReady", context, ready)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def ready() -> Any:
            s = self.service
            try:
                ok = await s.backend.model_ready(request.name, request.version, s.control_timeout_s)
            except SwitchyardError:
                ok = False
            return service_pb2.ModelReadyResponse(ready=ok)

        return await self._call("ModelReady", context, ready)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def metadata() -> Any:
            data = await self.service.backend.server_metadata(self.service.control_timeout_s)
            return _from_json(data, service_pb2.ServerMetadataResponse())

        return await self._call("ServerMetadata", context, metadata)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def metadata() -> Any:
            s = self.service
            data = await s.backend.model_metadata(
                request.name, request.version, s.control_timeout_s
            )
            return _from_json(data, service_pb2.ModelMetadataResponse())

        return await self._call("ModelMetadata", context, metadata)

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def config() -> Any:
            s = self.service
            data = await s.backend.model_config(request.name, request.version, s.control_timeout_s)
            return service_pb2.ModelConfigResponse(
                config=_from_json(data, model_config_pb2.ModelConfig())
            )

        return await self._call("ModelConfig", context, config)

    # -- inference -------------------------------------------------------------------------
    def _deadline(self, context: grpc.aio.ServicerContext, model: str) -> Deadline:
        remaining = context.time_remaining()
        ms = {"deadline_ms": remaining * 1000.0} if remaining is not None else {}
        return self.service.deadline_for(ms, self.service.routes.current.routes.get(model))

    async def _infer(self, msg: Any, context: grpc.aio.ServicerContext) -> Any:
        req = decode_proto(msg, self.limits, msg.id or uuid.uuid4().hex)
        structlog.contextvars.bind_contextvars(request_id=req.request_id, model=req.model)
        resp = await self.service.infer(req, self._deadline(context, req.model))
        return encode_proto(resp, req.outputs, msg.id)

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        structlog.contextvars.clear_contextvars()
        return await self._call("ModelInfer", context, lambda: self._infer(request, context))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """Each request in turn through the core; an error answers that request (in
        ``error_message``, as Triton does) and the stream goes on."""
        async for msg in request_iterator:
            structlog.contextvars.clear_contextvars()
            started = time.perf_counter()
            try:
                await self._admit("ModelStreamInfer", context)  # each request: rate limits
                reply = service_pb2.ModelStreamInferResponse(
                    infer_response=await self._infer(msg, context)
                )
                status = "OK"
            except SwitchyardError as exc:
                reply = service_pb2.ModelStreamInferResponse(error_message=exc.message)
                status = exc.grpc_status
            except Exception:
                log.exception("grpc_unhandled_error", method="ModelStreamInfer")
                reply = service_pb2.ModelStreamInferResponse(error_message="internal error")
                status = "INTERNAL"
            log.info(
                "grpc_request",
                method="ModelStreamInfer",
                status=status,
                latency_ms=round((time.perf_counter() - started) * 1000, 3),
            )
            yield reply


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def grpc_serving(
    settings: Settings, *, reuse_port: bool = False
) -> Callable[[web.Application], AsyncIterator[None]]:
    """An aiohttp cleanup_ctx entry: serve OIP gRPC on ``server.grpc_port`` while the app
    runs (0: not at all), then stop, letting calls in flight finish within the shutdown
    grace period. ``reuse_port``: workers of `serve --workers N` share the port, as they do
    the REST one; off otherwise, so a port taken by anything else (a Triton's gRPC port,
    which sets SO_REUSEPORT itself) fails the start instead of splitting its traffic."""
    server_settings = settings.server

    async def serving(app: web.Application) -> AsyncIterator[None]:
        if not server_settings.grpc_port:
            yield
            return
        limits = DecodeLimits.for_body(server_settings.max_body_bytes)
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", int(reuse_port)),
                ("grpc.max_receive_message_length", server_settings.max_body_bytes),
            ]
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(app[SERVICE], limits, app.get(GUARD)), server
        )
        address = _address(server_settings.host, server_settings.grpc_port)
        tls = grpc_server_credentials(server_settings)  # the REST listener's certificate
        if tls is None:
            server.add_insecure_port(address)  # raises RuntimeError when it cannot bind
        else:
            server.add_secure_port(address, tls)
        await server.start()
        log.info("grpc_listening", address=address, tls=tls is not None, pid=os.getpid())
        try:
            yield
        finally:
            await server.stop(grace=server_settings.shutdown_timeout_s)

    return serving
