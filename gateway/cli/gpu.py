"""`python -m gateway gpu plan`: place the repository's models on GPUs, write the configs.

Registered by `gateway.__main__`. Exit codes: 0 planned, 2 refused (over-committed, more
strict models than GPUs) or bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_gpu_parser(sub: Any) -> None:
    gpu = sub.add_parser("gpu", help="GPU placement")
    gsub = gpu.add_subparsers(dest="gpu_command", required=True, metavar="ACTION")
    p = gsub.add_parser("plan", help="place models on GPUs (dedicated or MPS-packed)")
    p.add_argument(
        "--inventory",
        type=Path,
        default=None,
        help="YAML list of {index, name, memory_bytes}; default: the GPUs pynvml sees",
    )
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    p.add_argument("--routes-dir", type=Path, default=Path("configs/routes"))
    p.add_argument(
        "--strict-p99-ms",
        type=float,
        default=50.0,
        help="route p99 at or under this gets a dedicated GPU (default 50)",
    )
    p.add_argument(
        "--headroom",
        type=float,
        default=0.10,
        help="share of each GPU's memory kept free (default 0.10)",
    )
    p.add_argument(
        "--context-mib",
        type=int,
        default=512,
        help="CUDA context per version instance, for estimated footprints",
    )
    p.add_argument(
        "--load",
        action="append",
        default=[],
        metavar="MODEL=RPS",
        help="expected load; given for every packed model, MPS shares follow it",
    )
    p.add_argument(
        "--instances",
        action="append",
        default=[],
        metavar="MODEL=N",
        help="instance count (default: the config.pbtxt instance_group count)",
    )
    p.add_argument("--image", default=None, help="tritonserver image for compose and k8s")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write plan.json, docker-compose.gpu.yml, instance_groups/, k8s/ here",
    )
    p.set_defaults(handler=cmd_plan)  # fmt: skip


def cmd_plan(args: argparse.Namespace) -> int:
    from gateway.placement import deploy, render
    from gateway.placement.plan import PlacementError, PlanPolicy, plan
    from gateway.placement.sources import detect_gpus, load_demands, read_inventory, route_p99

    try:
        policy = PlanPolicy(strict_p99_ms=args.strict_p99_ms, headroom=args.headroom)
        gpus = read_inventory(args.inventory) if args.inventory else detect_gpus()
        if not gpus:
            raise PlacementError("no GPU visible through pynvml; pass --inventory FILE")
        demands = load_demands(
            args.model_repository,
            route_p99(args.routes_dir),
            loads={k: float(v) for k, v in _pairs(args.load, "--load").items()},
            instances={k: int(v) for k, v in _pairs(args.instances, "--instances").items()},
            context_bytes=args.context_mib << 20,
        )
        if not demands:
            raise PlacementError(f"{args.model_repository}: no models (*/config.pbtxt)")
        result = plan(demands, gpus, policy)
    except (PlacementError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = render.files(result, args.image or deploy.TRITON_IMAGE)
    sys.stdout.write(out["plan.txt"])
    if args.out is not None:
        for rel, text in out.items():
            path = args.out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        print(f"wrote {len(out)} files under {args.out}")
    return 0


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{flag} takes MODEL=VALUE, got {item!r}")
        out[name] = value
    return out
