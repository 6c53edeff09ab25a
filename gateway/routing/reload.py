"""Hot reload of the routes directory: poll, validate fully, then swap atomically.

Polling file fingerprints every ~0.5 s from an asyncio task is portable (no inotify) and cheap.
A candidate table goes live only when it parses, every target is a known model version, and
every newly named version is READY and passes its probe (`readiness.VersionGate`). Anything
less leaves the last good table serving, is logged, counted in
`route_reloads_total{result="rejected"}` and shown on `GET /admin/routes`. SIGHUP reloads at
once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from gateway.catalog import ModelCatalog
from gateway.metrics import Metrics
from gateway.routing.readiness import VersionGate
from gateway.routing.table import RouteError, RouteTable, RouteTableRef, load_route_table

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ReloadResult:
    result: str  # "ok" or "rejected"
    at: float  # wall-clock time (seconds since the epoch)
    reason: str  # "change", "sighup", "manual"
    error: str | None = None
    policy_versions: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {
            "result": self.result,
            "at": self.at,
            "reason": self.reason,
            "error": self.error,
            "policy_versions": dict(self.policy_versions),
        }


def fingerprint(routes_dir: Path) -> str:
    """Content hash of every route file: names and bytes (mtimes alone miss same-second edits)."""
    h = hashlib.sha256()
    for path in sorted(routes_dir.glob("*.yaml")):
        h.update(path.name.encode() + b"\0")
        with contextlib.suppress(OSError):  # deleted between glob and read: next poll sees it
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


class RouteReloader:
    def __init__(
        self,
        routes_dir: Path,
        ref: RouteTableRef,
        gate: VersionGate,
        metrics: Metrics,
        *,
        load_catalog: Callable[[], ModelCatalog],
        interval_s: float = 0.5,
        wall_clock: Callable[[], float] = time.time,
        history: int = 20,
        sticky_secret: str = "",
        seen: str | None = None,
    ) -> None:
        """``seen``: the `fingerprint` taken *before* the table in ``ref`` was loaded. Taken
        here instead, an edit landing between that load and this constructor would count as
        already applied and the old table would serve until the next edit. Omitted: now,
        which is right only when ``ref`` was loaded just before, with no await between."""
        self.routes_dir = routes_dir
        self.sticky_secret = sticky_secret
        self.ref = ref
        self.gate = gate
        self.metrics = metrics
        self.load_catalog = load_catalog
        self.interval_s = interval_s
        self.wall_clock = wall_clock
        self.last: ReloadResult | None = None
        #: The most recent reloads, newest last (the status page lists them).
        self.history: deque[ReloadResult] = deque(maxlen=history)
        self._seen = fingerprint(routes_dir) if seen is None else seen
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def reload(self, reason: str = "manual") -> ReloadResult:
        """Build and verify a new table from disk; swap it in only if all of it is good."""
        async with self._lock:  # one reload at a time; a poll during one waits
            seen = fingerprint(self.routes_dir)
            try:
                catalog = self.load_catalog()
                table = load_route_table(self.routes_dir, catalog, self.sticky_secret)
                await self.gate.check(table, self.ref.current, catalog)
            except (RouteError, OSError, ValueError, KeyError) as exc:
                result = ReloadResult("rejected", self.wall_clock(), reason, str(exc))
                log.error("routes_rejected", reason=reason, error=str(exc))
            else:
                self.ref.swap(table)  # one snapshot: the routes and their catalog together
                result = ReloadResult("ok", self.wall_clock(), reason, None, _versions(table))
                log.info(
                    "routes_reloaded", reason=reason, policy_versions=dict(result.policy_versions)
                )
            self._seen = seen
            self.metrics.route_reloads.labels(result.result).inc()
            self.last = result
            self.history.append(result)
            return result

    def changed(self) -> bool:
        return fingerprint(self.routes_dir) != self._seen

    def trigger(self) -> None:
        """Reload at the next turn of the watcher (SIGHUP)."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await self._wake.wait()
            reason = "sighup" if self._wake.is_set() else "change"
            self._wake.clear()
            try:
                if reason == "sighup" or self.changed():
                    await self.reload(reason)
            except Exception:  # the watcher must outlive any surprise; the next poll retries
                log.exception("routes_reload_crashed")

    async def start(self, sighup: bool = True) -> None:
        self._task = asyncio.create_task(self.run(), name="route-reloader")
        if sighup:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.trigger)

    async def stop(self) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _versions(table: RouteTable) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((name, r.policy_version) for name, r in table.routes.items()))
