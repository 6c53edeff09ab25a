"""The placement decision: which model goes on which GPU, with what MPS share.

Pure: `ModelDemand`s and `Gpu`s in, a `Plan` out, or a `PlacementError` that says why not.

- A model whose route SLO has `p99_ms <= policy.strict_p99_ms` is *strict*: it gets a GPU of
  its own (no neighbour can steal its SMs or its memory bandwidth). Largest first, each on the
  smallest free GPU that holds it, so the big GPUs stay for the big models.
- Every other model is *packed*: best-fit decreasing over the GPUs left, so small models share
  as few GPUs as possible and whole GPUs stay free for scale-out. A GPU with two or more packed
  models runs them under MPS, each process capped by `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`.
- Memory is checked against each GPU's capacity less `policy.headroom` (CUDA's own
  allocations, fragmentation, a version being loaded next to the old one). A model that fits
  nowhere refuses the whole plan, naming the GPU closest to fitting and the shortfall.

MPS shares are integers that sum to at most 100 per GPU: an equal share by default, or
proportional to each model's expected load when every packed model has one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

GIB = 1 << 30

#: Volta and later MPS servers accept at most 48 client processes per GPU.
MAX_MPS_CLIENTS = 48

FootprintSource = Literal["manifest", "estimate", "mixed"]
ShareBasis = Literal["equal", "load"]


class PlacementError(ValueError):
    """No valid placement: too many strict models, or not enough memory."""


class OverCommitted(PlacementError):
    """A model fits on no GPU; the message names the GPU closest to fitting and the gap."""

    def __init__(self, model: str, need: int, gpu: GpuState | None, shortfall: int) -> None:
        self.model, self.need, self.shortfall = model, need, shortfall
        self.gpu = None if gpu is None else gpu.gpu.index
        if gpu is None:
            where = "no GPU is left for it"
        else:
            where = (
                f"GPU {gpu.gpu.index} ({gpu.gpu.name}) has the most room: {fmt_bytes(gpu.free)} "
                f"free of {fmt_bytes(gpu.usable)} usable "
                f"({fmt_bytes(gpu.gpu.memory_bytes)} less {gpu.headroom:.0%} headroom)"
            )
        super().__init__(
            f"over-committed: model {model!r} needs {fmt_bytes(need)} and fits on no GPU; "
            f"{where}; short by {fmt_bytes(shortfall)}"
        )


@dataclass(frozen=True, slots=True)
class Gpu:
    index: int
    name: str
    memory_bytes: int


@dataclass(frozen=True, slots=True)
class ModelDemand:
    """One Triton model as the planner sees it."""

    name: str
    #: GPU memory of one instance with every version Triton loads for it.
    instance_bytes: int
    instances: int = 1
    footprint: FootprintSource = "manifest"
    #: Tightest `slo.p99_ms` of the routes answering with it (None: no route, or no SLO).
    p99_ms: float | None = None
    #: Expected requests/s, for MPS shares; None: unknown.
    load: float | None = None
    versions: tuple[str, ...] = ()

    @property
    def memory_bytes(self) -> int:
        return self.instance_bytes * self.instances


@dataclass(frozen=True, slots=True)
class PlanPolicy:
    strict_p99_ms: float = 50.0
    headroom: float = 0.10
    max_mps_clients: int = MAX_MPS_CLIENTS

    def __post_init__(self) -> None:
        if not 0 <= self.headroom < 1:
            raise ValueError(f"headroom must be in [0, 1), got {self.headroom}")
        if self.strict_p99_ms < 0:
            raise ValueError("strict_p99_ms must be >= 0")

    def is_strict(self, m: ModelDemand) -> bool:
        return m.p99_ms is not None and m.p99_ms <= self.strict_p99_ms


@dataclass(frozen=True, slots=True)
class Assignment:
    model: str
    gpu: int
    instances: int
    memory_bytes: int
    dedicated: bool
    #: CUDA_MPS_ACTIVE_THREAD_PERCENTAGE; None when the process has the GPU to itself.
    mps_thread_pct: int | None = None


@dataclass(frozen=True, slots=True)
class GpuPlan:
    gpu: Gpu
    mode: Literal["dedicated", "shared", "idle"]
    usable_bytes: int
    assignments: tuple[Assignment, ...] = ()

    @property
    def used_bytes(self) -> int:
        return sum(a.memory_bytes for a in self.assignments)

    @property
    def mps(self) -> bool:
        return self.mode == "shared" and len(self.assignments) > 1


@dataclass(frozen=True, slots=True)
class Plan:
    gpus: tuple[GpuPlan, ...]
    policy: PlanPolicy
    share_basis: ShareBasis
    models: tuple[ModelDemand, ...] = field(default_factory=tuple)

    def assignments(self) -> list[Assignment]:
        return sorted((a for g in self.gpus for a in g.assignments), key=lambda a: a.model)


@dataclass(slots=True)
class GpuState:
    """A GPU while the plan is being built."""

    gpu: Gpu
    headroom: float
    models: list[ModelDemand] = field(default_factory=list)

    @property
    def usable(self) -> int:
        return int(self.gpu.memory_bytes * (1 - self.headroom))

    @property
    def free(self) -> int:
        return self.usable - sum(m.memory_bytes for m in self.models)


def plan(
    models: Sequence[ModelDemand], gpus: Sequence[Gpu], policy: PlanPolicy | None = None
) -> Plan:
    """Place every model or raise `PlacementError`; the same input gives the same plan."""
    policy = policy or PlanPolicy()
    if not gpus:
        raise PlacementError("no GPUs in the inventory")
    indexes = [g.index for g in gpus]
    if len(set(indexes)) != len(indexes):
        raise PlacementError(f"duplicate GPU indexes in the inventory: {sorted(indexes)}")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise PlacementError(f"duplicate model names: {sorted(names)}")
    states = [GpuState(g, policy.headroom) for g in sorted(gpus, key=lambda g: g.index)]
    order = sorted(models, key=lambda m: (-m.memory_bytes, m.name))
    strict = [m for m in order if policy.is_strict(m)]
    packed = [m for m in order if not policy.is_strict(m)]

    if len(strict) > len(states):
        raise PlacementError(
            f"{len(strict)} models have a strict p99 (<= {policy.strict_p99_ms:g} ms: "
            f"{', '.join(sorted(m.name for m in strict))}) and each needs a dedicated GPU; "
            f"the inventory has {len(states)}"
        )
    free = list(states)
    dedicated: list[GpuState] = []
    for m in strict:
        fits = [s for s in free if s.free >= m.memory_bytes]
        if not fits:
            closest = max(free, key=lambda s: (s.free, -s.gpu.index))
            raise OverCommitted(m.name, m.memory_bytes, closest, m.memory_bytes - closest.free)
        best = min(fits, key=lambda s: (s.usable, s.gpu.index))
        best.models.append(m)
        free.remove(best)
        dedicated.append(best)

    if packed and not free:
        raise PlacementError(
            f"all {len(states)} GPUs are dedicated to strict models; none is left for "
            f"{', '.join(sorted(m.name for m in packed))}"
        )
    for m in packed:
        fits = [
            s for s in free if s.free >= m.memory_bytes and len(s.models) < policy.max_mps_clients
        ]
        if not fits:
            if any(s.free >= m.memory_bytes for s in free):
                raise PlacementError(
                    f"model {m.name!r}: every GPU with room for it already runs "
                    f"{policy.max_mps_clients} MPS clients (the per-GPU limit)"
                )
            closest = max(free, key=lambda s: (s.free, -s.gpu.index))
            raise OverCommitted(m.name, m.memory_bytes, closest, m.memory_bytes - closest.free)
        min(fits, key=lambda s: (s.free, s.gpu.index)).models.append(m)

    basis = _share_basis(packed)
    out = []
    for s in states:
        if s in dedicated:
            (m,) = s.models
            out.append(GpuPlan(s.gpu, "dedicated", s.usable, (_assign(m, s, True, None),)))
        elif s.models:
            pcts = mps_shares(s.models, basis) if len(s.models) > 1 else {}
            group = tuple(_assign(m, s, False, pcts.get(m.name)) for m in s.models)
            out.append(GpuPlan(s.gpu, "shared", s.usable, tuple(sorted(group, key=_by_model))))
        else:
            out.append(GpuPlan(s.gpu, "idle", s.usable))
    return Plan(tuple(out), policy, basis, tuple(sorted(models, key=lambda m: m.name)))


def mps_shares(models: Sequence[ModelDemand], basis: ShareBasis) -> dict[str, int]:
    """Integer thread percentages per model, at least 1 each, summing to at most 100."""
    if not models:
        return {}
    if len(models) > 100:
        raise PlacementError("more than 100 processes cannot each get 1 % of a GPU")
    weights: Mapping[str, float] = {
        m.name: (float(m.load or 0.0) if basis == "load" else 1.0) for m in models
    }
    total = sum(weights.values())
    if total <= 0:  # every load zero: fall back to an equal split
        weights = {name: 1.0 for name in weights}
        total = float(len(weights))
    pct = {name: max(1, int(100 * w / total)) for name, w in weights.items()}
    # The floor of 1 % can push the sum past 100: take the excess from the largest shares.
    while sum(pct.values()) > 100:
        top = max(sorted(pct), key=lambda n: pct[n])
        pct[top] -= 1
    return pct


def _share_basis(packed: Sequence[ModelDemand]) -> ShareBasis:
    with_load = [m for m in packed if m.load is not None]
    if not with_load:
        return "equal"
    missing = sorted(m.name for m in packed if m.load is None)
    if missing:
        raise PlacementError(
            f"expected load given for some packed models but not for {', '.join(missing)}: "
            "give it for all (proportional MPS shares) or none (equal shares)"
        )
    return "load"


def _assign(m: ModelDemand, s: GpuState, dedicated: bool, pct: int | None) -> Assignment:
    return Assignment(m.name, s.gpu.index, m.instances, m.memory_bytes, dedicated, pct)


def _by_model(a: Assignment) -> str:
    return a.model


def fmt_bytes(n: int) -> str:
    if abs(n) >= GIB:
        return f"{n / GIB:.1f} GiB"
    return f"{n / (1 << 20):.0f} MiB"
