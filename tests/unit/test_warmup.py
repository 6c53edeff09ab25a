"""Warm-up generated from golden inputs: the shipped configs carry it, publish adds it to a
model without one, and the files are the golden rows in Triton's raw format."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from gateway.registry.publish import publish
from tests.registry_artifacts import MODEL_REPOSITORY, model_repo, risk_artifact

MODELS = ("risk", "risk_distilled", "digits")


def _samples(config: str) -> list[tuple[str, int, str]]:
    return re.findall(
        r'name: "(\w+)"\s+batch_size: (\d+)\s+inputs \{\s+key: "features"'
        r'.*?input_data_file: "(\w+)"',
        config,
        re.DOTALL,
    )


@pytest.mark.parametrize("model", MODELS)
def test_shipped_configs_warm_up_with_the_latest_versions_golden_inputs(model: str) -> None:
    mdir = MODEL_REPOSITORY / model
    latest = max((p for p in mdir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    manifest = json.loads((latest / "manifest.json").read_text())
    cases = manifest["golden"]["cases"]
    samples = _samples((mdir / "config.pbtxt").read_text())
    assert [s[2] for s in samples[: len(cases)]] == [f"golden_{i}" for i in range(len(cases))]
    assert samples[-1] == ("golden_batch_128", "128", "golden_0")  # the batched path too
    n = len(manifest["input_schema"]["features"])
    for i, case in enumerate(cases):
        raw = np.frombuffer((mdir / "warmup" / f"golden_{i}").read_bytes(), dtype="<f4")
        assert raw.shape == (n,) and raw.tolist() == np.float32(case["features"]).tolist()


def test_publish_adds_warmup_to_a_model_without_one(tmp_path: Path) -> None:
    repo = model_repo(tmp_path)
    config = repo / "risk" / "config.pbtxt"
    bare = config.read_text().split("model_warmup")[0]
    config.write_text(bare)
    for f in (repo / "risk" / "warmup").iterdir():
        f.unlink()
    done = publish(repo, "risk", risk_artifact(tmp_path / "art", c=0.5))
    text = config.read_text()
    assert text.startswith(bare) and len(_samples(text)) == 9
    cases = json.loads((done.path / "manifest.json").read_text())["golden"]["cases"]
    raw = np.frombuffer((repo / "risk" / "warmup" / "golden_3").read_bytes(), dtype="<f4")
    assert raw.tolist() == np.float32(cases[3]["features"]).tolist()
    # a model that has warm-up keeps it: the next publish leaves config and files alone
    before = (text, (repo / "risk" / "warmup" / "golden_0").read_bytes())
    publish(repo, "risk", risk_artifact(tmp_path / "art2", c=2.0))
    assert (config.read_text(), (repo / "risk" / "warmup" / "golden_0").read_bytes()) == before
