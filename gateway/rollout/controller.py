"""The canary promotion controller: measure, decide, edit the route file, record why.

One evaluation reads the route file, finds its one challenger with traffic, gathers the
window's stats from the prediction log, asks `decide`, and applies the verdict to the same
YAML a human edits (gateway/routing/edit.py: comments kept, validated as the gateway would,
swapped in atomically); the gateway's hot reloader picks it up like any human edit.

- **One actor across replicas.** Only the holder of the model's Redis lease acts
  (gateway/rollout/lease.py); the others stand by. Its fencing token is checked again right
  before every route write, so a controller that lost the lease mid-evaluation writes nothing.
- **A human edit wins.** The policy_version of the last file the controller wrote is kept in
  Redis. A file whose hash differs was edited by someone else: the controller writes nothing
  in that step, adopts the edit as its new starting point, and judges later steps only on
  traffic served under it (stats count only the current policy_version, and only since the
  file took effect: `<prefix>:since:<model>`, so a revert to earlier bytes, which has the
  earlier hash, is not judged on the traffic from before the revert). The file is re-read
  right before each write, after the fencing check: an edit during that check wins too.
- **The final promotion swaps the champion** (routing/edit.py `render_swap`): the challenger
  becomes the champion and the old champion stays in the challenger list at weight 0, the
  rollback target. Zero-weight challengers are ignored when picking the one to roll out.
- **Audit.** Every evaluation the leader (or a dry run) makes goes to the Redis stream
  `<prefix>:audit:<model>` and to the log (`rollout_audit`): who (controller id, OS user),
  what, when, old and new weight, champion before and after, the reasons and the stats. It is
  also appended to `<record_dir>/<model>.jsonl`, which `rollout report` and the status page read.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from gateway.errors import StreamUnavailable
from gateway.predlog.feedback import LabelStore
from gateway.rollout.analysis import CanaryStats, PromotionPolicy, Verdict, decide, gather_stats
from gateway.rollout.lease import Lease
from gateway.routing.edit import render_swap, render_weight, write_route
from gateway.routing.split import BUCKETS, Arm
from gateway.routing.table import Route, RouteError, parse_route, policy_version


class RolloutError(ValueError):
    """The route cannot be rolled out automatically (no route, several active challengers)."""


def text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def default_controller_id() -> str:
    """Who acts, for the lease and the audit: OS user, host, pid and a random suffix."""
    return f"{os_user()}@{socket.gethostname()}:{os.getpid()}/{secrets.token_hex(3)}"


def os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return f"uid{os.getuid()}"


@dataclass(frozen=True, slots=True)
class Evaluation:
    model: str
    source: str
    challenger: str  # target@version
    from_weight: float
    to_weight: float
    verdict: Verdict
    stats: CanaryStats | None  # None: not measured (another controller holds the lease)
    applied: bool  # the route file was rewritten
    dry_run: bool
    ts: float
    swap: bool = False  # the applied step made the challenger the champion
    leader: bool = True  # False: this controller stood by; nothing recorded
    controller: str = ""
    token: int | None = None
    champion_before: str = ""
    champion_after: str = ""
    policy_before: str = ""
    policy_after: str = ""

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
            "swap": self.swap,
            "reasons": list(self.verdict.reasons),
            "stats": None if self.stats is None else self.stats.to_dict(),
            "controller": self.controller,
            "os_user": os_user(),
            "token": self.token,
            "champion_before": self.champion_before,
            "champion_after": self.champion_after,
            "policy_before": self.policy_before,
            "policy_after": self.policy_after,
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
        controller_id: str | None = None,
        key_prefix: str = "rollout",
        lease_ttl_s: float = 180.0,
        audit_maxlen: int = 10_000,
        audit: Any = None,  # gateway.audit.AuditLog: each applied change also goes there
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
        self.controller_id = controller_id or default_controller_id()
        self.key_prefix = key_prefix
        self.lease_ttl_s = lease_ttl_s
        self.audit_maxlen = audit_maxlen
        self.audit = audit
        self.log = structlog.get_logger("gateway.rollout")

    def lease(self, model: str) -> Lease:
        return Lease(self.client, self.key_prefix, model, self.controller_id, self.lease_ttl_s)

    def audit_stream(self, model: str) -> str:
        return f"{self.key_prefix}:audit:{model}"

    def written_key(self, model: str) -> str:
        return f"{self.key_prefix}:written:{model}"

    def since_key(self, model: str) -> str:
        """When the file now in force took effect (the controller adopted or wrote it), as
        ``<policy_version> <Redis time>``; its stats window starts no earlier."""
        return f"{self.key_prefix}:since:{model}"

    async def evaluate_once(self, model: str) -> Evaluation:
        route = self.route(model)
        challenger = active_challenger(route)
        weight = challenger.buckets * 100 / BUCKETS
        base: dict[str, Any] = {
            "model": model, "source": route.source, "challenger": str(challenger.target),
            "from_weight": weight, "dry_run": self.dry_run, "controller": self.controller_id,
            "champion_before": str(route.champion), "policy_before": route.policy_version,
        }  # fmt: skip
        token = None
        if not self.dry_run:  # a dry run never writes, so it needs no lease
            token = await self.lease(model).acquire()
            if token is None:
                holder = await self.lease(model).current()
                who = holder.holder if holder is not None else "another controller"
                reason = f"standing by: {who} holds the rollout lease of {model}"
                self.log.debug("rollout_standby", model=model, holder=who)
                return Evaluation(**base, to_weight=weight, verdict=Verdict("hold", weight,
                                  (reason,)), stats=None, applied=False, ts=self.wall(),
                                  leader=False)  # fmt: skip
        stats = await self.gather(model, route, challenger)
        verdict = decide(self.policy, stats, weight)
        refused = (
            self.validation.refusal(challenger.target.model, challenger.target.version)
            if self.validation is not None and verdict.next_weight > weight
            else None
        )
        if refused is not None:  # the gate: no step up for a version without a passing report
            verdict = Verdict("hold", weight, (f"validation gate: {refused}",))
        foreign = None if self.dry_run else await self._foreign_edit(model, route)
        if foreign is not None:
            verdict = Verdict("hold", weight, (foreign,))
        applied, after = False, route
        if verdict.next_weight != weight and not self.dry_run:
            assert token is not None
            verdict, after = await self._apply(model, route, challenger, verdict, token)
            applied = after is not route
        ev = Evaluation(
            **base,
            to_weight=verdict.next_weight,
            verdict=verdict,
            stats=stats,
            applied=applied,
            ts=self.wall(),
            swap=applied and verdict.final,
            token=token,
            champion_after=str(after.champion),
            policy_after=after.policy_version,
        )
        await self._record(ev)
        return ev

    async def gather(self, model: str, route: Route, challenger: Arm) -> CanaryStats:
        """The analysis window's stats of both arms under the route's current policy, from
        when that file took effect at the earliest (`since_key`)."""
        return await gather_stats(
            self.client,
            self.labels,
            f"{self.stream_prefix}:{model}",
            champion_arm="champion",
            challenger_arm=challenger.name,
            policy_version=route.policy_version,
            window_s=self.policy.window_s,
            wall=self.wall,
            since=await self._since(model, route),
        )

    async def _since(self, model: str, route: Route) -> float | None:
        """When the route's current file took effect, if recorded for this very file."""
        try:
            recorded = await self._recorded_since(model)
        except (RedisError, OSError) as exc:
            raise StreamUnavailable(f"rollout state read failed: {exc}") from exc
        return recorded[1] if recorded is not None and recorded[0] == route.policy_version else None

    async def _recorded_since(self, model: str) -> tuple[str, float] | None:
        raw = await self.client.get(self.since_key(model))
        version, _, at = ("" if raw is None else text(raw)).partition(" ")
        try:
            return (version, float(at)) if version else None
        except ValueError:
            return None

    async def _took_effect(self, model: str, version: str, since: float | None = None) -> None:
        """Record that the file `version` is in force, from `since` (default: now).

        Times are Redis's clock (TIME), the clock the stream ids the window cuts on come
        from: the controller's own clock may run ahead or behind it. The start is written
        before `written`, so a failure between the two reads as a foreign edit next step (a
        hold that records a start again), never as a known file with another file's start."""
        if since is None:
            seconds, micros = await self.client.time()
            since = seconds + micros / 1e6
        await self.client.set(self.since_key(model), f"{version} {since!r}")
        await self.client.set(self.written_key(model), version)

    async def _foreign_edit(self, model: str, route: Route) -> str | None:
        """Why this step must not write (the file is not the one the controller last wrote),
        or None. Either way the current file becomes the baseline the next step compares to."""
        try:
            raw = await self.client.get(self.written_key(model))
            written = None if raw is None else text(raw)
            if written is None:  # first sight: the file has been serving; its traffic counts
                await self.client.set(self.written_key(model), route.policy_version)
            elif written != route.policy_version:
                # The edit landed after the file the controller knew took effect, so traffic
                # under the edited file's hash from before that moment is not the edit's: a
                # revert to earlier bytes has the earlier hash, and the healthy traffic of
                # back then must not judge the reverted step. Traffic since then is the
                # edit's (the known file had another hash), so it still counts. Unknown
                # (state from before `since` existed): from now, which only waits longer.
                known = await self._recorded_since(model)
                start = known[1] if known is not None and known[0] == written else None
                await self._took_effect(model, route.policy_version, start)
        except (RedisError, OSError) as exc:
            raise StreamUnavailable(f"rollout state read failed: {exc}") from exc
        if written is None or written == route.policy_version:
            return None
        return (
            f"route edited outside the controller since its last write ({written} -> "
            f"{route.policy_version}): the edit stands, nothing written; later steps are "
            "judged on traffic under the edited file"
        )

    async def _apply(
        self, model: str, route: Route, challenger: Arm, verdict: Verdict, token: int
    ) -> tuple[Verdict, Route]:
        """Write the verdict if the file is unchanged and the lease still ours; returns the
        verdict (a hold when it was not written) and the route now on disk."""
        weight = challenger.buckets * 100 / BUCKETS
        changed = Verdict("hold", weight, ("route file changed during the evaluation; "
                                           "not applied",))  # fmt: skip
        # The file may have been edited while we measured: then the stats describe a policy
        # that is gone, so decide again next time rather than overwrite the edit. (An early
        # out only: the check that counts is the one after the lease check, below.)
        if self.route(model).policy_version != route.policy_version:
            return changed, route
        t = challenger.target
        if verdict.final:
            path, content = render_swap(self.routes_dir, model, t.version, t.model,
                                        self.catalog, self.validation)  # fmt: skip
        else:
            path, content = render_weight(self.routes_dir, model, t.version, verdict.next_weight,
                                          t.model, self.catalog, self.validation)  # fmt: skip
        if not await self.lease(model).check(token):  # fenced: a newer leader may be acting
            return Verdict("hold", weight, (f"lease lost before the write (token {token} is "
                                            "no longer current): not applied",)), route  # fmt: skip
        # `content` was rendered from the file before the lease check's round trip; an edit
        # landing during it would be overwritten (and, hashing like our own write, never seen
        # as foreign). Re-read now, with no await before the write: the file must still be
        # the one the stats and the rendering describe.
        if _file_version(path) != route.policy_version:
            return changed, route
        write_route(path, content)
        new = parse_route(content, str(path))
        if self.audit is not None:  # the gateway-wide audit stream (`audit tail`) too
            self.audit.record(
                "route.swap_champion" if verdict.final else "route.set_weight",
                f"{model}/{t.model}@{t.version}",
                weight,
                100.0 if verdict.final else verdict.next_weight,
                detail={"route_file": str(path), "lease_token": token},
            )
        try:  # the same bytes may have served before (25 % again after a revert to 10 %)
            await self._took_effect(model, policy_version(content))
        except (RedisError, OSError) as exc:  # the next step will take it for a human edit
            self.log.error("rollout_state_write_failed", model=model, error=str(exc))
        return verdict, new

    async def run(
        self,
        model: str,
        interval_s: float,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        iterations: int | None = None,
    ) -> None:
        """Evaluate every `interval_s` until cancelled (or `iterations` times, for tests).

        A failing evaluation (Redis down, a route file a human broke) is logged and retried
        at the next tick: the controller never edits on partial information. The lease is
        released on the way out, so a standby takes over at its next tick.
        """
        done = 0
        try:
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
        finally:
            await self.release(model)

    async def release(self, model: str) -> None:
        """Give the lease up if this controller holds it (a no-op otherwise)."""
        lease = self.lease(model)
        try:
            holder = await lease.current()
            if holder is not None and holder.holder == self.controller_id:
                await lease.release(holder.token)
        except StreamUnavailable as exc:  # it expires on its own
            self.log.warning("rollout_release_failed", model=model, error=str(exc))

    def record_path(self, model: str) -> Path:
        return self.record_dir / f"{model}.jsonl"

    async def _record(self, ev: Evaluation) -> None:
        record = ev.record()
        path = self.record_path(ev.model)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as fh:  # one write per line: appends from one process stay whole
            fh.write(orjson.dumps(record) + b"\n")
        self.log.info("rollout_audit", **record)
        fields: dict[Any, Any] = {
            k: v if isinstance(v, str) else orjson.dumps(v) for k, v in record.items()
        }
        try:
            await self.client.xadd(
                self.audit_stream(ev.model), fields, maxlen=self.audit_maxlen, approximate=True
            )
        except (RedisError, OSError) as exc:  # the log line and the record file have it
            self.log.error("rollout_audit_failed", model=ev.model, error=str(exc))

    def route(self, model: str) -> Route:
        """The route file of `model` (`<model>.yaml` first, then any file naming it)."""
        candidates = [self.routes_dir / f"{model}.yaml", *sorted(self.routes_dir.glob("*.yaml"))]
        for path in dict.fromkeys(candidates):
            if not path.is_file():
                continue
            route = parse_route(path.read_bytes(), str(path))
            if route.name == model:
                return route
        raise RolloutError(f"{self.routes_dir}: no route file for model {model!r}")


def _file_version(path: Path) -> str | None:
    """The policy_version of the file on disk now (None: unreadable, e.g. just deleted)."""
    try:
        return policy_version(path.read_bytes())
    except OSError:
        return None


def active_challenger(route: Route) -> Arm:
    """The challenger being rolled out: the one with traffic. Zero-weight challengers (the
    rollback target after a swap, a rolled-back canary) are ignored; with none active, the
    last listed one is returned, and `decide` holds it at 0."""
    arms = [] if route.split is None else [a for a in route.split.arms if a.name != "champion"]
    active = [a for a in arms if a.buckets > 0]
    if len(active) > 1 or not arms:
        names = ", ".join(str(a.target) for a in active) or "none"
        raise RolloutError(
            f"{route.source}: the controller rolls out exactly one challenger with traffic per "
            f"route; found {len(active) if arms else 0} ({names})"
        )
    return active[0] if active else arms[-1]
