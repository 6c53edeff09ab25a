"""`python -m gateway drift report --model risk`: the features that drift most, now.

It reads a running gateway's /metrics (`feature_drift_psi`, `prediction_drift_psi`,
`drift_window_rows`), not the prediction log: the gateway already holds the sampled
histograms of every row it served, while the log keeps full payloads only for a sample
(`predlog.payload_sample_rate`) and redacts PII fields, so rebuilding histograms from it would
count fewer rows and miss redacted features. The numbers printed are exactly what the alert
rules see. Under `serve --workers N` /metrics already folds the workers (the most drifted).

Exit codes: 0 printed (even when nothing is measured yet), 1 the gateway is unreachable or
answered an error, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

WARN, PAGE = 0.2, 0.25  # the alert rules' thresholds (configs/prometheus/rules.yml)
_NAMES = {"feature_drift_psi", "prediction_drift_psi", "drift_window_rows"}


def add_drift_parser(sub: Any) -> None:
    drift = sub.add_parser("drift", help="drift of live inputs against the training data")
    dsub = drift.add_subparsers(dest="drift_command", required=True, metavar="ACTION")
    p = dsub.add_parser("report", help="the features that drift most (from a gateway's /metrics)")
    p.add_argument("--model", required=True, help="model (the target's name, e.g. risk)")
    p.add_argument("--version", default=None, help="only this version (default: every one)")
    p.add_argument("--top", type=int, default=10, help="features shown per version")
    p.add_argument("--url", default=None, help="gateway base URL (default: server.host/port)")
    p.add_argument("--api-key", default=None, help="admin key, when auth.protect_metrics is on")
    p.add_argument("--config", type=Path, default=Path("configs/gateway.yaml"))
    p.set_defaults(handler=cmd_report)


def level(psi: float) -> str:
    return "PAGE" if psi > PAGE else ("warn" if psi > WARN else "ok")


def parse(text: str, model: str, version: str | None) -> dict[str, dict[str, Any]]:
    """Per version: features (name -> PSI), score PSI, rows in the window."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, Any]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            lb = s.labels
            if s.name not in _NAMES or lb.get("model") != model:
                continue
            if version is not None and lb.get("version") != version:
                continue
            v = out.setdefault(lb["version"], {"features": {}, "score": None, "rows": None})
            if s.name == "feature_drift_psi":
                v["features"][lb["feature"]] = max(s.value, v["features"].get(lb["feature"], 0))
            elif s.name == "prediction_drift_psi":
                v["score"] = s.value
            elif s.name == "drift_window_rows":
                v["rows"] = (v["rows"] or 0) + s.value
    return out


def render(model: str, data: dict[str, dict[str, Any]], top: int) -> str:
    if not data:
        return (f"{model}: no drift measured (no sampled traffic in the window yet, fewer "
                "rows than drift.min_rows, or no training histograms in the manifest)")  # fmt: skip
    lines = []
    for version in sorted(data, key=lambda v: (len(v), v)):
        d = data[version]
        rows = "?" if d["rows"] is None else f"{d['rows']:g}"
        score = "n/a (no holdout score histogram)" if d["score"] is None else (
            f"{d['score']:.3f} {level(d['score'])}")  # fmt: skip
        lines.append(f"{model}/{version}: {rows} sampled rows in the window; score PSI {score}")
        ranked = sorted(d["features"].items(), key=lambda kv: (-kv[1], kv[0]))[:top]
        width = max((len(f) for f, _ in ranked), default=7)
        lines.append(f"  {'feature':<{width}}  {'PSI':>7}  level")
        lines += [f"  {f:<{width}}  {p:7.3f}  {level(p)}" for f, p in ranked]
    lines.append(f"(warn above {WARN}, page above {PAGE}; PSI against the training histograms)")
    return "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> int:
    from gateway.config import ConfigError, load_settings

    if args.top < 1:
        print("error: --top must be at least 1", file=sys.stderr)
        return 2
    url = args.url
    if url is None:
        try:
            s = load_settings(args.config if args.config.exists() else None).server
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        host = "127.0.0.1" if s.host in ("0.0.0.0", "") else s.host
        url = f"http://{host}:{s.port}"
    req = urllib.request.Request(url.rstrip("/") + "/metrics")
    if args.api_key:
        req.add_header("Authorization", f"Bearer {args.api_key}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            text = resp.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        print(f"error: {url}/metrics: {exc}", file=sys.stderr)
        return 1
    print(render(args.model, parse(text, args.model, args.version), args.top))
    return 0
