"""Batch fill and queue time per model, derived from Triton's Prometheus endpoint.

Triton counts inferences (`nv_inference_count`) and model executions
(`nv_inference_exec_count`); their ratio over an interval is the mean batch a dynamic batcher
formed, which the gateway exports as `batch_fill_ratio`. `nv_inference_queue_duration_us`
over `nv_inference_request_success` is the mean queue wait (`triton_queue_seconds`).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import aiohttp
import structlog
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics

log = structlog.get_logger(__name__)

_WANTED = {
    "nv_inference_count": "inferences",
    "nv_inference_exec_count": "executions",
    "nv_inference_queue_duration_us": "queue_us",
    "nv_inference_request_success": "requests",
}


@dataclass(frozen=True, slots=True)
class ModelCounters:
    inferences: float = 0.0
    executions: float = 0.0
    queue_us: float = 0.0
    requests: float = 0.0


def parse_counters(text: str) -> dict[tuple[str, str], ModelCounters]:
    """(model, version) -> Triton's cumulative counters, from a /metrics scrape."""
    raw: dict[tuple[str, str], dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            field = _WANTED.get(sample.name) or _WANTED.get(sample.name.removesuffix("_total"))
            if field is None or "model" not in sample.labels:
                continue
            key = (sample.labels["model"], sample.labels.get("version", ""))
            raw.setdefault(key, {})[field] = sample.value
    return {k: ModelCounters(**v) for k, v in raw.items()}


def derive(before: ModelCounters | None, now: ModelCounters) -> tuple[float | None, float | None]:
    """(batch fill, mean queue seconds) over the interval, or since start without `before`."""
    b = before or ModelCounters()
    if now.executions < b.executions:  # Triton restarted: counters began again
        b = ModelCounters()
    executions = now.executions - b.executions
    requests = now.requests - b.requests
    fill = (now.inferences - b.inferences) / executions if executions > 0 else None
    queue = (now.queue_us - b.queue_us) / requests / 1e6 if requests > 0 else None
    return fill, queue


class TritonMetricsScraper:
    def __init__(self, url: str, metrics: Metrics, interval_s: float, timeout_s: float = 2.0):
        self.url = url
        self.metrics = metrics
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._last: dict[tuple[str, str], ModelCounters] = {}
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    async def scrape_once(self, session: aiohttp.ClientSession) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with session.get(self.url, timeout=timeout) as resp:
            resp.raise_for_status()
            text = await resp.text()
        self.update(parse_counters(text))

    def update(self, counters: dict[tuple[str, str], ModelCounters]) -> None:
        for key, now in counters.items():
            fill, queue = derive(self._last.get(key), now)
            if fill is not None:
                self.metrics.batch_fill_ratio.labels(*key).set(fill)
            if queue is not None:
                self.metrics.triton_queue_seconds.labels(*key).set(queue)
        self._last = counters

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="triton-metrics")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    await self.scrape_once(session)
                    if self._failing:
                        log.info("triton_metrics_back", url=self.url)
                    self._failing = False
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    if not self._failing:  # log the first failure, not every interval
                        log.warning("triton_metrics_unreachable", url=self.url, error=str(exc))
                    self._failing = True
                await asyncio.sleep(self.interval_s)


# -- load per server, for the pool's routing (gateway/backends/load.py) --------------------

_LOAD_WANTED = {
    "nv_inference_pending_request_count": "pending",
    "nv_inference_queue_duration_us": "queue_us",
    "nv_inference_compute_infer_duration_us": "compute_us",
    "nv_inference_request_success": "requests",
}


@dataclass(frozen=True, slots=True)
class ServerCounters:
    """One server's load signals from one scrape, summed over its models. ``pending`` is a
    gauge (requests queued in Triton now); the rest are cumulative counters."""

    pending: float = 0.0
    queue_us: float = 0.0
    compute_us: float = 0.0
    requests: float = 0.0


def parse_server_counters(text: str) -> ServerCounters:
    """A /metrics scrape -> the server's pending requests and duration counters."""
    sums = dict.fromkeys(_LOAD_WANTED.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = _LOAD_WANTED.get(sample.name) or _LOAD_WANTED.get(
                sample.name.removesuffix("_total")
            )
            if name is not None:
                sums[name] += sample.value
    return ServerCounters(**sums)
