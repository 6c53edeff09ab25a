"""The Triton metric names the rules and dashboards rely on (tests/promql.py) are the ones a
real tritonserver exports. GPU metrics appear only on a machine with a GPU; on one, they are
checked too."""

from __future__ import annotations

import shutil
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from gateway.tritonserver import TritonServer
from tests.promql import TRITON_CPU_METRICS, TRITON_GPU_METRICS


def test_triton_exports_the_names_we_query(triton: TritonServer) -> None:
    with urllib.request.urlopen(triton.metrics_url, timeout=5) as r:
        text = r.read().decode()
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    # prometheus_client's parser adds _total to counters that lack it; Triton's own names don't
    names |= {n.removesuffix("_total") for n in names}
    assert TRITON_CPU_METRICS - names == set()
    if shutil.which("nvidia-smi"):  # Triton sees the GPU too: the ones rules and panels use
        used = {"nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes"}
        assert used <= TRITON_GPU_METRICS
        assert used - names == set()
