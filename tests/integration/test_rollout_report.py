"""`python -m gateway rollout report` against real Redis (db 15): prediction-log entries in the
real stream encoding for two arms, labels in the real label store, controller records in a
JSONL file; the command writes one self-contained HTML page and a PNG."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from matplotlib.image import imread

from gateway.cli import main
from gateway.predlog.feedback import LabelStore
from gateway.predlog.redis_stream import StreamWriter
from gateway.rollout.report import COMBINED_SIZE, DPI, PANEL_SIZE, PANELS
from tests.conftest import REDIS_URL, reachable_redis

REPO = Path(__file__).resolve().parents[2]
T0 = 1_764_590_400.0
CHALLENGER = "challenger:risk@1"


@pytest.fixture
def redis_url() -> str:
    """The test Redis, not flushed: this test's keys carry a prefix of their own and are
    deleted by `prefixes`, so other tests' data in the same database is left alone."""
    reachable_redis().close()
    return REDIS_URL


@pytest.fixture
def prefixes(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """A stream and label prefix of this test only, set for the command through the env."""
    import redis

    tag = f"test-report-{uuid.uuid4().hex[:8]}"
    stream, label = f"{tag}:predictions", f"{tag}:label"
    monkeypatch.setenv("SWITCHYARD__PREDLOG__STREAM_PREFIX", stream)
    monkeypatch.setenv("SWITCHYARD__FEEDBACK__LABEL_PREFIX", label)
    yield stream, label
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{tag}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def entry(i: int, arm: str, ts: float, latency_ms: float, fallback: str | None) -> dict[str, Any]:
    return {
        "request_id": f"{arm}-{i}", "entity_id": f"user-{i}", "model": "risk", "target": "risk",
        "version": "2" if arm == "champion" else "1", "policy_version": "routes@test",
        "arm": arm, "input_hash": f"h{i}",
        "output": {"score": 0.8, "decision": "deny", "confidence": 0.9},
        "fallback_used": fallback, "latency_ms": latency_ms, "ts": ts,
    }  # fmt: skip


def seed(redis_url: str, stream_prefix: str, label_prefix: str) -> None:
    """10 minutes: champion 90 answers, challenger 30; every answer labelled.

    Seeded in a loop of its own: the command under test runs `asyncio.run` itself."""
    asyncio.run(_seed(redis_url, stream_prefix, label_prefix))


async def _seed(redis_url: str, stream_prefix: str, label_prefix: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    entries = [entry(i, "champion", T0 + i * 6.5, 5.0 + i % 7, None) for i in range(90)]
    entries += [
        entry(i, CHALLENGER, T0 + i * 19.5, 9.0 + i % 3, "cache" if i == 0 else None)
        for i in range(30)
    ]
    try:
        assert await StreamWriter(client, prefix=stream_prefix).write(entries) == 120
        labels = LabelStore(client, label_prefix)
        for e in entries:  # challenger right on odd i only: a visible accuracy delta
            right = e["arm"] == "champion" or int(e["request_id"].rsplit("-", 1)[1]) % 2
            await labels.put(e["request_id"], "deny" if right else "approve")
    finally:
        await client.aclose()


def write_records(record_dir: Path) -> None:
    record_dir.mkdir()
    rows = [
        {"ts": T0 + 120, "model": "risk", "action": "hold", "from_weight": 5, "to_weight": 5,
         "applied": False, "dry_run": False, "reasons": ["not enough data"]},
        {"ts": T0 + 300, "model": "risk", "action": "promote", "from_weight": 5,
         "to_weight": 25, "applied": True, "dry_run": False,
         "reasons": ["all gates pass: 5 -> 25 %"]},
    ]  # fmt: skip
    (record_dir / "risk.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_report(redis_url: str, tmp_path: Path, *extra: str) -> int:
    return main(["rollout", "report", "--model", "risk", "--out", str(tmp_path / "report.html"),
                 "--config", str(REPO / "configs/gateway.yaml"), "--redis-url", redis_url,
                 "--record-dir", str(tmp_path / "records"), *extra])  # fmt: skip


def test_report_is_one_self_contained_page_with_every_panel(
    redis_url: str, prefixes: tuple[str, str], tmp_path: Path
) -> None:
    seed(redis_url, *prefixes)
    write_records(tmp_path / "records")
    png = tmp_path / "report.png"
    assert run_report(redis_url, tmp_path, "--png", str(png)) == 0

    page = (tmp_path / "report.html").read_text()
    # self-contained: every src/href is a data: URI; no scripts, stylesheets or frames
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs)
    assert not re.search(r"<(script|link|iframe)\b|url\(|https?://", page)
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(PANELS) == 4
    for b64 in images:
        pixels = imread(io.BytesIO(base64.b64decode(b64)), format="png")
        assert pixels.shape[:2] == (PANEL_SIZE[1] * DPI, PANEL_SIZE[0] * DPI)
    # both arms with their totals (answers, labelled, accuracy %), and both decisions
    assert "<tr><td>champion</td><td>2</td><td>90</td>" in page
    assert f"<tr><td>{CHALLENGER}</td><td>1</td><td>30</td>" in page
    assert "<td>3.333</td><td>29</td><td>51.72</td>" in page  # 1 fallback; 15/29 right (odd i)
    assert page.count("<td>promote</td>") == 1 and page.count("<td>hold</td>") == 1

    combined = imread(str(png))
    assert combined.shape[:2] == (COMBINED_SIZE[1] * DPI, COMBINED_SIZE[0] * DPI)


def test_report_of_a_model_without_answers_fails_clearly(
    redis_url: str,
    prefixes: tuple[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_report(redis_url, tmp_path) == 1
    assert "no prediction-log answers for model 'risk'" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()
