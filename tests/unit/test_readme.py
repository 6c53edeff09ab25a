"""The README's examples are real: its route file validates against the shipped models, and the
request it curls is accepted by the schema of the model it names."""

from __future__ import annotations

import json
import re
from pathlib import Path

from gateway.catalog import ModelCatalog
from gateway.routing.table import load_route_table

ROOT = Path(__file__).resolve().parents[2]


def yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_route_example_validates(tmp_path: Path) -> None:
    (block,) = yaml_blocks()
    (tmp_path / "risk.yaml").write_text(block)
    catalog = ModelCatalog.load(ROOT / "model_repository")
    route = load_route_table(tmp_path, catalog).get("risk")
    assert str(route.champion) == "risk@2"
    assert route.fallback.target is not None and route.fallback.target.model == "risk_distilled"


def test_readme_curl_example_is_a_valid_request() -> None:
    assert "-d @configs/examples/predict-risk.json" in (ROOT / "README.md").read_text()
    body = json.loads((ROOT / "configs/examples/predict-risk.json").read_text())
    catalog = ModelCatalog.load(ROOT / "model_repository")
    row = catalog.schema("risk", "2").vectorize(body["features"])
    assert row.shape == (30,)
