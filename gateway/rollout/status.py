"""`rollout status`: per model, the stage, the metrics against the thresholds, the history.

Read-only: it measures the window as the controller would (same stats, same `decide`), shows
who holds the lease, whether the route file carries an edit the controller did not make, and
the last entries of the audit stream. Nothing is written.
"""

from __future__ import annotations

from typing import Any

import orjson
from redis.exceptions import RedisError

from gateway.errors import StreamUnavailable
from gateway.rollout.analysis import CanaryStats, PromotionPolicy, decide
from gateway.rollout.controller import RolloutController, RolloutError, active_challenger, text
from gateway.routing.split import BUCKETS


def stage(policy: PromotionPolicy, weight: float, history: list[dict[str, Any]]) -> str:
    steps = policy.steps
    if weight <= 0:
        last = history[0] if history else {}
        if last.get("swap") is True:
            return f"promoted: {last.get('champion_after')} is the champion; rollback target at 0 %"
        return "0 %: not started or rolled back"
    if weight >= steps[-1]:
        return f"{weight:g} %: top step set by hand"
    done = sum(s <= weight for s in steps)
    return (
        f"{weight:g} %: step {done} of {len(steps)} (ladder {', '.join(f'{s:g}' for s in steps)})"
    )


def gates(policy: PromotionPolicy, stats: CanaryStats) -> list[dict[str, Any]]:
    """Each gate of the promotion rule: measured value, threshold, pass or not."""
    c, x = stats.champion, stats.challenger
    out: list[dict[str, Any]] = [
        {"gate": "samples", "value": f"{x.count} / {c.count} (challenger / champion)",
         "threshold": f">= {policy.min_samples} each",
         "ok": min(x.count, c.count) >= policy.min_samples},
    ]  # fmt: skip
    if c.p99_ms is not None and x.p99_ms is not None:
        limit = c.p99_ms * policy.p99_ratio + policy.p99_slack_ms
        out.append({"gate": "p99", "value": f"{x.p99_ms:.2f} ms (champion {c.p99_ms:.2f})",
                    "threshold": f"<= {limit:.2f} ms", "ok": x.p99_ms <= limit})  # fmt: skip
    err = c.error_rate + policy.error_rate_slack
    out.append({"gate": "error rate", "value": f"{x.error_rate:.3%} (champion {c.error_rate:.3%})",
                "threshold": f"<= {err:.3%}", "ok": x.error_rate <= err + 1e-12})  # fmt: skip
    delta = stats.accuracy_delta
    labelled = f"{x.labelled} / {c.labelled} labelled"
    if delta is None or min(x.labelled, c.labelled) < policy.min_labels:
        out.append({"gate": "accuracy delta", "value": f"not gating ({labelled})",
                    "threshold": f"{policy.min_labels} labels each", "ok": None})  # fmt: skip
    else:
        out.append({"gate": "accuracy delta", "value": f"{delta:+.3%} ({labelled})",
                    "threshold": f"> {-policy.max_accuracy_drop:+.3%}",
                    "ok": delta > -policy.max_accuracy_drop})  # fmt: skip
    return out


async def model_status(c: RolloutController, model: str, history: int = 10) -> dict[str, Any]:
    route = c.route(model)
    view: dict[str, Any] = {
        "model": model, "route_file": route.source, "champion": str(route.champion),
        "policy_version": route.policy_version,
    }  # fmt: skip
    view["history"] = await audit_history(c, model, history)
    holder = await c.lease(model).current()
    view["lease"] = None if holder is None else {"holder": holder.holder, "token": holder.token,
                                                 "ttl_ms": holder.ttl_ms}  # fmt: skip
    try:
        written = await c.client.get(c.written_key(model))
    except (RedisError, OSError) as exc:
        raise StreamUnavailable(f"rollout state read failed: {exc}") from exc
    view["edited_outside_controller"] = (
        written is not None and text(written) != route.policy_version
    )
    try:
        arm = active_challenger(route)
    except RolloutError as exc:
        view.update(challenger=None, stage=f"not automated: {exc}", gates=[], verdict=None)
        return view
    weight = arm.buckets * 100 / BUCKETS
    stats = await c.gather(model, route, arm)
    verdict = decide(c.policy, stats, weight)
    view.update(
        challenger=str(arm.target),
        weight=weight,
        stage=stage(c.policy, weight, view["history"]),
        window_s=c.policy.window_s,
        gates=gates(c.policy, stats),
        verdict={"action": verdict.action, "next_weight": verdict.next_weight,
                 "final": verdict.final, "reasons": list(verdict.reasons)},
    )  # fmt: skip
    return view


async def audit_history(c: RolloutController, model: str, count: int) -> list[dict[str, Any]]:
    """The last `count` audit entries, newest first, decoded."""
    try:
        rows = await c.client.xrevrange(c.audit_stream(model), count=count)
    except (RedisError, OSError) as exc:
        raise StreamUnavailable(f"rollout audit read failed: {exc}") from exc
    out = []
    for entry_id, fields in rows or []:
        e: dict[str, Any] = {"id": entry_id.decode() if isinstance(entry_id, bytes) else entry_id}
        for k, v in (fields or {}).items():
            key, value = text(k), text(v)
            try:
                e[key] = orjson.loads(value) if key not in _TEXT else value
            except orjson.JSONDecodeError:
                e[key] = value
        out.append(e)
    return out


_TEXT = {"model", "route_file", "challenger", "action", "controller", "os_user",
         "champion_before", "champion_after", "policy_before", "policy_after"}  # fmt: skip


def render_text(view: dict[str, Any]) -> str:
    lines = [f"{view['model']}: {view['stage']}",
             f"  champion {view['champion']}  challenger {view.get('challenger') or '-'}  "
             f"({view['route_file']}, {view['policy_version']})"]  # fmt: skip
    lease = view["lease"]
    lines.append(f"  lease: {lease['holder']} (token {lease['token']})" if lease else
                 "  lease: free (no controller acting)")  # fmt: skip
    if view["edited_outside_controller"]:
        lines.append("  the route file has an edit the controller did not make; it stands")
    if view.get("weight") == 0:  # a rollback target or a rolled-back canary: nothing to judge
        lines.append("  no canary: the challenger is at 0 % (the controller never restarts "
                     "one; `routes set-weight` does)")  # fmt: skip
    elif view["gates"]:
        lines.append(f"  gates over the last {view['window_s']:g} s (current policy only):")
        for g in view["gates"]:
            mark = {True: "pass", False: "FAIL", None: "  - "}[g["ok"]]
            lines.append(f"    [{mark}] {g['gate']:<15} {g['value']}  (need {g['threshold']})")
    if view.get("verdict") and view.get("weight") != 0:
        v = view["verdict"]
        lines.append(f"  now: {v['action']} -> {v['next_weight']:g} %"
                     + (" (champion swap)" if v["final"] else ""))  # fmt: skip
    lines.append(f"  history ({len(view['history'])} newest first):")
    for h in view["history"]:
        state = "dry run" if h.get("dry_run") else ("applied" if h.get("applied") else "held")
        reasons = h.get("reasons") or [""]
        lines.append(f"    {h['id']} {h.get('controller', '?')}: {h.get('action')} "
                     f"{h.get('from_weight')} -> {h.get('to_weight')} % ({state}"
                     f"{', swap' if h.get('swap') else ''}) {reasons[0]}")  # fmt: skip
    return "\n".join(lines)
