"""Canary analysis: per-arm health from the prediction log, and the promotion decision.

`gather_stats` reads one model's prediction-log stream over the analysis window (XRANGE by
entry time) and summarises the champion and one challenger arm: answers, p99 latency, the
error share (fallback answers count as errors: the arm's own model did not answer) and the
accuracy on joined labels. Only entries served under the route file's *current*
`policy_version` count, so a step is judged on traffic seen at that step's weight, never on
data left over from the previous one.

`decide` is pure: a `PromotionPolicy`, the stats and the current weight in, a `Verdict` out.
Any breach rolls back to 0 at once; too little data holds; all gates passing promote one
step of the ladder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.errors import StreamUnavailable
from gateway.predlog.feedback import LabelStore, is_correct
from gateway.predlog.redis_stream import decode_fields
from gateway.stats import p99

Action = Literal["promote", "hold", "rollback"]


@dataclass(frozen=True, slots=True)
class PromotionPolicy:
    """The promotion rule of ARCHITECTURE section 4, with its defaults."""

    #: Challenger weights in percent, ascending; the last one ends the rollout.
    steps: tuple[float, ...] = (5.0, 25.0, 50.0, 100.0)
    #: Analysis window: the stream entries of the last `window_s` seconds.
    window_s: float = 600.0
    #: Answers needed in *each* arm before any gate is judged.
    min_samples: int = 200
    #: Challenger p99 may be at most champion p99 x this (1.10: within 10 %) ...
    p99_ratio: float = 1.10
    #: ... plus this many milliseconds (0: the ratio alone).
    p99_slack_ms: float = 0.0
    #: Challenger error rate may exceed the champion's by at most this (absolute share).
    error_rate_slack: float = 0.001
    #: Challenger accuracy minus champion accuracy must stay above -this (0.005: -0.5 %).
    max_accuracy_drop: float = 0.005
    #: Labelled answers needed in each arm for the accuracy gate to count.
    min_labels: int = 100

    def __post_init__(self) -> None:
        steps = self.steps
        if not steps or any(not 0 < s <= 100 for s in steps) or list(steps) != sorted(set(steps)):
            raise ValueError(f"steps must be ascending percentages in (0, 100], got {steps!r}")
        if self.window_s <= 0 or self.min_samples < 1 or self.p99_ratio < 1:
            raise ValueError("window_s > 0, min_samples >= 1 and p99_ratio >= 1 are required")

    def next_step(self, weight: float) -> float | None:
        """The first step above `weight` (10 -> 25 on the default ladder); None at the top."""
        return next((s for s in self.steps if s > weight + 1e-9), None)


@dataclass(frozen=True, slots=True)
class ArmStats:
    arm: str
    count: int = 0
    errors: int = 0  # fallback answers: the arm's own model did not answer
    p99_ms: float | None = None
    labelled: int = 0  # labelled answers from the arm's own model (fallbacks excluded)
    correct: int = 0

    @property
    def error_rate(self) -> float:
        return self.errors / self.count if self.count else 0.0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["error_rate"] = round(self.error_rate, 6)
        acc = self.accuracy
        out["accuracy"] = None if acc is None else round(acc, 6)
        return out


@dataclass(frozen=True, slots=True)
class CanaryStats:
    champion: ArmStats
    challenger: ArmStats
    window_start: float  # wall-clock seconds
    window_end: float
    policy_version: str
    #: Entries in the window served under another policy_version (an earlier weight): ignored.
    ignored: int = 0

    @property
    def accuracy_delta(self) -> float | None:
        a, b = self.challenger.accuracy, self.champion.accuracy
        return None if a is None or b is None else a - b

    def to_dict(self) -> dict[str, Any]:
        delta = self.accuracy_delta
        return {
            "champion": self.champion.to_dict(),
            "challenger": self.challenger.to_dict(),
            "accuracy_delta": None if delta is None else round(delta, 6),
            "window_start": self.window_start,
            "window_end": self.window_end,
            "policy_version": self.policy_version,
            "ignored": self.ignored,
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    next_weight: float
    reasons: tuple[str, ...] = field(default_factory=tuple)
    #: The promotion to the ladder's last step: the challenger becomes the champion.
    final: bool = False


def summarise(
    entries: Sequence[Mapping[str, Any]],
    labels: Sequence[Any],
    champion_arm: str,
    challenger_arm: str,
) -> tuple[ArmStats, ArmStats]:
    """Per-arm stats from decoded entries and their labels (None: unlabelled), same order."""
    acc: dict[str, dict[str, Any]] = {
        a: {"count": 0, "errors": 0, "lat": [], "labelled": 0, "correct": 0}
        for a in (champion_arm, challenger_arm)
    }
    for e, label in zip(entries, labels, strict=True):
        s = acc.get(str(e.get("arm")))
        if s is None:
            continue  # segments and other challengers are not part of this comparison
        s["count"] += 1
        if e.get("latency_ms") is not None:
            s["lat"].append(float(e["latency_ms"]))
        if e.get("fallback_used"):
            s["errors"] += 1
        elif label is not None:  # a fallback's answer says nothing about the arm's model
            s["labelled"] += 1
            s["correct"] += is_correct(e.get("output"), label)
    arm_stats = [
        ArmStats(
            arm=a, count=s["count"], errors=s["errors"], p99_ms=p99(s["lat"]),
            labelled=s["labelled"], correct=s["correct"],
        )
        for a, s in acc.items()
    ]  # fmt: skip
    return arm_stats[0], arm_stats[1]


async def gather_stats(
    client: aioredis.Redis,
    labels: LabelStore,
    stream: str,
    champion_arm: str,
    challenger_arm: str,
    policy_version: str,
    window_s: float,
    wall: Callable[[], float],
    chunk: int = 1000,
    since: float | None = None,
) -> CanaryStats:
    """Read the window of `stream` (XRANGE by entry time), join labels, summarise both arms.

    ``since``: when the current file took effect (the controller adopted or wrote it); the
    window starts there if that is later than ``window_s`` ago. A policy_version is a hash
    of the file's bytes, so a file reverted by hand to earlier content shares its hash with
    traffic served before the revert; that traffic must not judge the reverted step."""
    end = wall()
    start = end - window_s
    first_ms = int(start * 1000)
    if since is not None and since > start:
        # Rounded up: an entry in since's own millisecond may predate it; dropping a few
        # new entries costs nothing, counting an old one judges on the wrong traffic.
        start, first_ms = since, math.ceil(since * 1000)
    cursor, stop = str(first_ms), str(int(end * 1000))
    entries: list[dict[str, Any]] = []
    ignored = 0
    try:
        while True:
            rows = await client.xrange(stream, min=cursor, max=stop, count=chunk) or []
            for _, fields in rows:
                e = decode_fields(fields or {})
                if e.get("policy_version") == policy_version:
                    entries.append(e)
                else:
                    ignored += 1
            if len(rows) < chunk:
                break
            last = rows[-1][0]
            cursor = "(" + (last.decode() if isinstance(last, bytes) else str(last))
    except (RedisError, OSError) as exc:
        raise StreamUnavailable(f"prediction log read failed: {exc}") from exc
    found: list[Any] = []
    for i in range(0, len(entries), chunk):  # the join's label lookup, in bounded MGETs
        found += await labels.get_many([str(e.get("request_id")) for e in entries[i : i + chunk]])
    champ, chall = summarise(entries, found, champion_arm, challenger_arm)
    return CanaryStats(champ, chall, start, end, policy_version, ignored)


def decide(policy: PromotionPolicy, stats: CanaryStats, current_weight: float) -> Verdict:
    """Promote one step, hold, or roll back to 0; `reasons` say which gates decided it."""
    champ, chall = stats.champion, stats.challenger
    if current_weight <= 0:
        return Verdict("hold", 0.0, ("challenger at 0 %: not restarted automatically; "
                                     "set a weight by hand to start a rollout",))  # fmt: skip
    if current_weight >= policy.steps[-1]:
        return Verdict("hold", current_weight, (
            f"challenger at {current_weight:g} % (set by hand): the top step; the champion has "
            "no traffic to compare with, so the controller neither judges nor swaps: lower "
            "the weight, or swap the champion by hand",
        ))  # fmt: skip
    short = [
        f"{a.arm}: {a.count} answers < min_samples {policy.min_samples}"
        for a in (champ, chall)
        if a.count < policy.min_samples
    ]
    if short:
        return Verdict("hold", current_weight, ("not enough data", *short))

    breaches: list[str] = []
    passes: list[str] = []
    assert champ.p99_ms is not None and chall.p99_ms is not None  # count >= min_samples >= 1
    limit = champ.p99_ms * policy.p99_ratio + policy.p99_slack_ms
    p99_msg = f"p99 {chall.p99_ms:.3f} ms vs limit {limit:.3f} ms (champion {champ.p99_ms:.3f})"
    (passes if chall.p99_ms <= limit else breaches).append(p99_msg)

    err_limit = champ.error_rate + policy.error_rate_slack
    err_msg = (
        f"error rate {chall.error_rate:.4%} vs limit {err_limit:.4%} "
        f"(champion {champ.error_rate:.4%})"
    )
    (passes if chall.error_rate <= err_limit + 1e-12 else breaches).append(err_msg)

    delta = stats.accuracy_delta
    if min(champ.labelled, chall.labelled) < policy.min_labels or delta is None:
        passes.append(
            f"accuracy not gating: {chall.labelled}/{champ.labelled} labelled "
            f"(challenger/champion) < min_labels {policy.min_labels}"
        )
    else:
        acc_msg = f"accuracy delta {delta:+.4%} vs floor {-policy.max_accuracy_drop:+.4%}"
        (passes if delta > -policy.max_accuracy_drop else breaches).append(acc_msg)

    if breaches:
        return Verdict("rollback", 0.0, tuple(f"breach: {b}" for b in breaches) + tuple(passes))
    step = policy.next_step(current_weight)
    assert step is not None  # current_weight < steps[-1]
    if step == policy.steps[-1]:  # the last step is the swap: the champion arm keeps nothing
        return Verdict("promote", step, (
            f"all gates pass: {current_weight:g} -> {step:g} %: final step, the challenger "
            "becomes the champion (the old champion stays at 0 % as the rollback target)",
            *passes,
        ), final=True)  # fmt: skip
    return Verdict("promote", step, (f"all gates pass: {current_weight:g} -> {step:g} %", *passes))
