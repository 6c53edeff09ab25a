"""GPU utilisation and memory through pynvml, read at scrape time.

Without a GPU (or without the NVIDIA driver) the collector yields nothing, so `gpu_*` series
are absent rather than a misleading zero.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import structlog
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = structlog.get_logger(__name__)


class GpuCollector(Collector):
    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml

    @classmethod
    def detect(cls, nvml: Any = None) -> GpuCollector | None:
        """A collector when NVML initialises and sees at least one GPU, else None."""
        if nvml is None:
            try:
                # pynvml>=12 is a shim over nvidia-ml-py that warns on import; same API.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    import pynvml
            except ImportError:
                return None
            nvml = pynvml
        try:
            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
        except Exception as exc:  # NVMLError has many subclasses; any means "no GPU here"
            log.info("gpu_metrics_disabled", reason=str(exc))
            return None
        if count == 0:
            return None
        return cls(nvml)

    def collect(self) -> Iterator[Metric]:
        util = GaugeMetricFamily(
            "gpu_utilization", "GPU busy share over the last sample period (0-1)", labels=["gpu"]
        )
        mem = GaugeMetricFamily("gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        try:
            for i in range(self._nvml.nvmlDeviceGetCount()):
                handle = self._nvml.nvmlDeviceGetHandleByIndex(i)
                rates = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                info = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                util.add_metric([str(i)], rates.gpu / 100.0)
                mem.add_metric([str(i)], float(info.used))
        except Exception as exc:  # a failing driver must not break /metrics
            log.warning("gpu_metrics_failed", error=str(exc))
            return
        yield util
        yield mem

    def close(self) -> None:
        with contextlib.suppress(Exception):  # already shut down, or driver gone
            self._nvml.nvmlShutdown()
