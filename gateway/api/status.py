"""The status page's data: one plain, JSON-ready dict (a view model) read from the live app.

`GET /admin/ui` renders it as HTML and `GET /admin/ui.json` serves it as is, so everything the
page shows is testable without HTML. It is read in-process from what the app already holds:
the live route table and requests per arm, the reloader's recent results, the pool's server
and breaker states, the Prometheus registry (fallback counters; drift gauges once a drift
tracker registers `feature_drift_psi`) and the canary controller's decision records
(`<rollout.record_dir>/<model>.jsonl`). Nothing here calls a backend or Redis: the page still
answers when both are down, which is when it is needed most.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.api.admin import POOL, RELOADER, describe
from gateway.api.keys import METRICS, SERVICE, SETTINGS
from gateway.metrics import Metrics
from gateway.rollout.analysis import PromotionPolicy
from gateway.routing.table import Route

#: Conventional population-stability-index bands: under 0.1 stable, over 0.25 a real shift.
PSI_WARN, PSI_ALERT = 0.1, 0.25
TOP_DRIFT = 10
RECENT = 10  # decisions, reloads and audit entries shown
_TAIL_BYTES = 64 * 1024  # enough for the last few decision records of a long-running rollout


class AuditSource(Protocol):
    """Where the page's audit section comes from (admin actions, once an audit log exists)."""

    def recent(self, limit: int) -> Sequence[Mapping[str, Any]]: ...


AUDIT: web.AppKey[AuditSource] = web.AppKey("audit_source")


def status_view(app: web.Application, wall: Callable[[], float] = time.time) -> dict[str, Any]:
    """Everything the status page shows, as plain data. Keys: `routes` (arms, weights,
    requests per arm), `canaries` (ladder, stage, last decisions, `gates` against the policy),
    `servers` (None without a pool), `fallback`, `drift` (`enabled` False until a
    `feature_drift_psi` gauge exists), `reloads`, `audit` (`enabled` False without a source)."""
    settings = app[SETTINGS]
    service = app[SERVICE]
    metrics = app[METRICS]
    reloader = app.get(RELOADER)
    pool = app.get(POOL)
    audit = app.get(AUDIT)
    families = {f.name: f for f in _families(metrics)}
    table = service.routes.current
    routes = [_route(route, service.arm_counts) for _, route in sorted(table.routes.items())]
    return {
        "generated_at": wall(),
        "pid": os.getpid(),  # under `serve --workers N`, the worker that answered
        "routes": routes,
        "canaries": [
            _canary(route, settings.rollout.policy, settings.rollout.record_dir)
            for _, route in sorted(table.routes.items())
            if route.split is not None and len(route.split.arms) > 1
        ],
        "servers": _servers(pool.states()) if pool is not None else None,
        "fallback": _fallback(families.get("fallback")),
        "drift": _drift(families.get("feature_drift_psi")),
        "reloads": {
            "recent": [r.to_dict() for r in reversed(reloader.history)][:RECENT]
            if reloader is not None
            else [],
            "counts": _by_label(families.get("route_reloads"), "route_reloads_total", "result"),
        },
        "audit": _audit(audit),
    }


def _audit(source: AuditSource | None) -> dict[str, Any]:
    entries = [dict(e) for e in source.recent(RECENT)] if source is not None else []
    columns = list(dict.fromkeys(k for e in entries for k in e))  # every field, first-seen order
    return {"enabled": source is not None, "columns": columns, "entries": entries}


def _route(route: Route, arm_counts: Mapping[tuple[str, str], int]) -> dict[str, Any]:
    view = describe(route)
    for arm in view["arms"]:
        arm["requests"] = arm_counts.get((route.name, arm["arm"]), 0)
    for seg in view["segments"]:
        seg["requests"] = arm_counts.get((route.name, f"segment:{seg['name']}"), 0)
    view["name"] = route.name
    view["slo"] = {"p99_ms": route.slo.p99_ms, "error_rate": route.slo.error_rate}
    return view


# -- the canary ---------------------------------------------------------------------------


def _canary(route: Route, policy: PromotionPolicy, record_dir: Path) -> dict[str, Any]:
    """Stage on the promotion ladder, the last decisions, and the last window's metrics
    against the policy's gates (the controller's own record: what it decided on)."""
    assert route.split is not None
    challengers = [a for a in route.split.arms if a.name != "champion"]
    weights = route.split.weights()
    records = tail_records(record_dir / f"{route.name}.jsonl", RECENT)
    last = records[-1] if records else {}
    measured = last.get("stats") or {}
    view: dict[str, Any] = {
        "model": route.name,
        "challengers": [{"target": str(a.target), "weight": weights[a.name]} for a in challengers],
        "automated": len(challengers) == 1,  # the controller rolls out exactly one
        "steps": [],
        "stage": None,
        "decisions": [_decision(r) for r in reversed(records)],
        "gates": _gates(policy, measured) if measured else [],
        # The last decision measured another version of the route file (e.g. a human edit).
        "stale": bool(measured) and measured.get("policy_version") != route.policy_version,
    }
    if view["automated"]:
        weight = weights[challengers[0].name]
        view["steps"] = [
            {"weight": s, "state": "done" if s < weight else ("current" if s == weight else "next")}
            for s in policy.steps
        ]
        view["stage"] = _stage(policy, weight)
    return view


def _stage(policy: PromotionPolicy, weight: float) -> str:
    steps = policy.steps
    if weight <= 0:
        return "0 %: not started or rolled back"
    if weight >= steps[-1]:
        return f"{weight:g} %: promotion complete; the controller swaps the champion next"
    if weight in steps:
        return f"{weight:g} %: step {steps.index(weight) + 1} of {len(steps)}"
    nxt = policy.next_step(weight)
    return f"{weight:g} %: off the ladder (next step {nxt:g} %)"


def _decision(record: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "ts": record.get("ts"),
        "action": record.get("action"),
        "from_weight": record.get("from_weight"),
        "to_weight": record.get("to_weight"),
        "applied": record.get("applied"),
        "dry_run": record.get("dry_run"),
        "reasons": list(record.get("reasons") or []),
    }


def _gates(policy: PromotionPolicy, stats: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per gate of `analysis.decide`: the challenger's value, the limit, pass or not
    (None: the gate did not count, e.g. too few labels)."""
    champ, chall = stats.get("champion") or {}, stats.get("challenger") or {}
    n_champ, n_chall = int(champ.get("count") or 0), int(chall.get("count") or 0)
    rows = [
        {
            "gate": "answers per arm",
            "value": min(n_champ, n_chall),
            "limit": policy.min_samples,
            "op": ">=",
            "unit": "",
            "ok": min(n_champ, n_chall) >= policy.min_samples,
            "detail": f"champion {n_champ}, challenger {n_chall}",
        }
    ]
    p_champ, p_chall = champ.get("p99_ms"), chall.get("p99_ms")
    if p_champ is not None and p_chall is not None:
        limit = p_champ * policy.p99_ratio + policy.p99_slack_ms
        rows.append({
            "gate": "p99 latency", "value": p_chall, "limit": limit, "op": "<=", "unit": "ms",
            "ok": p_chall <= limit,
            "detail": f"champion {p_champ:.3f} ms x {policy.p99_ratio:g}"
                      f" + {policy.p99_slack_ms:g} ms",
        })  # fmt: skip
    e_champ, e_chall = champ.get("error_rate") or 0.0, chall.get("error_rate") or 0.0
    e_limit = e_champ + policy.error_rate_slack
    rows.append({
        "gate": "error rate", "value": e_chall, "limit": e_limit, "op": "<=", "unit": "ratio",
        "ok": e_chall <= e_limit + 1e-12,
        "detail": f"champion {e_champ:.4%} + {policy.error_rate_slack:.4%}",
    })  # fmt: skip
    delta = stats.get("accuracy_delta")
    labelled = min(int(champ.get("labelled") or 0), int(chall.get("labelled") or 0))
    floor = -policy.max_accuracy_drop
    ok = None if delta is None or labelled < policy.min_labels else delta > floor
    rows.append({
        "gate": "accuracy delta", "value": delta, "limit": floor, "op": ">",
        "unit": "ratio", "ok": ok,
        "detail": f"{labelled} labelled per arm (needs {policy.min_labels})",
    })  # fmt: skip
    return rows


def tail_records(path: Path, n: int) -> list[dict[str, Any]]:
    """The last `n` JSON lines of a decision record (read from its tail only; a torn or
    foreign line is skipped, a missing file is no decisions yet)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - _TAIL_BYTES))
            chunk = fh.read()
    except OSError:
        return []
    lines = chunk.splitlines()
    if size > _TAIL_BYTES:
        lines = lines[1:]  # the first line of the chunk is probably cut
    out: list[dict[str, Any]] = []
    for line in reversed(lines):
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
            if len(out) == n:
                break
    return out[::-1]


# -- servers and the registry ---------------------------------------------------------------


def _servers(states: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "ready": s["ready"],
            "in_flight": s["in_flight"],
            "breakers": [{"model": m, "state": st} for m, st in sorted(s["breakers"].items())],
        }
        for name, s in sorted(states.items())
    ]


def _families(metrics: Metrics) -> Iterable[Metric]:
    """This process's registry, or every worker's values under `serve --workers N`."""
    if metrics.multiprocess_dir:
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=metrics.multiprocess_dir)
        return merged.collect()
    return metrics.registry.collect()


def _samples(family: Metric | None, sample: str) -> list[tuple[dict[str, str], float]]:
    if family is None:
        return []
    return [(dict(s.labels), float(s.value)) for s in family.samples if s.name == sample]


def _by_label(family: Metric | None, sample: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, value in _samples(family, sample):
        out[labels.get(label, "")] = out.get(labels.get(label, ""), 0.0) + value
    return out


def _fallback(family: Metric | None) -> dict[str, Any]:
    rows: list[dict[str, Any]] = [
        {"rung": lb.get("rung", ""), "reason": lb.get("reason", ""), "count": v}
        for lb, v in _samples(family, "fallback_total")
        if v > 0
    ]
    rows.sort(key=lambda r: (-r["count"], r["rung"], r["reason"]))
    return {"total": sum(r["count"] for r in rows), "by_rung": rows}


def _drift(family: Metric | None) -> dict[str, Any]:
    if family is None:
        return {"enabled": False, "top": []}
    rows: list[dict[str, Any]] = [
        {
            "model": lb.get("model", ""),
            "version": lb.get("version", ""),
            "feature": lb.get("feature", ""),
            "psi": v,
            "level": "alert" if v >= PSI_ALERT else ("warn" if v >= PSI_WARN else "ok"),
        }
        for lb, v in _samples(family, "feature_drift_psi")
    ]
    rows.sort(key=lambda r: (-r["psi"], r["model"], r["feature"]))
    return {"enabled": True, "top": rows[:TOP_DRIFT]}
