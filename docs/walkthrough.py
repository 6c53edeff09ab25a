"""The README's model-lifecycle walkthrough, run step by step with the project's own commands.

    .venv/bin/python docs/walkthrough.py            # against `make run` (another shell)
    .venv/bin/python docs/walkthrough.py --start    # its own stack on free ports, on copies
    make walkthrough                                # the same as --start

1. Train a new `risk` candidate, publish it, validate it on the live tritonserver.
2. Route 5 % of entities to it: the gateway's gate checks the report, loads the version into
   Triton (READY means warm: the model's `model_warmup` ran) and probes it before any traffic.
3. Labelled traffic (`python -m loadtest.traffic --labels`) and the rollout controller
   (`promote --interval`): 5 -> 25 -> 50 %, then the champion swap; the old champion stays as the
   weight-0 rollback target. `rollout status` and `rollout report` show how it went.
4. A worse candidate: `models validate` fails it, and `routes set-weight` refuses it.
5. Shifted inputs (`--shift mean_radius=1.8`): `drift report` names the feature, and the
   shipped alert rule FeatureDriftSevere fires in a Prometheus scraping the gateway.

Without `--start` it acts on the repository itself, as a user would: the new versions land in
`model_repository/risk/`, the route edits in `configs/routes/risk.yaml` (`git checkout
configs/routes` and deleting the new version folders undo it). With `--start` everything happens
on copies in a temporary directory, and the prediction-log stream has a name of its own.

The controller runs with a demo policy so that a rollout takes a minute instead of hours; the
production policy is `rollout.policy` in configs/gateway.yaml. The demo keeps the p99, error
rate and step gates, with slack for a laptop that also runs both tritonservers and the load
generator (a p99 of 100 answers is its second-slowest answer), and leaves accuracy to the
report and `labels join`: with a few hundred labels per arm, the accuracy delta's noise
(about +-1 %) is wider than its 0.5 % gate. Prometheus gets the shipped rules with the drift
alerts' `for: 15m` shortened to 30 s. Needs Redis at redis.url and, for step 5's alert,
Debian's `prometheus` (without it, step 5 stops at `drift report`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import stack  # docs/stack.py: the `make run` stack on free ports
from stack import ROOT, free_ports, get_json, wait_until

PNG = ROOT / "docs" / "images" / "rollout-report.png"
DEMO_POLICY = {
    "SWITCHYARD__ROLLOUT__POLICY__WINDOW_S": "45",
    "SWITCHYARD__ROLLOUT__POLICY__MIN_SAMPLES": "100",
    "SWITCHYARD__ROLLOUT__POLICY__P99_SLACK_MS": "50",
    "SWITCHYARD__ROLLOUT__POLICY__ERROR_RATE_SLACK": "0.01",
    "SWITCHYARD__ROLLOUT__POLICY__MIN_LABELS": "100000",
}


class Step(Exception):
    """A walkthrough step did not do what the README says it does."""


def _argv(cmd: tuple[str, ...]) -> list[str]:
    """A command as the README writes it (`python ...`) run with this interpreter."""
    return [sys.executable, *cmd[1:]] if cmd[0] == "python" else list(cmd)


class Walk:
    def __init__(self, env: dict[str, str], url: str, routes: Path) -> None:
        self.env, self.url, self.routes = env, url, routes
        self.background: list[subprocess.Popen[bytes]] = []

    def say(self, text: str) -> None:
        print(f"\n## {text}", flush=True)

    def run(self, *cmd: str, expect: int | None = 0, env: dict[str, str] | None = None) -> str:
        """Run one command as the README shows it; echo it and its output."""
        shown = " ".join(cmd)
        print(f"$ {shown}", flush=True)
        done = subprocess.run(
            _argv(cmd), cwd=ROOT, env=env or self.env, capture_output=True, text=True, timeout=300
        )
        out = (done.stdout + done.stderr).rstrip()
        if out:
            print("\n".join(f"    {line}" for line in out.splitlines()), flush=True)
        if expect is not None and done.returncode != expect:
            raise Step(f"`{shown}` exited {done.returncode}, expected {expect}")
        if expect is None and done.returncode == 0:
            raise Step(f"`{shown}` succeeded; the walkthrough expects a refusal")
        return done.stdout

    def start(self, *cmd: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        print(f"$ {' '.join(cmd)} &", flush=True)
        proc = subprocess.Popen(
            _argv(cmd), cwd=ROOT, env=env or self.env, stdout=subprocess.DEVNULL, stderr=sys.stderr
        )
        self.background.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def route(self) -> dict[str, Any]:
        import yaml

        return yaml.safe_load((self.routes / "risk.yaml").read_text())

    def live_targets(self) -> set[str]:
        doc = get_json(f"{self.url}/admin/routes") or {}
        route = (doc.get("routes") or {}).get("risk") or {}
        return {a["target"] for a in route.get("arms", []) if a.get("weight", 0) > 0}

    def publish(self, artifact: Path, run_id: str) -> str:
        out = self.run("python", "-m", "gateway", "models", "publish", str(artifact),
                       "--model", "risk", "--run-id", run_id)  # fmt: skip
        m = re.search(r"published risk/(\d+)", out)
        if m is None:
            raise Step("publish did not publish a new version")
        return m.group(1)


def lifecycle(w: Walk, work: Path, triton_grpc: str, png: Path, rate: float) -> str:
    w.say("1. Train a candidate, publish it, validate it on the live tritonserver")
    good = work / "candidate-good"
    w.run("python", "model_repository/train.py", "--candidate", str(good), "--risk-c", "0.5")
    v = w.publish(good, "walkthrough-c0.5")
    w.run("python", "-m", "gateway", "models", "publish", str(good), "--model", "risk")
    w.run("python", "-m", "gateway", "models", "validate", "--model", "risk", "--version", v,
          "--triton-url", triton_grpc)  # fmt: skip

    w.say(f"2. Canary: 5 % of entities to risk@{v}; the gate, the load (warm-up) and the probe")
    w.run("python", "-m", "gateway", "routes", "set-weight", "risk", "--version", "1",
          "--weight", "0")  # fmt: skip  # one canary at a time: the shipped v1 canary stops
    w.run("python", "-m", "gateway", "routes", "set-weight", "risk", "--version", v,
          "--weight", "5")  # fmt: skip
    wait_until(lambda: f"risk@{v}" in w.live_targets(), 120, f"risk@{v} in the live table")
    print(f"    live: {sorted(w.live_targets())}  (GET /admin/routes)")
    w.run("python", "-m", "gateway", "models", "list", "--model", "risk")

    w.say("3. Labelled traffic and the controller: 5 -> 25 -> 50 -> champion")
    since = time.time()  # the report covers this rollout, not what the stream held before
    traffic = w.start("python", "-m", "loadtest.traffic", "--gateway", w.url, "--rate",
                      f"{rate:g}", "--labels", "--report-s", "15")  # fmt: skip
    demo = {**w.env, **DEMO_POLICY}
    print(
        "    (the controller below runs with the demo policy: "
        + " ".join(f"{k.rsplit('__', 1)[1].lower()}={val}" for k, val in DEMO_POLICY.items())
        + ")"
    )
    promote = w.start("python", "-m", "gateway", "promote", "risk", "--interval", "5", env=demo)
    champion = lambda: w.route()["champion"]["version"] == v  # noqa: E731
    wait_until(champion, 420, f"risk@{v} to become the champion")
    w.stop(promote)
    print(f"    champion: risk@{v}; challengers: {w.route().get('challengers')}")
    w.run("python", "-m", "gateway", "rollout", "status", "--model", "risk", env=demo)
    w.run("python", "-m", "gateway", "labels", "join")
    png.parent.mkdir(parents=True, exist_ok=True)
    w.run("python", "-m", "gateway", "rollout", "report", "--model", "risk", "--out",
          str(work / "report.html"), "--png", str(png),
          "--since-s", f"{time.time() - since + 10:.0f}")  # fmt: skip
    w.stop(traffic)

    w.say("4. A worse candidate: the gate refuses it")
    bad = work / "candidate-bad"
    w.run("python", "model_repository/train.py", "--candidate", str(bad), "--risk-c", "0.01")
    b = w.publish(bad, "walkthrough-c0.01")
    w.run("python", "-m", "gateway", "models", "validate", "--model", "risk", "--version", b,
          "--triton-url", triton_grpc, expect=1)  # fmt: skip
    w.run("python", "-m", "gateway", "routes", "set-weight", "risk", "--version", b,
          "--weight", "5", expect=None)  # fmt: skip
    if f"risk@{b}" in w.live_targets():
        raise Step(f"risk@{b} is live although it was refused")
    return v


def drift(w: Walk, v: str, rate: float, prometheus: str | None) -> None:
    w.say("5. Shifted inputs: the drift report and the FeatureDriftSevere alert")
    shifted = w.start("python", "-m", "loadtest.traffic", "--gateway", w.url, "--rate",
                      f"{rate:g}", "--shift", "mean_radius=1.8", "--report-s", "15")  # fmt: skip

    def report_shows() -> bool:
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "drift", "report", "--model", "risk", "--version",
             v, "--url", w.url], cwd=ROOT, env=w.env, capture_output=True, text=True,
        ).stdout  # fmt: skip
        m = re.search(r"mean_radius\s+([0-9.]+)", out)
        rows = re.search(r"(\d+) sampled rows", out)
        # a few hundred rows: below that, PSI's sampling noise alone reaches ~0.1-0.2
        return m and rows and float(m.group(1)) > 0.25 and int(rows.group(1)) >= 300

    wait_until(report_shows, 300, "mean_radius PSI > 0.25 in `drift report`")
    out = w.run("python", "-m", "gateway", "drift", "report", "--model", "risk", "--version", v,
                "--url", w.url)  # fmt: skip
    others = [float(p) for f, p in re.findall(r"^\s+(\w+)\s+([0-9.]+)\s+\w+$", out, re.M)
              if f != "mean_radius"]  # fmt: skip
    if not others or max(others) >= 0.2:
        raise Step(f"an unshifted feature drifts too: {max(others, default=None)}")
    print(f"    unshifted features: PSI at most {max(others):.3f}")
    if prometheus is not None:

        def firing() -> list[dict[str, Any]]:
            doc = get_json(f"{prometheus}/api/v1/alerts") or {}
            alerts = (doc.get("data") or {}).get("alerts", [])
            return [
                a for a in alerts
                if a["labels"].get("alertname") == "FeatureDriftSevere"
                and a.get("state") == "firing" and a["labels"].get("feature") == "mean_radius"
            ]  # fmt: skip

        alerts = wait_until(firing, 240, "FeatureDriftSevere firing in Prometheus")
        print(f"$ curl -s {prometheus}/api/v1/alerts")
        for a in alerts:
            labels = {k: a["labels"][k] for k in ("alertname", "severity", "model", "version",
                                                  "feature")}  # fmt: skip
            print(f"    {a['state']}: {labels} runbook={a['annotations'].get('runbook_url')}")
    w.stop(shifted)


def start_prometheus(work: Path, gateway_hostport: str) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("prometheus")
    assert binary is not None
    rules = (ROOT / "configs/prometheus/rules.yml").read_text()
    group = rules.index("- name: switchyard-drift")
    rules = rules[:group] + rules[group:].replace("for: 15m", "for: 30s")
    (work / "prometheus").mkdir()
    (work / "prometheus/rules.yml").write_text(rules)
    (work / "prometheus/prometheus.yml").write_text(
        "global: {scrape_interval: 5s, evaluation_interval: 5s}\n"
        "rule_files: [rules.yml]\n"
        "scrape_configs:\n"
        f"  - {{job_name: gateway, static_configs: [{{targets: ['{gateway_hostport}']}}]}}\n"
    )
    (port,) = free_ports(1)
    proc = subprocess.Popen(
        [binary, f"--config.file={work / 'prometheus/prometheus.yml'}",
         f"--storage.tsdb.path={work / 'prometheus/data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(work / "prometheus.log").open("wb"),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: get_json(f"{url}/api/v1/status/buildinfo"), 60, "prometheus")
    print(f"$ prometheus --config.file=... (the shipped rules, scraping {gateway_hostport}) &")
    return proc, url


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--start", action="store_true", help="own stack on free ports, on copies")
    ap.add_argument("--gateway", default="http://127.0.0.1:8080", help="without --start")
    ap.add_argument("--triton-grpc", default="127.0.0.1:8001", help="without --start")
    ap.add_argument("--png", type=Path, default=PNG, help="the rollout report picture")
    ap.add_argument("--rate", type=float, default=60.0, help="traffic, requests per second")
    ap.add_argument("--no-prometheus", action="store_true", help="skip the alert in step 5")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="switchyard-walkthrough-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen[bytes]] = []
    stacks: list[stack.Stack] = []
    redis_keys: str | None = None
    try:
        if args.start:
            print("$ python -m gateway up ... &   (as make run, on free ports, on copies)")
            own = stack.start(work, env, "walkthrough", copy_models=True)
            stacks.append(own)
            url, triton_grpc, redis_keys = own.url, own.triton_grpc, own.prefix
            routes = Path(env["SWITCHYARD__ROUTING__ROUTES_DIR"])
        else:
            url, triton_grpc = args.gateway.rstrip("/"), args.triton_grpc
            routes = ROOT / "configs/routes"
            if get_json(f"{url}/readyz") is None:
                raise Step(f"no gateway at {url}: start `make run` first, or pass --start")
        prometheus = None
        if not args.no_prometheus and shutil.which("prometheus"):
            prom, prometheus = start_prometheus(work, urllib.parse.urlsplit(url).netloc)
            procs.append(prom)
        walk = Walk(env, url, routes)
        try:
            v = lifecycle(walk, work, triton_grpc, args.png, args.rate)
            drift(walk, v, args.rate, prometheus)
        finally:
            for proc in walk.background:
                walk.stop(proc)
        print("\nwalkthrough: every step did what the README says")
        return 0
    except (Step, TimeoutError) as exc:
        print(f"\nwalkthrough FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
        for own in stacks:
            own.stop()
        if redis_keys is not None:
            stack.drop_keys(env, redis_keys)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
