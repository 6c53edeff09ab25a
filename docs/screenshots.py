"""Make the README's status-page screenshot (docs/images/status-page.png) with the project's
own commands: `python -m gateway up` (both tritonservers and the gateway, as `make run`) on free
ports and a copy of configs/routes, `routes set-weight` for a canary step, real traffic, one
`promote --dry-run` evaluation, then headless Chromium's screenshot of GET /admin/ui.

Needs Redis at redis.url (the controller reads the prediction log) and Debian's `chromium`.
Run it as `make screenshots` (or `.venv/bin/python docs/screenshots.py`). The prediction-log
stream it writes has a name of its own and is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import stack  # docs/stack.py: the `make run` stack on free ports
from stack import ROOT, wait_until

OUT = ROOT / "docs" / "images" / "status-page.png"


def predict(url: str, features: list[float], entity: str, deadline_ms: int | None = None) -> None:
    body: dict[str, object] = {"model_name": "risk", "entity_id": entity, "features": features}
    if deadline_ms is not None:
        body["context"] = {"deadline_ms": deadline_ms}
    req = urllib.request.Request(
        f"{url}/v1/predict", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()


def gateway(env: dict[str, str], *args: str, timeout: float = 120) -> None:
    subprocess.run([sys.executable, "-m", "gateway", *args], cwd=ROOT, env=env, check=True,
                   timeout=timeout)  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--requests", type=int, default=3000, help="risk predictions to send")
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found (make deps as root, or apt-get install chromium)")
    import redis  # the project's dependency; imported here to keep --help instant

    work = Path(tempfile.mkdtemp(prefix="switchyard-screenshot-"))
    env = dict(os.environ)
    own = stack.start(work, env, "screenshot")
    url, routes, prefix = own.url, Path(env["SWITCHYARD__ROUTING__ROUTES_DIR"]), own.prefix
    client = redis.Redis.from_url(env.get("SWITCHYARD__REDIS__URL", "redis://127.0.0.1:6379/0"))
    try:
        # A canary step as an operator takes it; the page lists the reload it causes.
        gateway(env, "routes", "set-weight", "risk", "--version", "1", "--weight", "25",
                "--routes-dir", str(routes))  # fmt: skip
        manifest = json.loads((ROOT / "model_repository/risk/2/manifest.json").read_text())
        probe = manifest["probe"]["features"]
        rng = random.Random(7)
        rows = [[x * rng.uniform(0.8, 1.2) for x in probe] for _ in range(args.requests)]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: predict(url, rows[i], f"user-{i}"), range(args.requests)))
        stream = f"{prefix}:risk"
        wait_until(lambda: client.xlen(stream) >= args.requests, 60, "the prediction log")
        gateway(env, "promote", "risk", "--dry-run")  # one evaluation, recorded, never applied
        # Then deadlines too short for the primary: the fallback ladder answers these.
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: predict(url, probe, f"late-{i}", deadline_ms=2), range(40)))
        profile = work / "chromium"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [chromium, "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage",
             "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
             f"--screenshot={args.out}", "--window-size=1280,1400", f"{url}/admin/ui"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")
    finally:
        own.stop()
        client.close()
        stack.drop_keys(env, prefix)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
