"""configs/prometheus/rules.yml is proven, not just valid: `promtool test rules` feeds the
synthetic series of tests/promtool/*.test.yml and checks each alert fires, and stays quiet,
when it should. The other tests hold the rules to the code they describe: every alert has a
severity and an existing runbook and is tested both ways, the error-ratio rules count exactly
the gateway's server-side error codes, and the latency rules use the routes' SLO bucket."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

import gateway.backends.pool
import gateway.resilience.breaker  # noqa: F401  (defines error subclasses too)
from gateway import errors
from gateway.metrics import LATENCY_BUCKETS
from tests.conftest import REPO_ROOT
from tests.promql import known_names, load_rules, metric_names, promtool

PROMTOOL_TESTS = sorted((REPO_ROOT / "tests/promtool").glob("*.test.yml"))
SEVERITIES = {"page", "ticket", "warn"}
RUNBOOK_SECTIONS = ("## What it means", "## Confirm", "## Mitigate", "## Escalate")


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in load_rules()["groups"] for r in g["rules"] if "alert" in r}


def records() -> dict[str, str]:
    return {r["record"]: r["expr"] for g in load_rules()["groups"] for r in g["rules"]
            if "record" in r}  # fmt: skip


def test_promtool_unit_tests_pass() -> None:
    assert PROMTOOL_TESTS
    done = subprocess.run(
        [promtool(), "test", "rules", *map(str, PROMTOOL_TESTS)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SUCCESS") == len(PROMTOOL_TESTS), done.stdout


def test_promtool_catches_a_wrong_expectation(tmp_path: Path) -> None:
    """The harness can fail: the same series with an alert that should not fire."""
    case = yaml.safe_load((REPO_ROOT / "tests/promtool/components.test.yml").read_text())
    case["rule_files"] = [str(REPO_ROOT / "configs/prometheus/rules.yml")]
    breaker = next(t for t in case["tests"] if any("breaker_state" in s["series"]
                                                   for s in t["input_series"]))  # fmt: skip
    breaker["alert_rule_test"] = [{"eval_time": "3m", "alertname": "BreakerOpen", "exp_alerts": []}]
    case["tests"] = [breaker]
    (tmp_path / "wrong.test.yml").write_text(yaml.safe_dump(case))
    done = subprocess.run([promtool(), "test", "rules", str(tmp_path / "wrong.test.yml")],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode != 0
    assert "BreakerOpen" in done.stdout + done.stderr


@pytest.mark.parametrize("name", sorted(alerts()))
def test_alert_has_severity_text_and_runbook(name: str) -> None:
    rule = alerts()[name]
    assert rule["labels"]["severity"] in SEVERITIES
    notes = rule["annotations"]
    assert notes["summary"] and notes["description"]
    assert notes["runbook_url"] == f"docs/runbooks/{name}.md"
    runbook = REPO_ROOT / notes["runbook_url"]
    assert runbook.is_file(), f"{runbook} missing"
    text = runbook.read_text()
    assert text.startswith(f"# {name}\n")
    for section in RUNBOOK_SECTIONS:
        assert section in text, f"{runbook.name} has no '{section}'"


def test_every_alert_is_tested_firing_and_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in PROMTOOL_TESTS:
        spec = yaml.safe_load(path.read_text())
        for case in spec["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = set(alerts())
    assert names - firing == set(), "never shown firing"
    assert names - quiet == set(), "never shown quiet"
    assert (firing | quiet) - names == set(), "tests name alerts that do not exist"


def test_error_ratio_counts_exactly_the_server_error_codes() -> None:
    def subclasses(cls: type) -> set[type]:
        return {c for s in cls.__subclasses__() for c in {s, *subclasses(s)}}

    server = {errors.SwitchyardError.default_code} | {
        c.default_code for c in subclasses(errors.SwitchyardError)
        if not issubclass(c, errors.ClientError)
    }  # fmt: skip
    ratios = {k: v for k, v in records().items() if k.startswith("model:inference_error_ratio:")}
    assert {k.rsplit(":", 1)[1] for k in ratios} == {f"rate{w}" for w in
                                                      ("5m", "30m", "1h", "6h", "3d")}  # fmt: skip
    for name, expr in ratios.items():
        bad, valid, *_ = re.findall(r'status=~"([^"]+)"', expr)
        assert set(bad.split("|")) == server, name
        assert set(valid.split("|")) == server | {"ok"}, name


def test_latency_rules_use_every_routes_slo_bucket() -> None:
    slow = {k: v for k, v in records().items() if k.startswith("model:inference_slow_ratio:")}
    assert len(slow) == 5
    buckets = {b for expr in slow.values() for b in re.findall(r'le="([^"]+)"', expr)}
    assert len(buckets) == 1
    (le,) = buckets
    assert float(le) in LATENCY_BUCKETS  # the histogram really has that boundary
    routes = sorted((REPO_ROOT / "configs/routes").glob("*.yaml"))
    assert routes
    for path in routes:
        slo = yaml.safe_load(path.read_text())["slo"]
        # one threshold for every route today; a route with its own needs its own rules
        assert slo["p99_ms"] / 1000 == float(le), path.name
        assert slo["error_rate"] == 0.001, path.name  # the budget the burn rates assume


def test_rules_name_only_metrics_that_exist() -> None:
    known = known_names()
    for name, rule in {**alerts(), **records()}.items():
        expr = rule["expr"] if isinstance(rule, dict) else rule
        missing = metric_names(expr) - known
        assert not missing, f"{name}: {missing}"


def test_metric_names_tokenizer() -> None:
    expr = (
        'sum by (model) (rate(a_total{status=~"x|y"}[5m])) / clamp_min(b:c:rate5m, 1e-9)'
        " and on (model) group_left c offset 5m > bool 0.1 or vector(0) unless d[1h:5m]"
    )
    assert metric_names(expr) == {"a_total", "b:c:rate5m", "c", "d"}


def runbook_texts() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((REPO_ROOT / "docs/runbooks").glob("*.md"))}


def test_runbook_commands_are_real() -> None:
    """Every `python -m gateway ...` a runbook tells an operator to run parses with the real
    CLI, and every gateway URL it curls is a route of the app."""
    from gateway.api import admin, feedback, oip
    from gateway.api import routes as v1
    from gateway.cli import build_parser

    parser = build_parser()
    paths = {r.path for table in (v1.routes, oip.routes, admin.routes, feedback.routes)
             for r in table}  # fmt: skip
    commands = 0
    for name, text in runbook_texts().items():
        for line in re.findall(r"python -m gateway ([^`\n#]+)", text):
            try:
                parser.parse_args(shlex.split(line.replace("<", "").replace(">", "")))
            except SystemExit:
                pytest.fail(f"{name}: `python -m gateway {line.strip()}` does not parse")
            commands += 1
        for path in re.findall(r"localhost:8080(/[\w/]*)", text):
            assert path in paths, f"{name}: {path} is no gateway route"
    assert commands >= 20


def test_observability_doc_lists_every_alert_with_its_severity() -> None:
    doc = (REPO_ROOT / "docs/observability.md").read_text()
    for name, rule in alerts().items():
        row = f"| [{name}](runbooks/{name}.md) | {rule['labels']['severity']} |"
        assert row in doc, f"docs/observability.md: no row {row}"


def test_promtool_tests_evaluate_every_group_in_file_order() -> None:
    """Alerts read recording rules of earlier groups; promtool's default order is unspecified,
    which made long-interval tests flaky, so each test file fixes it."""
    groups = [g["name"] for g in load_rules()["groups"]]
    for path in PROMTOOL_TESTS:
        assert yaml.safe_load(path.read_text())["group_eval_order"] == groups, path.name
