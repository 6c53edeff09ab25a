"""Labelled `risk` traffic for a running gateway: real rows, real labels, optional drift.

    python -m loadtest.traffic --rate 50 --labels                 # until Ctrl-C
    python -m loadtest.traffic --rate 50 --shift mean_radius=1.8  # one feature shifted
    python -m loadtest.traffic --rate 50 --duration 60 --json out.json

Each request is one row of scikit-learn's breast-cancer dataset (the data `risk` was trained
on; rows drawn at random, with a seed) from one of `--entities` entities, so sticky canary
splits see the same entity again. With `--labels`, the row's true label (1: malignant) is sent
to `/v1/feedback` a second after each answer, as a label join in production would later:
that is what the rollout controller's accuracy gate and `labels join` count. `--shift
NAME=FACTOR` multiplies one feature (repeatable): live inputs that no longer look like the
training data, for the drift monitor. Open loop at `--rate` per second: a slow gateway gets
the same arrivals, not fewer.

Prints a line every `--report-s` seconds to stderr and a summary on stdout at the end (SIGINT
and SIGTERM end the run cleanly).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

LABEL_DELAY_S = 1.0  # a label is sent this long after its answer (and again, on a 404)
LABEL_ATTEMPTS = 5


@dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    labelled: int = 0
    fallback: int = 0
    versions: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        versions = " ".join(f"{v}={n}" for v, n in sorted(self.versions.items()))
        errors = sum(self.errors.values())
        return (
            f"sent {self.sent} answered {self.answered} labelled {self.labelled} "
            f"fallback {self.fallback} errors {errors}  versions: {versions or '-'}"
        )


def dataset_rows() -> tuple[list[str], np.ndarray, np.ndarray]:
    """Feature names as the model's input schema spells them, rows (float32) and labels
    (1: malignant, the class `risk` scores)."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    names = [n.strip().lower().replace(" ", "_") for n in data.feature_names]
    return names, data.data.astype(np.float32), (data.target == 0).astype(int)


def parse_shifts(values: list[str], names: list[str]) -> dict[int, float]:
    out: dict[int, float] = {}
    for v in values:
        name, sep, factor = v.partition("=")
        if not sep or name not in names:
            raise SystemExit(f"--shift {v!r}: want FEATURE=FACTOR with FEATURE one of {names}")
        out[names.index(name)] = float(factor)
    return out


async def one(
    http: aiohttp.ClientSession,
    url: str,
    model: str,
    entity: str,
    row: list[float],
    label: int | None,
    tally: Tally,
) -> None:
    body = {"model_name": model, "entity_id": entity, "features": row}
    try:
        async with http.post(f"{url}/v1/predict", json=body) as r:
            doc = await r.json(content_type=None)
            if r.status != 200:
                tally.errors[str((doc.get("error") or {}).get("code", r.status))] += 1
                return
        tally.answered += 1
        tally.versions[str(doc.get("model_version"))] += 1
        tally.fallback += bool(doc.get("fallback_used"))
        if label is None:
            return
        fb = {"request_id": doc["request_id"], "label": label}
        # A label arrives after its answer, as in production; the gateway takes one only for
        # a request id whose answer reached the prediction log (404 until the log's flush).
        for _ in range(LABEL_ATTEMPTS):
            await asyncio.sleep(LABEL_DELAY_S)
            async with http.post(f"{url}/v1/feedback", json=fb) as r:
                await r.read()
                if r.status in (200, 202):
                    tally.labelled += 1
                    return
                if r.status != 404:
                    break
        tally.errors[f"feedback_{r.status}"] += 1
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        tally.errors[type(exc).__name__] += 1


async def run(args: argparse.Namespace) -> Tally:
    names, x, y = dataset_rows()
    shifts = parse_shifts(args.shift, names)
    for j, factor in shifts.items():
        x[:, j] *= factor
    rng = random.Random(args.seed)
    tally, stop = Tally(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    timeout = aiohttp.ClientTimeout(total=10)
    pending: set[asyncio.Task[None]] = set()
    start = next_report = time.monotonic()
    async with aiohttp.ClientSession(timeout=timeout) as http:
        while not stop.is_set():
            now = time.monotonic()
            if args.duration is not None and now - start >= args.duration:
                break
            if now >= next_report:
                print(f"traffic: {tally.line()}", file=sys.stderr, flush=True)
                next_report = now + args.report_s
            i = rng.randrange(len(x))
            entity = f"user-{rng.randrange(args.entities)}"
            label = int(y[i]) if args.labels else None
            task = asyncio.create_task(
                one(http, args.gateway, args.model, entity, x[i].tolist(), label, tally)
            )
            pending.add(task)
            task.add_done_callback(pending.discard)
            tally.sent += 1
            # open loop: the next arrival is due 1/rate after this one, answered or not
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=rng.expovariate(args.rate))
        if pending:
            await asyncio.wait(pending, timeout=15)
    return tally


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gateway", default="http://127.0.0.1:8080", help="gateway base URL")
    ap.add_argument("--model", default="risk")
    ap.add_argument("--rate", type=float, default=50.0, help="requests per second (open loop)")
    ap.add_argument("--duration", type=float, default=None, help="seconds (default: until ^C)")
    ap.add_argument("--labels", action="store_true", help="send each answer's true label")
    ap.add_argument("--shift", action="append", default=[], metavar="FEATURE=FACTOR")
    ap.add_argument("--entities", type=int, default=5000, help="distinct entity ids")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--report-s", type=float, default=10.0, help="progress line period")
    ap.add_argument("--json", type=Path, default=None, help="write the summary here too")
    args = ap.parse_args(argv)
    if args.rate <= 0:
        ap.error("--rate must be > 0")
    tally = asyncio.run(run(args))
    print(f"traffic done: {tally.line()}")
    if tally.errors:
        print(f"errors: {dict(tally.errors)}")
    if args.json is not None:
        doc: dict[str, Any] = {
            "sent": tally.sent, "answered": tally.answered, "labelled": tally.labelled,
            "fallback": tally.fallback, "versions": dict(tally.versions),
            "errors": dict(tally.errors),
        }  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if tally.answered else 1


if __name__ == "__main__":
    sys.exit(main())
