"""Everything the gateway keeps in Redis, on a real 3-master Redis Cluster the module starts
(`redis-server --cluster-enabled yes` x 3, `redis-cli --cluster create`) and tears down:
prediction log (writer, replay, markers), feedback labels and their join, online features,
rate limits and the response cache, all through the one client factory (`redis.cluster`)."""

from __future__ import annotations

import dataclasses
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster as SyncCluster

from gateway.config import RedisSettings, Settings
from gateway.errors import UnknownRequestId
from gateway.features import FeatureStore, load_features
from gateway.metrics import Metrics
from gateway.observability import redis_client
from gateway.predlog.feedback import LabelStore, join_labels, model_streams
from gateway.predlog.redis_stream import StreamWriter, decode_fields
from gateway.predlog.spool import Spool
from gateway.predlog.writer import PredictionLog
from gateway.redis_kind import is_cluster
from gateway.resilience.cache import PredictionCache
from gateway.security.authn import Principal
from gateway.security.ratelimit import RateLimiter
from gateway.types import Deadline
from tests.conftest import unavailable

pytestmark = pytest.mark.integration


def _free_pair() -> int:
    """A port p with p and its cluster bus port p + 10000 both free."""
    for _ in range(200):
        port = random.randint(20000, 29999)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        unavailable("redis-server / redis-cli not installed (Makefile deps installs them)")
    workdir = tmp_path_factory.mktemp("cluster")
    ports: list[int] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(3):
            port = _free_pair()
            ports.append(port)
            procs.append(subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                 "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                 "--dir", str(workdir), "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))  # fmt: skip
        for port in ports:
            _poll(lambda p=port: _pings(p), 10, f"node {port} did not start")
        subprocess.run(
            ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        for port in ports:
            _poll(lambda p=port: _cluster_ok(p), 20, f"node {port}: cluster not ok")
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


def _pings(port: int) -> bool:
    try:
        with redis.Redis(port=port, socket_connect_timeout=0.2) as c:
            return bool(c.ping())
    except redis.ConnectionError:
        return False


def _cluster_ok(port: int) -> bool:
    with redis.Redis(port=port) as c:
        return c.cluster("info").get("cluster_state") == "ok"


def _poll(cond, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def settings(url: str) -> Settings:
    return dataclasses.replace(Settings(), redis=RedisSettings(url=url, cluster=True))


def entry(i: int, model: str) -> dict:
    return {"request_id": f"c{i}", "entity_id": f"e{i}", "model": model, "version": "2",
            "policy_version": "routes@abc", "arm": "champion" if i % 2 else "challenger",
            "input_hash": f"{i:032x}", "fallback_used": None, "latency_ms": 1.5, "ts": 1.0 + i,
            "output": {"score": 0.9, "decision": "deny", "confidence": 0.8}}  # fmt: skip


async def test_prediction_log_writes_replays_and_marks_on_a_cluster(
    cluster_url: str, tmp_path: Path
) -> None:
    client = redis_client(settings(cluster_url))
    assert is_cluster(client)
    writer = StreamWriter(client, "pl", maxlen=0, answered_prefix="ans")
    models = ["risk", "fraud", "churn"]  # streams on different slots, so different masters
    try:
        spool = Spool(tmp_path)
        plog = PredictionLog(spool=spool, metrics=Metrics(), writer=writer, flush_interval_s=0.01)
        await plog.start()
        for i in range(30):
            plog.record(entry(i, models[i % 3]))
        await plog.close()
        # A replay of the same lines (a crash after Redis took them) adds nothing.
        dup = Spool(tmp_path / "dup")
        dup.open()
        dup.append([entry(100 + i, models[i % 3]) for i in range(30)])
        dup.seal()
        (seg,) = dup.segments()
        lines = [(seg.stem, n + 1) for n in range(30)]
        entries = [entry(100 + i, models[i % 3]) for i in range(30)]
        assert await writer.write(entries[:10], lines[:10]) == 10
        assert await writer.write(entries, lines) == 20  # lines 1..10 are known
        for model in models:
            rows = await client.xrange(f"pl:{model}")
            ids = [decode_fields(f)["request_id"] for _, f in rows]
            assert len(ids) == len(set(ids)) == 20  # 10 logged, 10 of the segment: once each
        assert await client.get("ans:c7") == b"fraud"  # the feedback marker, another slot
        assert await client.hget(writer.marks_key("risk"), seg.stem) == b"28"
        assert sorted(await model_streams(client, "pl")) == [f"pl:{m}" for m in sorted(models)]
    finally:
        await client.aclose()


async def test_labels_and_join_on_a_cluster(cluster_url: str) -> None:
    client = redis_client(settings(cluster_url))
    writer = StreamWriter(client, "jl", maxlen=0, answered_prefix="jans")
    store = LabelStore(client, "jlabel", answered_prefix="jans")
    try:
        await writer.write([entry(i, "risk") for i in range(6)])
        assert await store.put("c1", "deny") is True
        assert await store.put("c1", "deny") is False  # idempotent
        assert await store.put("c2", "approve") is True
        with pytest.raises(UnknownRequestId):
            await store.put("never-answered", "deny")
        assert await store.get_many(["c1", "c2", "c3"]) == ["deny", "approve", None]
        report = await join_labels(client, store, ["jl:risk"])
        got = {(a.arm, a.labelled, a.correct) for a in report.arms}
        assert got == {("champion", 1, 1), ("challenger", 1, 0)}  # c1 odd, c2 even
    finally:
        await client.aclose()


async def test_features_rate_limits_and_response_cache_on_a_cluster(cluster_url: str) -> None:
    client = redis_client(settings(cluster_url))
    try:
        rows = [(f"user-{i}", {"a": float(i), "b": 2.0 * i}) for i in range(20)]
        assert await load_features(client, "set1", rows, key_prefix="cf") == 20
        store = FeatureStore(client, key_prefix="cf")
        assert await store.resolve(["set1"], "user-7", Deadline.after(2.0)) == {"a": 7.0, "b": 14.0}

        limiter = RateLimiter(client, prefix="crl")
        who = Principal("k1", frozenset({"predict"}), rate=0.2, burst=3)
        decisions = [await limiter.check(who) for _ in range(5)]
        assert [d.allowed for d in decisions if d is not None] == [True] * 3 + [False] * 2
        assert limiter._local_decisions._value.get() == 0  # the cluster decided every time

        cache = PredictionCache(redis_url=cluster_url, redis_cluster=True, redis_timeout_s=1.0)
        for i in range(10):
            cache.put(f"k{i}", {"score": i / 10}, ttl_s=60)
        assert await cache.flush() == 10
        reader = PredictionCache(redis_url=cluster_url, redis_cluster=True, redis_timeout_s=1.0)
        assert await reader.get("k3", 1.0) == {"score": 0.3}  # from the cluster, not the LRU
        await cache.close()
        await reader.close()
    finally:
        await client.aclose()
    with SyncCluster.from_url(cluster_url) as sync:  # the keys really are spread over masters
        nodes = {sync.get_node_from_key(f"cf:set1:user-{i}").name for i in range(20)}
        assert len(nodes) == 3
