"""A `Plan` as text and files: the summary, plan.json, instance_group blocks, and (through
`deploy`) the compose override and Kubernetes overlay files.

Inside a container pinned to one device (compose `device_ids`, one `nvidia.com/gpu` per pod)
that device is GPU 0, so the instance_group there carries no `gpus` list (Triton then places
the instances on every visible GPU: the one). The `gpus: [i]` form, with host indexes, is for
one tritonserver that sees every GPU (bare metal, `loadtest/gpu_bench.py`).

`files` returns every output as {relative path: text}; writing them is the caller's job.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from gateway.placement.deploy import (
    MPS_PIPE_DIR,
    TRITON_IMAGE,
    compose_override,
    k8s_overlays,
    slot,
)
from gateway.placement.plan import Assignment, Plan, fmt_bytes


def summary(plan: Plan) -> str:
    p = plan.policy
    lines = [
        f"GPU placement: strict p99 <= {p.strict_p99_ms:g} ms gets a dedicated GPU; "
        f"memory headroom {p.headroom:.0%}",
        f"MPS shares: {_basis_text(plan.share_basis)}",
    ]
    for g in plan.gpus:
        head = (
            f"GPU {g.gpu.index} {g.gpu.name}: {g.mode}"
            f"{' (MPS)' if g.mps else ''}, {fmt_bytes(g.used_bytes)} of "
            f"{fmt_bytes(g.usable_bytes)} usable"
        )
        lines.append(head)
        for a in g.assignments:
            pct = "" if a.mps_thread_pct is None else f", MPS {a.mps_thread_pct} %"
            lines.append(
                f"  {a.model}: {a.instances} instance(s), {fmt_bytes(a.memory_bytes)}{pct}"
            )
    estimated = [m.name for m in plan.models if m.footprint != "manifest"]
    if estimated:
        lines.append(
            "footprint estimated (no memory_footprint_bytes in the manifest: CUDA context + "
            f"2x artifact bytes per version) for: {', '.join(estimated)}"
        )
    lines.append("instance_group per model:")
    for a in plan.assignments():
        lines.append(f"  {a.model}: {instance_group(a, host_indexes=True)}")
    return "\n".join(lines) + "\n"


def instance_group(a: Assignment, host_indexes: bool) -> str:
    gpus = f", gpus: [ {a.gpu} ]" if host_indexes else ""
    return f"instance_group [ {{ kind: KIND_GPU, count: {a.instances}{gpus} }} ]"


def plan_json(plan: Plan) -> dict[str, Any]:
    return {
        "policy": {"strict_p99_ms": plan.policy.strict_p99_ms, "headroom": plan.policy.headroom},
        "share_basis": plan.share_basis,
        "gpus": [
            {
                "index": g.gpu.index, "name": g.gpu.name, "memory_bytes": g.gpu.memory_bytes,
                "mode": g.mode, "mps": g.mps, "usable_bytes": g.usable_bytes,
                "used_bytes": g.used_bytes,
                "models": [
                    {"model": a.model, "instances": a.instances, "memory_bytes": a.memory_bytes,
                     "dedicated": a.dedicated, "mps_thread_pct": a.mps_thread_pct,
                     "slot": slot(a)}
                    for a in g.assignments
                ],
            }
            for g in plan.gpus
        ],
        "models": [
            {"model": m.name, "versions": list(m.versions), "instance_bytes": m.instance_bytes,
             "instances": m.instances, "footprint": m.footprint, "p99_ms": m.p99_ms,
             "strict": plan.policy.is_strict(m), "load": m.load}
            for m in plan.models
        ],
    }  # fmt: skip


def files(plan: Plan, image: str = TRITON_IMAGE) -> dict[str, str]:
    out = {
        "plan.txt": summary(plan),
        "plan.json": json.dumps(plan_json(plan), indent=2, sort_keys=True) + "\n",
        "docker-compose.gpu.yml": (
            "# docker compose -f docker-compose.yml -f docker-compose.gpu.yml up\n"
            "# Written by `python -m gateway gpu plan`; GPUs marked MPS need the host daemon:\n"
            "#   sudo nvidia-smi -i <gpu> -c EXCLUSIVE_PROCESS\n"
            f"#   CUDA_VISIBLE_DEVICES=<gpu> CUDA_MPS_PIPE_DIRECTORY={MPS_PIPE_DIR} "
            "nvidia-cuda-mps-control -d\n"
            + yaml.safe_dump(compose_override(plan, image), sort_keys=False)
        ),
    }
    for a in plan.assignments():
        out[f"instance_groups/{a.model}.pbtxt"] = (
            "# config.pbtxt of a tritonserver that sees every GPU (host indexes):\n"
            f"{instance_group(a, host_indexes=True)}\n"
            f"# in a container pinned to GPU {a.gpu} (compose device_ids, a k8s pod) it is GPU 0:\n"
            f"# {instance_group(a, host_indexes=False)}\n"
        )
    out.update(k8s_overlays(plan, image))
    return dict(sorted(out.items()))


def _basis_text(basis: str) -> str:
    if basis == "load":
        return "proportional to each model's expected load (--load)"
    return "equal share per model on a GPU (no --load given)"
