"""The canary promotion controller: measure, decide, edit the route file, record why.

One evaluation reads the route file, finds its one challenger, gathers the window's stats
from the prediction log, asks `decide`, and applies the verdict through `set_weight` (the
code behind `routes set-weight`): the same YAML a human edits, rewritten with comments kept,
validated as the gateway would, and swapped in atomically. The gateway's hot reloader picks
it up like any human edit. Every evaluation (holds and dry runs too) appends one JSON line to
`<record_dir>/<model>.jsonl` and logs `rollout_decision`.

At the top step (100 %) the controller stops: the challenger keeps all the traffic and the
verdict says "promotion complete". Swapping champion and challenger is left to a human, so
the final, irreversible edit is a deliberate one and the automatic path only ever touches
one number.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
import structlog

from gateway.predlog.feedback import LabelStore
from gateway.rollout.analysis import CanaryStats, PromotionPolicy, Verdict, decide, gather_stats
from gateway.routing.edit import set_weight
from gateway.routing.split import BUCKETS, Arm
from gateway.routing.table import Route, RouteError, parse_route


class RolloutError(ValueError):
    """The route cannot be rolled out automatically (no route, zero or several challengers)."""


@dataclass(frozen=True, slots=True)
class Evaluation:
    model: str
    source: str
    challenger: str  # target@version
    from_weight: float
    to_weight: float
    verdict: Verdict
    stats: CanaryStats
    applied: bool  # the route file was rewritten
    dry_run: bool
    ts: float

    def record(self) -> dict[str, Any]:
        return {
            "ts": self.ts,
            "model": self.model,
            "route_file": self.source,
            "challenger": self.challenger,
            "action": self.verdict.action,
            "from_weight": self.from_weight,
            "to_weight": self.to_weight,
            "applied": self.applied,
            "dry_run": self.dry_run,
            "reasons": list(self.verdict.reasons),
            "stats": self.stats.to_dict(),
        }


class RolloutController:
    def __init__(
        self,
        client: aioredis.Redis,
        labels: LabelStore,
        routes_dir: Path,
        policy: PromotionPolicy,
        record_dir: Path,
        stream_prefix: str = "predictions",
        catalog: Any = None,
        wall: Callable[[], float] = time.time,
        dry_run: bool = False,
        validation: Any = None,
        audit: Any = None,  # gateway.audit.AuditLog: each applied weight change is recorded
    ) -> None:
        self.client = client
        self.labels = labels
        self.routes_dir = routes_dir
        self.policy = policy
        self.record_dir = record_dir
        self.stream_prefix = stream_prefix
        self.catalog = catalog  # ModelCatalog: the rewritten file's targets are checked too
        self.wall = wall
        self.dry_run = dry_run
        self.validation = validation  # ValidationGate: no step up without a passing report
        self.audit = audit
        self.log = structlog.get_logger("gateway.rollout")

    async def evaluate_once(self, model: str) -> Evaluation:
        route = self._route(model)
        challenger = _challenger(route)
        weight = challenger.buckets * 100 / BUCKETS
        stats = await gather_stats(
            self.client,
            self.labels,
            f"{self.stream_prefix}:{model}",
            champion_arm="champion",
            challenger_arm=challenger.name,
            policy_version=route.policy_version,
            window_s=self.policy.window_s,
            wall=self.wall,
        )
        verdict = decide(self.policy, stats, weight)
        applied = False
        refused = (
            self.validation.refusal(challenger.target.model, challenger.target.version)
            if self.validation is not None and verdict.next_weight > weight
            else None
        )
        if refused is not None:  # the gate: no step up for a version without a passing report
            verdict = Verdict("hold", weight, (f"validation gate: {refused}",))
        if verdict.next_weight != weight and not self.dry_run:
            # The file may have been edited while we measured: then the stats describe a
            # policy that is gone, so decide again next time rather than overwrite the edit.
            if self._route(model).policy_version != route.policy_version:
                verdict = Verdict(
                    "hold", weight, ("route file changed during the evaluation; not applied",)
                )
            else:
                set_weight(
                    self.routes_dir,
                    model,
                    challenger.target.version,
                    verdict.next_weight,
                    challenger.target.model,
                    self.catalog,
                    validation=self.validation,
                    audit=self.audit,
                )
                applied = True
        evaluation = Evaluation(
            model=model,
            source=route.source,
            challenger=str(challenger.target),
            from_weight=weight,
            to_weight=verdict.next_weight,
            verdict=verdict,
            stats=stats,
            applied=applied,
            dry_run=self.dry_run,
            ts=self.wall(),
        )
        self._record(evaluation)
        return evaluation

    async def run(
        self,
        model: str,
        interval_s: float,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        iterations: int | None = None,
    ) -> None:
        """Evaluate every `interval_s` until cancelled (or `iterations` times, for tests).

        A failing evaluation (Redis down, a route file a human broke) is logged and retried
        at the next tick: the controller never edits on partial information.
        """
        done = 0
        while iterations is None or done < iterations:
            try:
                await self.evaluate_once(model)
            except (RolloutError, RouteError, OSError) as exc:
                self.log.error("rollout_failed", model=model, error=str(exc))
            except Exception as exc:  # SwitchyardError from Redis; keep the loop alive
                self.log.error("rollout_failed", model=model, error=str(exc), exc_info=True)
            done += 1
            if iterations is None or done < iterations:
                await sleep(interval_s)

    def record_path(self, model: str) -> Path:
        return self.record_dir / f"{model}.jsonl"

    def _record(self, ev: Evaluation) -> None:
        record = ev.record()
        path = self.record_path(ev.model)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as fh:  # one write per line: appends from one process stay whole
            fh.write(orjson.dumps(record) + b"\n")
        self.log.info("rollout_decision", **record)

    def _route(self, model: str) -> Route:
        """The route file of `model` (`<model>.yaml` first, then any file naming it)."""
        candidates = [self.routes_dir / f"{model}.yaml", *sorted(self.routes_dir.glob("*.yaml"))]
        for path in dict.fromkeys(candidates):
            if not path.is_file():
                continue
            route = parse_route(path.read_bytes(), str(path))
            if route.name == model:
                return route
        raise RolloutError(f"{self.routes_dir}: no route file for model {model!r}")


def _challenger(route: Route) -> Arm:
    arms = [] if route.split is None else [a for a in route.split.arms if a.name != "champion"]
    if len(arms) != 1:
        names = ", ".join(str(a.target) for a in arms) or "none"
        raise RolloutError(
            f"{route.source}: the controller rolls out exactly one challenger per route; "
            f"found {len(arms)} ({names})"
        )
    return arms[0]
