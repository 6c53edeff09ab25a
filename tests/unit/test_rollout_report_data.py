"""The rollout report's bucketing: per-arm percentiles, error rate, accuracy delta and share
per time bucket, computed from known answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.rollout.report_data import Answer, Decision, build, nice_bucket, read_decisions

T0 = 1_764_000_000.0  # a multiple of 60: buckets start on it


def answers() -> list[Answer]:
    out = []
    # bucket 0: champion 1..10 ms (one fallback), challenger 20 ms x 5, all labelled
    for i in range(10):
        out.append(Answer(T0 + i, "champion", "2", float(i + 1), i == 9, i < 8 or None))
    for i in range(5):
        out.append(Answer(T0 + 30 + i, "challenger:risk@1", "1", 20.0, False, i < 4))
    # bucket 1 (60 s later): champion only
    out.append(Answer(T0 + 61, "champion", "2", 7.0, False, None))
    return out


def test_buckets_hold_each_arms_figures() -> None:
    data = build("risk", answers(), bucket_s=60)
    assert data.starts == (T0, T0 + 60)
    champ, chall = data.arms  # champion first
    assert (champ.arm, chall.arm) == ("champion", "challenger:risk@1")
    assert champ.count == (10, 1) and chall.count == (5, 0)
    assert champ.p50_ms == (5.0, 7.0) and champ.p99_ms == (10.0, 7.0)
    assert chall.p99_ms == (20.0, None)
    assert champ.error_rate == (0.1, 0.0)
    # champion: 9 non-fallback answers, 8 labelled (True), the 9th has no label
    assert champ.accuracy == (1.0, None)
    assert chall.accuracy == (0.8, None)
    assert data.accuracy_delta(chall) == (pytest.approx(-0.2), None)
    assert champ.share == (10 / 15, 1.0) and chall.share == (5 / 15, 0.0)
    total_champ = data.totals[0]
    assert (total_champ.count, total_champ.labelled, total_champ.versions) == (11, 8, ("2",))


def test_since_drops_older_answers_and_decisions() -> None:
    decisions = [Decision(T0 + 5, "hold", 5, 5, False, False, "not enough data"),
                 Decision(T0 + 65, "promote", 5, 25, True, False, "all gates pass")]  # fmt: skip
    data = build("risk", answers(), decisions, bucket_s=60, since=T0 + 60)
    assert [a.arm for a in data.arms] == ["champion"]
    assert [d.action for d in data.decisions] == ["promote"]


def test_no_answers_is_an_error() -> None:
    with pytest.raises(ValueError, match="no prediction-log answers"):
        build("risk", [])


def test_auto_bucket_is_a_round_width() -> None:
    assert nice_bucket(30 * 60) == 60.0  # 30 minutes -> 40 buckets of 45 s -> 60 s
    assert nice_bucket(0) == 1.0


def test_decision_records_are_read_and_sorted(tmp_path: Path) -> None:
    path = tmp_path / "risk.jsonl"
    path.write_text(
        '{"ts": 20, "action": "promote", "from_weight": 5, "to_weight": 25, "applied": true,'
        ' "dry_run": false, "reasons": ["all gates pass: 5 -> 25 %"]}\n'
        '{"ts": 10, "action": "hold", "from_weight": 5, "to_weight": 5, "applied": false,'
        ' "dry_run": false, "reasons": []}\n'
    )
    got = read_decisions(path)
    assert [(d.ts, d.action, d.reason) for d in got] == [
        (10.0, "hold", ""),
        (20.0, "promote", "all gates pass: 5 -> 25 %"),
    ]
    assert read_decisions(tmp_path / "none.jsonl") == []
    path.write_text('{"ts": 1}\n')
    with pytest.raises(ValueError, match=r"risk\.jsonl:1"):
        read_decisions(path)


def test_the_same_data_draws_the_same_pictures_at_a_fixed_size() -> None:
    import io

    from matplotlib.image import imread

    from gateway.rollout.report import COMBINED_SIZE, DPI, combined_png

    decisions = [Decision(T0 + 40, "rollback", 5, 0, True, False, "breach: p99")]
    data = build("risk", answers(), decisions, bucket_s=60)
    first = combined_png(data)
    assert combined_png(data) == first
    pixels = imread(io.BytesIO(first), format="png")
    assert pixels.shape[:2] == (COMBINED_SIZE[1] * DPI, COMBINED_SIZE[0] * DPI)
