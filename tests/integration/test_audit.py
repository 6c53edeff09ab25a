"""The audit trail against the real Redis (db 15, a stream and keys under a prefix of the test's
own; nothing flushed): `routes set-weight`, `keys create|revoke` and the rollout controller
record who, what, when, old and new; `audit tail` prints them (and follows); with Redis down
the record reaches the log and the local file instead; the status page's feed reads the stream.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aioredis
import structlog

from gateway.audit import AuditFeed, AuditLog, os_user, read_local
from gateway.cli import main
from gateway.clock import FakeClock
from gateway.config import load_settings
from gateway.predlog.feedback import LabelStore
from gateway.predlog.redis_stream import StreamWriter
from gateway.rollout.analysis import PromotionPolicy
from gateway.rollout.controller import RolloutController
from gateway.routing.table import policy_version
from gateway.tritonserver import free_port
from tests.conftest import REDIS_URL, reachable_redis
from tests.integration.test_rollout import entry

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Env:
    config: Path
    stream: str
    prefix: str
    local_file: Path
    routes: Path
    client: redis.Redis


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.delenv("SWITCHYARD__AUDIT__ENABLED")  # tests/conftest.py turns it off elsewhere
    client = reachable_redis()
    prefix = f"audit-test-{uuid.uuid4().hex[:12]}"
    routes = tmp_path / "routes"
    routes.mkdir()
    shutil.copy(REPO / "configs/routes/risk.yaml", routes / "risk.yaml")
    e = Env(tmp_path / "gateway.yaml", f"{prefix}:audit", prefix, tmp_path / "audit.jsonl",
            routes, client)  # fmt: skip
    write_config(e, REDIS_URL)
    try:
        yield e
    finally:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
        client.close()


def write_config(e: Env, redis_url: str) -> None:
    e.config.write_text(
        f"redis: {{url: '{redis_url}', connect_timeout_s: 0.2, socket_timeout_s: 1.0}}\n"
        f"routing: {{routes_dir: '{e.routes}', model_repository: '{e.routes}/none'}}\n"
        f"auth: {{keys_file: '{e.routes.parent}/keys.yaml'}}\n"
        f"audit: {{stream: '{e.stream}', maxlen: 1000, local_file: '{e.local_file}'}}\n"
    )


def stream(e: Env) -> list[dict[str, Any]]:
    return [
        {k.decode(): orjson.loads(v) for k, v in fields.items()}
        for _, fields in e.client.xrange(e.stream)
    ]


def set_weight(e: Env, weight: str) -> int:
    argv = ["routes", "set-weight", "risk", "--version", "1", "--weight", weight]
    return main([*argv, "--config", str(e.config), "--no-catalog"])


def test_set_weight_is_recorded_with_who_old_and_new(env: Env, capsys) -> None:
    before = time.time()
    assert set_weight(env, "25") == 0
    (rec,) = stream(env)
    assert (rec["action"], rec["target"], rec["old"], rec["new"]) == (
        "route.set_weight", "risk/risk@1", 10.0, 25.0,
    )  # fmt: skip
    assert (rec["who"], rec["via"]) == (os_user(), "cli")
    assert rec["detail"]["route_file"] == str(env.routes / "risk.yaml")
    at = time.mktime(time.strptime(rec["at"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert before - 1 <= at <= time.time() + 1
    assert not env.local_file.exists()  # Redis took it
    capsys.readouterr()

    assert main(["audit", "tail", "-n", "5", "--config", str(env.config)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "route.set_weight" in line and "risk/risk@1" in line and "10.0 -> 25.0" in line
    assert main(["audit", "tail", "--json", "--config", str(env.config)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["new"] == 25.0 and printed["who"] == os_user()


def test_keys_create_and_revoke_are_recorded_without_the_key(env: Env, capsys) -> None:
    argv = ["--config", str(env.config)]
    create = ["keys", "create", "--scopes", "predict", "--rate", "5", "--name", "ci"]
    assert main([*create, *argv]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]  # still alone on the last line
    assert main(["keys", "revoke", "ci", *argv]) == 0
    created, revoked = stream(env)
    assert (created["action"], created["target"], created["old"]) == ("key.create", "ci", None)
    assert created["new"]["scopes"] == ["predict"] and created["new"]["rate"] == 5.0
    assert (revoked["action"], revoked["new"]) == ("key.revoke", None)
    assert revoked["old"]["id"] == "ci" and revoked["who"] == os_user()
    raw = b"".join(v for _, f in env.client.xrange(env.stream) for v in f.values())
    assert key.encode() not in raw and hashlib.sha256(key.encode()).hexdigest().encode() not in raw


async def test_the_rollout_controller_records_its_weight_change(env: Env) -> None:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        policy = policy_version((env.routes / "risk.yaml").read_bytes())
        entries = [entry(i, "champion", 5.0 + i % 10, policy) for i in range(150)]
        entries += [entry(i, "challenger:risk@1", 5.0 + i % 10, policy) for i in range(150)]
        assert await StreamWriter(client, prefix=f"{env.prefix}:pred").write(entries) == 300
        labels = LabelStore(client, prefix=f"{env.prefix}:label")
        for e in entries:
            await client.set(labels.key(e["request_id"]), json.dumps("deny"))
        settings = load_settings(env.config, env={})
        controller = RolloutController(
            client, labels, routes_dir=env.routes,
            policy=PromotionPolicy(min_samples=100, min_labels=50, window_s=600),
            record_dir=env.routes.parent / "rollout", stream_prefix=f"{env.prefix}:pred",
            wall=FakeClock(time.time() + 1.0),
            audit=AuditLog.from_settings(settings, via="rollout-controller"),
        )  # fmt: skip
        ev = await controller.evaluate_once("risk")
    finally:
        await client.aclose()
    assert ev.applied and (ev.from_weight, ev.to_weight) == (10, 25)
    (rec,) = stream(env)
    assert (rec["via"], rec["action"], rec["old"], rec["new"]) == (
        "rollout-controller", "route.set_weight", 10.0, 25.0,
    )  # fmt: skip


def test_with_redis_down_the_record_reaches_the_log_and_the_local_file(env: Env, capsys) -> None:
    write_config(env, f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    with structlog.testing.capture_logs() as logs:
        assert set_weight(env, "30") == 0
    logged = [x for x in logs if x["event"] == "audit"]
    assert len(logged) == 1 and (logged[0]["old"], logged[0]["new"]) == (10.0, 30.0)
    assert any(x["event"] == "audit_redis_unavailable" for x in logs)  # not silently
    (kept,) = read_local(env.local_file)
    assert (kept["action"], kept["old"], kept["new"], kept["who"]) == (
        "route.set_weight", 10.0, 30.0, os_user(),
    )  # fmt: skip
    assert stream(env) == []
    capsys.readouterr()
    assert main(["audit", "tail", "--config", str(env.config)]) == 0
    out, err = capsys.readouterr()
    assert "10.0 -> 30.0" in out and "Redis unavailable" in err
    write_config(env, REDIS_URL)  # Redis is back: the stream is empty, the file keeps the record
    assert main(["audit", "tail", "--config", str(env.config)]) == 0
    assert "10.0 -> 30.0" not in capsys.readouterr().out
    assert main(["audit", "tail", "--local", "--config", str(env.config)]) == 0
    assert "10.0 -> 30.0" in capsys.readouterr().out


async def test_the_status_page_feed_reads_the_stream(env: Env) -> None:
    settings = load_settings(env.config, env={})
    audit = AuditLog.from_settings(settings)
    assert audit is not None
    for weight in (20.0, 40.0):
        audit.record("route.set_weight", "risk/risk@1", weight / 2, weight)
    audit.close()
    feed = AuditFeed(settings)
    try:
        await feed.refresh()
        rows = feed.recent(10)
    finally:
        await feed.client.aclose()
    newest_first = [("20.0", "40.0"), ("10.0", "20.0")]
    assert [(r["old"], r["new"]) for r in rows] == newest_first


def test_tail_follow_prints_records_written_after_it_started(env: Env) -> None:
    audit = AuditLog.from_settings(load_settings(env.config, env={}))
    assert audit is not None
    audit.record("key.create", "first", None, {"id": "first"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "audit", "tail", "-n", "0", "--follow",
         "--config", str(env.config)],
        cwd=REPO, env={**os.environ}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out: queue.Queue[bytes] = queue.Queue()
    assert proc.stdout is not None and proc.stderr is not None
    threading.Thread(target=lambda: [out.put(x) for x in proc.stdout or ()], daemon=True).start()
    try:
        ready = proc.stderr.readline()  # blocks until the follower has read the stream once
        assert b"following" in ready, ready
        audit.record("key.create", "second", None, {"id": "second"})
        line = out.get(timeout=30)  # the follower prints it within a blocking read or two
        assert b"second" in line and b"key.create" in line
        assert out.empty()  # -n 0: "first" (written before the start) is not printed
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stderr.close()
        proc.stdout.close()  # the reader thread has seen EOF (the process is gone)
        audit.close()
