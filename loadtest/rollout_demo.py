"""Seed a synthetic canary rollout into Redis, then draw it with `gateway rollout report`.

    python -m loadtest.rollout_demo --png docs/images/rollout-report.png [--html report.html]

The story (30 minutes of `risk` traffic at ~8 requests/s, fixed seed): the challenger starts
at 5 %, the controller holds for lack of data, promotes to 25 % and 50 %, then the
challenger's latency degrades and the next evaluation rolls it back to 0 %. Entries go in
through the real `StreamWriter`, labels through the real `LabelStore`, decisions as the
controller's JSONL records, all under a unique key prefix that is deleted afterwards; the
picture is made by the project's own report command.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis.asyncio as aioredis

from gateway.predlog.feedback import LabelStore
from gateway.predlog.redis_stream import StreamWriter

MODEL, CHALLENGER = "risk", "challenger:risk@1"
MINUTES, RPS = 30, 8
#: (minute, action, from %, to %, first reason)
DECISIONS = (
    (5, "hold", 5, 5, "not enough data: challenger 118 answers < min_samples 200"),
    (10, "promote", 5, 25, "all gates pass: 5 -> 25 %"),
    (20, "promote", 25, 50, "all gates pass: 25 -> 50 %"),
    (27, "rollback", 50, 0, "breach: p99 38.4 ms vs limit 13.2 ms (champion 12.0)"),
)


def weight_at(minute: float) -> float:
    weight = 5.0
    for at, _, _, to, _ in DECISIONS:
        if minute >= at:
            weight = float(to)
    return weight


def story(start: float, seed: int = 7) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The entries and their labels (request_id -> label), deterministic for a seed."""
    rng = np.random.default_rng(seed)
    entries: list[dict[str, Any]] = []
    labels: dict[str, str] = {}
    n = MINUTES * 60 * RPS
    for i, offset in enumerate(np.sort(rng.uniform(0, MINUTES * 60, n))):
        minute = offset / 60
        challenger = rng.uniform(0, 100) < weight_at(minute)
        degraded = challenger and minute >= 23  # the challenger's regression
        median = 12.0 if degraded else (5.5 if challenger else 6.0)
        latency = float(median * rng.lognormal(0, 0.45 if degraded else 0.3))
        fallback = rng.uniform() < (0.02 if degraded else 0.002)
        accuracy = 0.955 if challenger else 0.95
        truth = "deny" if rng.uniform() < 0.4 else "approve"
        right = rng.uniform() < accuracy
        decision = truth if right else ("approve" if truth == "deny" else "deny")
        rid = f"demo-{i:06d}"
        entries.append({
            "request_id": rid, "entity_id": f"user-{i % 5000}", "model": MODEL, "target": MODEL,
            "version": "1" if challenger else "2", "policy_version": "routes@demo",
            "arm": CHALLENGER if challenger else "champion", "input_hash": f"{i:032x}",
            "output": {"score": 0.8 if decision == "deny" else 0.2, "decision": decision,
                       "confidence": 0.8},
            "fallback_used": "cache" if fallback else None,
            "latency_ms": round(latency, 3), "ts": start + float(offset),
        })  # fmt: skip
        if rng.uniform() < 0.6:  # 60 % of answers get a label back
            labels[rid] = truth
    return entries, labels


def decision_records(start: float) -> list[dict[str, Any]]:
    return [
        {"ts": start + minute * 60, "model": MODEL, "route_file": "configs/routes/risk.yaml",
         "challenger": "risk@1", "action": action, "from_weight": frm, "to_weight": to,
         "applied": action != "hold", "dry_run": False, "reasons": [reason]}
        for minute, action, frm, to, reason in DECISIONS
    ]  # fmt: skip


async def seed(url: str, prefix: str, label_prefix: str, start: float) -> int:
    client = aioredis.Redis.from_url(url)
    try:
        entries, labels = story(start)
        written = 0
        writer = StreamWriter(client, prefix=prefix, maxlen=0)
        for i in range(0, len(entries), 1000):
            written += await writer.write(entries[i : i + 1000])
        store = LabelStore(client, label_prefix, ttl_s=3600)
        async with client.pipeline(transaction=False) as pipe:
            for rid, label in labels.items():
                pipe.set(store.key(rid), orjson.dumps(label), ex=3600)
            await pipe.execute()
        return written
    finally:
        await client.aclose()


async def cleanup(url: str, prefixes: Sequence[str]) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        for prefix in prefixes:
            keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
            for i in range(0, len(keys), 1000):
                await client.delete(*keys[i : i + 1000])
    finally:
        await client.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loadtest.rollout_demo", description=__doc__.splitlines()[0])
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--png", type=Path, default=Path("docs/images/rollout-report.png"))
    p.add_argument("--html", type=Path, default=None, help="default: a temp file")
    p.add_argument("--start", type=float, default=1_764_590_400.0, help="epoch s of minute 0")
    args = p.parse_args(argv)
    tag = f"rollout-demo-{uuid.uuid4().hex[:8]}"
    prefix, label_prefix = f"{tag}:predictions", f"{tag}:label"
    from gateway.cli import main as gateway_main

    with tempfile.TemporaryDirectory() as tmp:
        records = Path(tmp) / f"{MODEL}.jsonl"
        records.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in decision_records(args.start)))
        html = args.html or Path(tmp) / "report.html"
        os.environ["SWITCHYARD__PREDLOG__STREAM_PREFIX"] = prefix
        os.environ["SWITCHYARD__FEEDBACK__LABEL_PREFIX"] = label_prefix
        try:
            n = asyncio.run(seed(args.redis_url, prefix, label_prefix, args.start))
            print(f"seeded {n} entries under {prefix}:{MODEL}", file=sys.stderr)
            return gateway_main(["rollout", "report", "--model", MODEL, "--out", str(html),
                                 "--png", str(args.png), "--redis-url", args.redis_url,
                                 "--record-dir", tmp])  # fmt: skip
        finally:
            asyncio.run(cleanup(args.redis_url, [prefix, label_prefix]))


if __name__ == "__main__":
    sys.exit(main())
