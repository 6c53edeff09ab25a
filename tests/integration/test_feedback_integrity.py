"""Feedback integrity against real Redis: a label only for an answered request id, once;
the same label again is idempotent, another one 409; the writer's key id is recorded; answers
that were spooled and replayed later take labels too. Unique key prefixes, no flush."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from gateway.app import build_app
from gateway.config import AuthSettings, Settings
from gateway.errors import LabelConflict, UnknownRequestId
from gateway.metrics import Metrics
from gateway.predlog.feedback import LabelStore
from gateway.predlog.redis_stream import StreamWriter
from gateway.predlog.spool import Spool
from gateway.predlog.writer import PredictionLog
from gateway.security.keys import KeyFile, KeyRecord, hash_key, new_key, write_key_file
from tests.conftest import REDIS_URL, reachable_aioredis
from tests.unit.fakes import toy_backend, write_repo


@pytest.fixture
async def redis_client() -> AsyncIterator[tuple[aioredis.Redis, str]]:
    """A client and a unique prefix; every key under the prefix is deleted afterwards."""
    client = await reachable_aioredis()
    prefix = f"test-fb-{uuid.uuid4().hex[:12]}"
    yield client, prefix
    keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def settings_for(tmp_path: Path, prefix: str, keys_file: Path | None) -> Settings:
    base = write_repo(tmp_path)
    s = dataclasses.replace(
        base,
        redis=dataclasses.replace(base.redis, url=REDIS_URL),
        predlog=dataclasses.replace(base.predlog, stream_prefix=f"{prefix}-predictions"),
        feedback=dataclasses.replace(
            base.feedback, label_prefix=f"{prefix}-label", answered_prefix=f"{prefix}-answered"
        ),
    )
    if keys_file is not None:
        s = dataclasses.replace(s, auth=AuthSettings(enabled=True, keys_file=keys_file))
    return s


async def post(client: TestClient, path: str, body: object, key: str | None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    resp = await client.post(path, data=io.BytesIO(json.dumps(body).encode()), headers=headers)
    return resp.status, await resp.json()


async def wait_for(client: aioredis.Redis, key: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await client.exists(key):
        assert time.monotonic() < deadline, f"{key} never appeared"
        await asyncio.sleep(0.02)


async def test_a_label_needs_an_answer_and_is_written_once(
    tmp_path: Path, redis_client: tuple[aioredis.Redis, str], aiohttp_client
) -> None:
    redis, prefix = redis_client
    keys_file = tmp_path / "keys.yaml"
    key = new_key()
    write_key_file(
        keys_file,
        KeyFile((KeyRecord("labeller", hash_key(key), frozenset({"predict", "feedback"})),)),
    )
    app = build_app(settings_for(tmp_path, prefix, keys_file), backend=toy_backend())
    client = await aiohttp_client(app)

    status, body = await post(client, "/v1/feedback", {"request_id": "never", "label": 1}, key)
    assert status == 404 and body["error"]["code"] == "unknown_request_id"

    rid = f"rid-{uuid.uuid4().hex}"
    status, body = await post(
        client, "/v1/predict", {"request_id": rid, "model_name": "toy", "features": [1, 2, 3]}, key
    )
    assert status == 200, body
    await wait_for(redis, f"{prefix}-answered:{rid}")  # the log entry reached Redis
    assert await redis.get(f"{prefix}-answered:{rid}") == b"toy"

    status, body = await post(client, "/v1/feedback", {"request_id": rid, "label": "deny"}, key)
    assert status == 202 and body["status"] == "stored"
    status, body = await post(client, "/v1/feedback", {"request_id": rid, "label": "deny"}, key)
    assert status == 200 and body["status"] == "unchanged"  # a retry is harmless
    status, body = await post(client, "/v1/feedback", {"request_id": rid, "label": "approve"}, key)
    assert status == 409 and body["error"]["code"] == "label_conflict"

    stored = orjson.loads(await redis.get(f"{prefix}-label:{rid}"))
    assert stored["label"] == "deny" and stored["by"] == "labeller"
    labels = LabelStore(redis, f"{prefix}-label")
    assert await labels.get_many([rid, "never"]) == ["deny", None]  # the join sees the label


async def test_labels_without_auth_are_recorded_as_anonymous(
    redis_client: tuple[aioredis.Redis, str],
) -> None:
    redis, prefix = redis_client
    writer = StreamWriter(redis, f"{prefix}-p", maxlen=0, answered_prefix=f"{prefix}-a")
    store = LabelStore(redis, f"{prefix}-l", answered_prefix=f"{prefix}-a")
    assert await writer.write([{"request_id": "r1", "model": "m", "output": {}}]) == 1
    assert await store.put("r1", True) is True
    assert await store.put("r1", True) is False
    for other in (1, 1.0, "True", False):  # a boolean is not the number 1
        with pytest.raises(LabelConflict):
            await store.put("r1", other)
    assert orjson.loads(await redis.get(f"{prefix}-l:r1"))["by"] == "anonymous"
    numeric = LabelStore(redis, f"{prefix}-l")  # no answered check: the old behaviour
    assert await numeric.put("n1", 1) and not await numeric.put("n1", 1.0)


async def test_spooled_answers_take_labels_once_replayed(
    tmp_path: Path, redis_client: tuple[aioredis.Redis, str]
) -> None:
    """Answers logged while Redis was away sit in the spool; their replay sets the markers."""
    redis, prefix = redis_client
    spool = Spool(tmp_path)
    spool.open()
    spool.append([{"request_id": f"s{i}", "model": "toy", "output": {}} for i in range(3)])
    spool.seal()
    store = LabelStore(redis, f"{prefix}-l", answered_prefix=f"{prefix}-a")
    with pytest.raises(UnknownRequestId):
        await store.put("s1", "deny")  # not in Redis yet
    writer = StreamWriter(redis, f"{prefix}-p", maxlen=0, answered_prefix=f"{prefix}-a")
    plog = PredictionLog(spool=Spool(tmp_path), metrics=Metrics(), writer=writer)
    assert await plog.replay() == 3
    assert await store.put("s1", "deny") is True
    assert await redis.ttl(f"{prefix}-a:s1") > 0  # markers expire (feedback.answered_ttl_s)
