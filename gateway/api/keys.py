"""Typed application state (aiohttp AppKeys), set by the composition root."""

from __future__ import annotations

from aiohttp import web

from gateway.config import Settings
from gateway.metrics import Metrics
from gateway.service import InferenceService
from gateway.tracing import Tracing

SETTINGS = web.AppKey("settings", Settings)
SERVICE = web.AppKey("service", InferenceService)
METRICS = web.AppKey("metrics", Metrics)
#: None: tracing off (telemetry.otlp_endpoint empty).
TRACING: web.AppKey[Tracing | None] = web.AppKey("tracing")

# Per-request state: the request id (rebound when a body names one) and access-log fields.
REQUEST_ID = web.RequestKey("request_id", str)
LOG_FIELDS = web.RequestKey("log_fields", dict)
