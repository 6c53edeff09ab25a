"""Drift tracking: sampled live histograms against the training quantile bins, and their PSI."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import build_app
from gateway.cli import main
from gateway.cli.drift import parse, render
from gateway.clock import FakeClock
from gateway.drift.exporter import DriftExporter
from gateway.drift.reference import Reference, reference_from_manifest
from gateway.drift.tracker import DriftPolicy, DriftTracker, psi
from gateway.metrics import Metrics
from gateway.registry.histograms import quantile_histograms, score_histogram
from tests.unit.fakes import FEATURES, toy_backend, write_repo

TRAIN = np.random.default_rng(7).normal(size=(5000, 3))


def manifest(score: bool = True) -> dict:
    hist = quantile_histograms(TRAIN, FEATURES, bins=10)
    if score:  # the holdout score distribution, same shape as a feature's
        hist["score"] = score_histogram(1 / (1 + np.exp(-TRAIN.sum(axis=1))))
    return {"input_schema": {"features": FEATURES}, "histograms": hist}


def tracker(clock: FakeClock, rate: float = 1.0, ref: Reference | None = None) -> DriftTracker:
    policy = DriftPolicy(sample_rate=rate, window_s=60, bucket_s=10, min_rows=200)
    reference = ref or reference_from_manifest(manifest())
    return DriftTracker(policy, lambda m, v: reference, clock, random.Random(3))


def feed(t: DriftTracker, rows: np.ndarray) -> None:
    for row in rows:
        t.observe("toy", "2", row, float(1 / (1 + np.exp(-row.sum()))))


def live(n: int, shift_b: float = 0.0, seed: int = 11) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32)
    x[:, 1] += shift_b
    return x


def test_one_shifted_feature_raises_its_psi_and_only_its() -> None:
    t = tracker(FakeClock())
    feed(t, live(3000, shift_b=1.0))
    (r,) = t.snapshot()
    assert (r.model, r.version, r.rows) == ("toy", "2", 3000)
    assert r.features["b"] > 0.2
    assert r.features["a"] < 0.05 and r.features["c"] < 0.05
    assert r.score is not None and r.score > 0.05  # the score moves with b


def test_unshifted_inputs_stay_low_and_match_a_direct_psi() -> None:
    t = tracker(FakeClock())
    rows = live(3000)
    feed(t, rows)
    (r,) = t.snapshot()
    assert max(r.features.values()) < 0.05 and r.score is not None and r.score < 0.05
    h = manifest()["histograms"]["features"]["a"]
    edges = np.asarray(h["edges"])
    clipped = np.clip(rows[:, 0], edges[0], edges[-1])  # outer bins take the outliers
    counts, _ = np.histogram(clipped, bins=edges)
    assert r.features["a"] == pytest.approx(psi(counts, h["counts"]), rel=1e-6)


def test_the_window_slides_old_rows_out() -> None:
    clock = FakeClock(1000.0)
    t = tracker(clock)
    feed(t, live(1000, shift_b=2.0))
    assert t.snapshot()[0].features["b"] > 0.2
    clock.advance(30)
    feed(t, live(1000, seed=12))  # still in the window: both halves count
    assert t.snapshot()[0].rows == 2000
    clock.advance(40)  # the shifted rows' bucket is now older than window_s
    feed(t, live(1000, seed=13))
    (r,) = t.snapshot()
    assert r.rows == 2000 and r.features["b"] < 0.05
    clock.advance(120)
    assert t.snapshot() == []  # an empty window exports nothing


def test_sampling_counts_about_the_configured_share() -> None:
    t = tracker(FakeClock(), rate=0.25)
    feed(t, live(4000))
    (r,) = t.snapshot()
    assert 850 < r.rows < 1150


def test_one_row_tensors_are_sampled_like_single_predictions() -> None:
    """/v2 sends one row per tensor: one draw each, and its score, as observe() keeps them."""
    rows = live(4000)
    scores = 1 / (1 + np.exp(-rows.sum(axis=1)))
    by_rows, by_one = tracker(FakeClock(), rate=0.25), tracker(FakeClock(), rate=0.25)
    draws = 0
    rand = by_rows.rand

    def counted() -> float:
        nonlocal draws
        draws += 1
        return rand()

    by_rows.rand = counted
    for r, s in zip(rows, scores, strict=True):
        by_rows.observe_rows("toy", "2", r[np.newaxis], np.array([s], dtype=np.float32))
        by_one.observe("toy", "2", r, float(np.float32(s)))
    assert draws == len(rows)
    (a,), (b,) = by_rows.snapshot(), by_one.snapshot()
    assert 850 < a.rows < 1150 and a.rows == b.rows  # the same rows kept, same seed
    assert a.features == b.features and a.score == b.score


def test_a_version_without_histograms_is_not_tracked() -> None:
    calls = []

    def refs(model: str, version: str) -> None:
        calls.append((model, version))

    t = DriftTracker(DriftPolicy(sample_rate=1.0), refs, FakeClock())
    feed(t, live(10))
    assert t.snapshot() == [] and calls == [("toy", "2")]  # looked up once, remembered


def test_no_score_reference_gives_feature_drift_only() -> None:
    t = tracker(FakeClock(), ref=reference_from_manifest(manifest(score=False)))
    feed(t, live(500))
    (r,) = t.snapshot()
    assert r.score is None and set(r.features) == set(FEATURES)


def test_exporter_sets_gauges_and_drops_them_when_the_window_empties() -> None:
    clock = FakeClock(1000.0)
    t = tracker(clock)
    metrics = Metrics()
    exporter = DriftExporter(t, metrics)
    feed(t, live(300, shift_b=1.0))
    exporter.export()
    text = metrics.render().decode()
    psi_of = {dict(k)["feature"]: v for k, v in gauges(text, "feature_drift_psi").items()}
    assert psi_of["b"] > 0.2 and len(psi_of) == 3
    assert list(gauges(text, "drift_window_rows").values()) == [300.0]
    assert len(gauges(text, "prediction_drift_psi")) == 1
    clock.advance(120)  # every bucket has left the window
    exporter.export()
    text = metrics.render().decode()
    assert not gauges(text, "feature_drift_psi") and not gauges(text, "drift_window_rows")
    assert not gauges(text, "prediction_drift_psi")


# -- through the real app -------------------------------------------------------------------


def gauges(text: str, name: str) -> dict[tuple[str, ...], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture
async def app_client(tmp_path: Path, aiohttp_client) -> TestClient:
    settings = write_repo(tmp_path)
    path = tmp_path / "model_repository" / "toy" / "2" / "manifest.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "histograms": manifest()["histograms"]}))
    policy = DriftPolicy(sample_rate=1.0, window_s=60, bucket_s=5, min_rows=200,
                         update_interval_s=0.05)  # fmt: skip
    app = build_app(dataclasses.replace(settings, drift=policy), backend=toy_backend())
    return await aiohttp_client(app)


async def test_shifted_live_inputs_raise_feature_drift_psi_on_metrics(
    app_client: TestClient, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = live(400, shift_b=1.5)
    half = len(rows) // 2
    v1 = [{"model_name": "toy", "features": r.tolist()} for r in rows[:half]]
    resp = await app_client.post("/v1/predict:batch", data=io.BytesIO(json.dumps(v1).encode()))
    assert resp.status == 200, await resp.text()
    v2 = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [half, 3],
                      "data": rows[half:].ravel().tolist()}]}  # fmt: skip
    resp = await app_client.post("/v2/models/toy/infer", json=v2)
    assert resp.status == 200, await resp.text()
    deadline = time.monotonic() + 10
    while True:  # the exporter runs every 50 ms; poll /metrics until it has
        text = await (await app_client.get("/metrics")).text()
        psi_of = {dict(k)["feature"]: v for k, v in gauges(text, "feature_drift_psi").items()}
        if 400.0 in gauges(text, "drift_window_rows").values() or time.monotonic() > deadline:
            break  # both requests' rows are in an export
        await asyncio.sleep(0.05)
    assert set(psi_of) == set(FEATURES), text
    assert psi_of["b"] > 0.2 and psi_of["a"] < 0.1 and psi_of["c"] < 0.1
    rows_seen = gauges(text, "drift_window_rows")
    assert list(rows_seen.values()) == [400.0]  # /v1 and /v2 rows both counted
    (key,) = gauges(text, "prediction_drift_psi")
    assert dict(key) == {"model": "toy", "version": "2"}

    # `drift report` reads the same /metrics and ranks b first
    capsys.readouterr()
    url = str(app_client.make_url("")).rstrip("/")
    code = await asyncio.to_thread(main, ["drift", "report", "--model", "toy", "--url", url])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and lines[0].startswith("toy/2: 400 sampled rows in the window"), lines
    first = lines[2].split()
    assert first[0] == "b" and float(first[1]) > 0.2 and first[2] in ("warn", "PAGE")


def test_drift_report_ranks_and_levels_from_an_exposition() -> None:
    text = "\n".join([
        'feature_drift_psi{model="risk",version="2",feature="x"} 0.3',
        'feature_drift_psi{model="risk",version="2",feature="y"} 0.21',
        'feature_drift_psi{model="risk",version="2",feature="z"} 0.01',
        'feature_drift_psi{model="other",version="1",feature="x"} 0.9',
        'drift_window_rows{model="risk",version="2"} 1200',
    ]) + "\n"  # fmt: skip
    data = parse(text, "risk", None)
    assert set(data) == {"2"} and data["2"]["rows"] == 1200
    out = render("risk", data, top=2).splitlines()
    assert [ln.split()[::2] for ln in out[2:4]] == [["x", "PAGE"], ["y", "warn"]]
    assert "score PSI n/a" in out[0]
    assert "no drift measured" in render("risk", parse(text, "risk", "9"), top=2)


def test_shipped_versions_have_a_score_reference_beside_their_immutable_manifests(
    repo_root: Path, tmp_path: Path
) -> None:
    import shutil

    from gateway.drift.reference import load_reference

    shipped = repo_root / "model_repository"
    for model, version in (("risk", "1"), ("risk", "2"), ("risk_distilled", "1"), ("digits", "1")):
        manifest = json.loads((shipped / model / version / "manifest.json").read_text())
        assert "score" not in manifest["histograms"]  # published before score histograms
        ref = load_reference(shipped, model, version)
        assert ref is not None and ref.score_expected is not None, (model, version)
        assert ref.score_expected.sum() == pytest.approx(1.0)
    # a sidecar written for other content is ignored: no reference rather than a wrong one
    repo = tmp_path / "repo"
    shutil.copytree(shipped / "risk", repo / "risk")
    sidecar = repo / "risk" / "score_reference" / "2.json"
    doc = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**doc, "digest": "sha256:" + "0" * 64}))
    stale = load_reference(repo, "risk", "2")
    assert stale is not None and stale.score_expected is None and stale.expected.shape[0] == 30
