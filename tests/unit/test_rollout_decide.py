"""The promotion rule as a pure function: promote one step, hold, or roll back to 0."""

from __future__ import annotations

import pytest

from gateway.rollout.analysis import ArmStats, CanaryStats, PromotionPolicy, decide, p99, summarise

POLICY = PromotionPolicy(min_samples=100, min_labels=50)


def stats(
    *,
    n: int = 1000,
    champ_p99: float = 10.0,
    chall_p99: float = 10.0,
    champ_err: int = 0,
    chall_err: int = 0,
    labelled: int = 0,
    champ_ok: int = 0,
    chall_ok: int = 0,
    chall_n: int | None = None,
) -> CanaryStats:
    return CanaryStats(
        ArmStats("champion", n, champ_err, champ_p99, labelled, champ_ok),
        ArmStats("challenger:risk@1", n if chall_n is None else chall_n, chall_err, chall_p99,
                 labelled, chall_ok),
        window_start=0.0, window_end=600.0, policy_version="routes@x",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("current", "expected"), [(1, 5), (5, 25), (10, 25), (25, 50), (49.99, 50), (50, 100)]
)
def test_promotes_one_step_of_the_ladder(current: float, expected: float) -> None:
    v = decide(POLICY, stats(), current)
    assert (v.action, v.next_weight) == ("promote", expected)
    assert any("accuracy not gating" in r for r in v.reasons)  # no labels: said, not gated
    assert v.final == (expected == POLICY.steps[-1])  # the last step is the champion swap


def test_top_of_the_ladder_and_zero_hold() -> None:
    v = decide(POLICY, stats(chall_p99=999), 100)
    assert (v.action, v.next_weight) == ("hold", 100) and "top step" in v.reasons[0]
    v = decide(POLICY, stats(), 0)
    assert (v.action, v.next_weight) == ("hold", 0)


def test_not_enough_samples_in_either_arm_holds_even_when_it_looks_bad() -> None:
    v = decide(POLICY, stats(chall_n=99, chall_p99=999), 10)
    assert (v.action, v.next_weight) == ("hold", 10)
    assert "not enough data" in v.reasons[0]
    v = decide(POLICY, stats(n=99, chall_n=1000), 10)
    assert v.action == "hold"
    assert decide(POLICY, stats(chall_n=100), 10).action == "promote"  # the edge counts


def test_p99_gate_is_ten_percent_of_the_champion() -> None:
    assert decide(POLICY, stats(champ_p99=10.0, chall_p99=11.0), 25).action == "promote"
    v = decide(POLICY, stats(champ_p99=10.0, chall_p99=11.01), 25)
    assert (v.action, v.next_weight) == ("rollback", 0)
    assert v.reasons[0].startswith("breach: p99")
    slack = PromotionPolicy(min_samples=100, p99_slack_ms=1.0)
    assert decide(slack, stats(champ_p99=10.0, chall_p99=11.9), 25).action == "promote"


def test_error_rate_no_worse_than_the_champion_plus_slack() -> None:
    # champion 1/1000, slack 0.001: the challenger may reach 2/1000, not 3/1000
    assert decide(POLICY, stats(champ_err=1, chall_err=2), 5).action == "promote"
    v = decide(POLICY, stats(champ_err=1, chall_err=3), 5)
    assert (v.action, v.next_weight) == ("rollback", 0)
    assert any(r.startswith("breach: error rate") for r in v.reasons)


def test_accuracy_gates_only_with_enough_labels() -> None:
    # -1 % with 100 labels per arm: breach
    v = decide(POLICY, stats(labelled=100, champ_ok=90, chall_ok=89), 5)
    assert v.action == "rollback" and any("breach: accuracy delta" in r for r in v.reasons)
    # -0.4 %: passes (delta must stay above -0.5 %)
    v = decide(POLICY, stats(labelled=1000, champ_ok=900, chall_ok=896), 5)
    assert v.action == "promote" and any("accuracy delta -0.4000%" in r for r in v.reasons)
    # exactly -0.5 % is a breach (strictly above the floor)
    assert decide(POLICY, stats(labelled=1000, champ_ok=900, chall_ok=895), 5).action == "rollback"
    # a big drop on too few labels does not gate, and the verdict says so
    v = decide(POLICY, stats(labelled=49, champ_ok=49, chall_ok=0), 5)
    assert v.action == "promote" and any("accuracy not gating" in r for r in v.reasons)


def test_several_breaches_are_all_reported() -> None:
    v = decide(POLICY, stats(chall_p99=50, chall_err=500), 50)
    assert v.action == "rollback"
    assert sum(r.startswith("breach:") for r in v.reasons) == 2


def test_policy_validates_its_ladder() -> None:
    with pytest.raises(ValueError, match="ascending"):
        PromotionPolicy(steps=(25, 5))
    with pytest.raises(ValueError, match="ascending"):
        PromotionPolicy(steps=(5, 150))
    assert PromotionPolicy(steps=(10, 100)).next_step(10) == 100


def test_summarise_counts_fallbacks_as_errors_and_not_as_accuracy() -> None:
    entries = [
        {"arm": "champion", "latency_ms": 5.0, "fallback_used": None,
         "output": {"decision": "deny"}},
        {"arm": "challenger:risk@1", "latency_ms": 7.0, "fallback_used": "risk_distilled",
         "output": {"decision": "deny"}},
        {"arm": "challenger:risk@1", "latency_ms": 3.0, "fallback_used": None,
         "output": {"decision": "approve"}},
        {"arm": "segment:eu", "latency_ms": 99.0, "fallback_used": None, "output": {}},
    ]  # fmt: skip
    champ, chall = summarise(entries, ["deny", "deny", "deny", None], "champion",
                             "challenger:risk@1")  # fmt: skip
    assert (champ.count, champ.errors, champ.labelled, champ.correct) == (1, 0, 1, 1)
    assert (chall.count, chall.errors, chall.labelled, chall.correct) == (2, 1, 1, 0)
    assert chall.error_rate == 0.5 and chall.p99_ms == 7.0


def test_p99_is_nearest_rank() -> None:
    assert p99([]) is None
    assert p99([float(i) for i in range(1, 101)]) == 99.0
    assert p99([float(i) for i in range(1, 1001)]) == 990.0


async def test_loop_survives_a_failing_evaluation_and_sleeps_its_interval(tmp_path) -> None:
    from gateway.rollout.controller import RolloutController

    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    # no route file: every evaluation fails (RolloutError), is logged, and the loop goes on
    c = RolloutController(None, None, tmp_path, POLICY, tmp_path / "rec")  # type: ignore[arg-type]
    released: list[str] = []

    async def release(model: str) -> None:  # no Redis here: the lease is never taken
        released.append(model)

    c.release = release  # type: ignore[method-assign]
    await c.run("risk", 60.0, sleep=sleep, iterations=3)
    assert released == ["risk"]  # given up on the way out
    assert slept == [60.0, 60.0]
    assert not (tmp_path / "rec").exists()  # nothing decided, nothing recorded


def test_status_shows_no_gates_for_a_challenger_at_zero() -> None:
    """After the swap (or a rollback) the challenger at 0 % is a rollback target: the status
    says so instead of judging it (it once showed "[FAIL] samples ... now: hold -> 0 %")."""
    from gateway.rollout.status import render_text

    gate = {"gate": "samples", "ok": False, "value": "0 / 75", "threshold": ">= 100 each"}
    view = {
        "model": "risk", "stage": "promoted: risk@3 is the champion; rollback target at 0 %",
        "champion": "risk@3", "challenger": "risk@2", "route_file": "risk.yaml",
        "policy_version": "routes@1", "lease": None, "edited_outside_controller": False,
        "weight": 0.0, "window_s": 45.0, "gates": [gate], "history": [],
        "verdict": {"action": "hold", "next_weight": 0.0, "final": False, "reasons": []},
    }  # fmt: skip
    text = render_text(view)
    assert "no canary: the challenger is at 0 %" in text
    assert "[FAIL]" not in text and "now:" not in text
    canary = render_text({**view, "weight": 25.0})
    assert "[FAIL] samples" in canary and "now: hold -> 0 %" in canary
    assert "no canary" not in canary
