"""Where each placed model runs: docker-compose services and Kubernetes objects.

Each placed model runs as its own tritonserver process (a compose service, a Kubernetes
Deployment), loading only that model. MPS caps threads per *client process*, so a separate
process per model is what makes a per-model `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` possible; it
also lets one model restart without its neighbours. The gateway reaches them through
`triton.servers`, each server naming its one model.

Kubernetes output is per overlay (`gpu-dedicated`, `gpu-shared`): a Deployment and a Service
per model, a strategic-merge patch of the base's `gateway` Deployment (container `gateway`)
with the servers of that overlay, and a `kustomization-placement.yaml` naming what to add to
the overlay's `kustomization.yaml`. Pods select nodes by GPU feature discovery's
`nvidia.com/gpu.product` label and mount the repository from the `model-repository` claim.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from gateway.placement.plan import Assignment, Plan

TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
MPS_PIPE_DIR = "/tmp/nvidia-mps"
_TRITON_PORTS = ["--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"]


def slot(a: Assignment) -> str:
    """DNS-1123 name of the tritonserver process serving `a` (compose service, k8s object)."""
    return f"gpu{a.gpu}-{a.model}".lower().replace("_", "-")


def gateway_servers(plan: Plan) -> list[dict[str, Any]]:
    """`triton.servers` for the gateway: one server per slot, asked only for its model."""
    return [
        {
            "name": slot(a),
            "grpc_url": f"triton-{slot(a)}:8001",
            "http_url": f"http://triton-{slot(a)}:8000",
            "models": [a.model],
        }
        for a in plan.assignments()
    ]


def compose_override(plan: Plan, image: str = TRITON_IMAGE) -> dict[str, Any]:
    services: dict[str, Any] = {}
    mps_gpus = {g.gpu.index for g in plan.gpus if g.mps}
    for a in plan.assignments():
        svc: dict[str, Any] = {
            "image": image,
            "command": [
                "tritonserver",
                "--model-repository=/models",
                "--model-control-mode=explicit",
                f"--load-model={a.model}",
                *_TRITON_PORTS,
            ],
            "volumes": ["./model_repository:/models:ro"],
            "shm_size": "1gb",
            "restart": "unless-stopped",
            "deploy": {
                "resources": {
                    "reservations": {
                        "devices": [
                            {
                                "driver": "nvidia",
                                "device_ids": [str(a.gpu)],
                                "capabilities": ["gpu"],
                            }
                        ]
                    }
                }
            },
            "healthcheck": {
                "test": ["CMD", "curl", "-fsS", "http://localhost:8000/v2/health/ready"],
                "interval": "5s",
                "timeout": "3s",
                "retries": 24,
            },
        }
        if a.gpu in mps_gpus:
            # The MPS control daemon runs on the host for this GPU; clients reach it through
            # its pipe directory and must share the host's IPC namespace.
            svc["ipc"] = "host"
            svc["volumes"].append(f"{MPS_PIPE_DIR}:{MPS_PIPE_DIR}")
            svc["environment"] = {
                "CUDA_MPS_PIPE_DIRECTORY": MPS_PIPE_DIR,
                "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(a.mps_thread_pct),
            }
        services[f"triton-{slot(a)}"] = svc
    services["gateway"] = {
        "environment": {
            "SWITCHYARD__TRITON__SERVERS": json.dumps(gateway_servers(plan)),
            "SWITCHYARD__TRITON__GRPC_URL": gateway_servers(plan)[0]["grpc_url"],
        },
        "depends_on": {name: {"condition": "service_healthy"} for name in services},
    }
    return {"services": services}


def k8s_deployment(a: Assignment, gpu_name: str, mps: bool, image: str) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "triton", "switchyard.dev/slot": slot(a)}
    env = []
    if mps:
        env = [
            {"name": "CUDA_MPS_PIPE_DIRECTORY", "value": MPS_PIPE_DIR},
            {"name": "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "value": str(a.mps_thread_pct)},
        ]
    container: dict[str, Any] = {
        "name": "triton",
        "image": image,
        "args": [
            "tritonserver",
            "--model-repository=/models",
            "--model-control-mode=explicit",
            f"--load-model={a.model}",
            *_TRITON_PORTS,
        ],
        "ports": [
            {"name": "grpc", "containerPort": 8001},
            {"name": "http", "containerPort": 8000},
            {"name": "metrics", "containerPort": 8002},
        ],
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": 8000}},
        "resources": {"limits": {"nvidia.com/gpu": 1}},
        "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
    }
    pod: dict[str, Any] = {
        # GPU feature discovery's product label: the inventory name, '-' for ' '.
        "nodeSelector": {"nvidia.com/gpu.product": gpu_name.replace(" ", "-")},
        "containers": [container],
        "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "model-repository"}}],
    }
    if mps:
        # MPS clients talk to the node's control daemon through its pipe directory and
        # shared memory: the host's IPC namespace and the pipe folder.
        container["env"] = env
        container["volumeMounts"].append({"name": "mps-pipe", "mountPath": MPS_PIPE_DIR})
        pod["hostIPC"] = True
        pod["volumes"].append({"name": "mps-pipe", "hostPath": {"path": MPS_PIPE_DIR}})
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": f"triton-{slot(a)}", "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"switchyard.dev/slot": slot(a)}},
            "template": {"metadata": {"labels": dict(labels)}, "spec": pod},
        },
    }


def k8s_service(a: Assignment) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"triton-{slot(a)}"},
        "spec": {
            "selector": {"switchyard.dev/slot": slot(a)},
            "ports": [
                {"name": "grpc", "port": 8001},
                {"name": "http", "port": 8000},
                {"name": "metrics", "port": 8002},
            ],
        },
    }


_K8S_NOTE = {
    "dedicated": "# Written by `python -m gateway gpu plan`: a whole GPU for this model.\n",
    "shared": (
        "# Written by `python -m gateway gpu plan`: this GPU is shared under MPS. The NVIDIA\n"
        "# device plugin must share it (sharing.mps, or an MPS daemon per node) so that\n"
        "# several pods get `nvidia.com/gpu: 1` of it; the env caps this pod's SM share.\n"
    ),
}


def k8s_overlays(plan: Plan, image: str = TRITON_IMAGE) -> dict[str, str]:
    """{path: text} for overlays gpu-dedicated and gpu-shared (only those the plan uses)."""
    out: dict[str, str] = {}
    servers = gateway_servers(plan)
    for overlay, mode in (("gpu-dedicated", "dedicated"), ("gpu-shared", "shared")):
        gpus = [g for g in plan.gpus if g.mode == mode]
        if not gpus:
            continue
        resources = []
        for g in gpus:
            for a in g.assignments:
                name = f"triton-{slot(a)}.yaml"
                docs = [k8s_deployment(a, g.gpu.name, g.mps, image), k8s_service(a)]
                out[f"k8s/{overlay}/{name}"] = _K8S_NOTE[mode] + yaml.safe_dump_all(
                    docs, sort_keys=False
                )
                resources.append(name)
        here = {slot(a) for g in gpus for a in g.assignments}
        patch = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "gateway"},
            "spec": {"template": {"spec": {"containers": [{"name": "gateway", "env": [
                {"name": "SWITCHYARD__TRITON__SERVERS",
                 "value": json.dumps([s for s in servers if s["name"] in here])},
            ]}]}}},
        }  # fmt: skip
        out[f"k8s/{overlay}/gateway-servers-patch.yaml"] = yaml.safe_dump(patch, sort_keys=False)
        kustomization = {
            "resources": resources,
            "patches": [{"path": "gateway-servers-patch.yaml"}],
        }
        out[f"k8s/{overlay}/kustomization-placement.yaml"] = (
            "# Merge into deploy/k8s/overlays/" + overlay + "/kustomization.yaml: copy the\n"
            "# files of this folder next to it, then add these resources and patches.\n"
            + yaml.safe_dump(kustomization, sort_keys=False)
        )
    return out
