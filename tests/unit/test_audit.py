"""The audit trail without Redis (gateway/audit.py): records reach the log and the local JSON
lines file, read back newest first by the status page; off, the page says so."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import structlog

from gateway.api.status import status_view
from gateway.app import build_app
from gateway.audit import AuditLog, describe, os_user, read_local
from gateway.clock import FakeClock
from gateway.config import AuditSettings
from tests.unit.fakes import toy_backend, write_repo


def test_without_redis_a_record_reaches_the_log_and_the_local_file(tmp_path: Path) -> None:
    audit = AuditLog(AuditSettings(local_file=tmp_path / "a" / "audit.jsonl"), None,
                     wall=FakeClock(1_767_225_600.0))  # fmt: skip
    with structlog.testing.capture_logs() as logs:
        rec = audit.record("key.revoke", "app-1", {"id": "app-1"}, None)
    assert rec.at == "2026-01-01T00:00:00.000+00:00" and rec.who == os_user()
    (logged,) = [x for x in logs if x["event"] == "audit"]
    assert (logged["action"], logged["old"], logged["new"]) == ("key.revoke", {"id": "app-1"}, None)
    (kept,) = read_local(tmp_path / "a" / "audit.jsonl")
    assert kept == rec.to_dict()
    audit.record("route.set_weight", "risk/risk@1", 10.0, 25.0, who="key:ops")
    newest, older = audit.recent(10)
    assert (newest["who"], newest["new"], older["action"]) == ("key:ops", 25.0, "key.revoke")
    assert describe(newest).endswith("key:ops (cli)  route.set_weight  risk/risk@1  10.0 -> 25.0")


def test_a_torn_line_is_skipped_and_the_tail_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"action": "a"}\n{"action": "b", "ol\n{"action": "c"}\n')
    assert [r["action"] for r in read_local(path)] == ["a", "c"]
    assert [r["action"] for r in read_local(path, max_bytes=18)] == ["c"]
    assert read_local(tmp_path / "absent.jsonl") == []


async def test_the_status_page_shows_local_records_or_says_it_is_off(
    tmp_path: Path, aiohttp_client
) -> None:
    settings = write_repo(tmp_path)
    AuditLog(settings.audit, None).record("route.set_weight", "toy/toy@1", 0.0, 5.0)
    client = await aiohttp_client(build_app(settings, backend=toy_backend()))
    (row,) = status_view(client.app)["audit"]["entries"]
    assert (row["action"], row["old"], row["new"]) == ("route.set_weight", "0.0", "5.0")
    assert "toy/toy@1" in await (await client.get("/admin/ui")).text()

    off = dataclasses.replace(settings, audit=dataclasses.replace(settings.audit, enabled=False))
    client = await aiohttp_client(build_app(off, backend=toy_backend()))
    assert status_view(client.app)["audit"]["enabled"] is False
    assert "audit log not enabled" in await (await client.get("/admin/ui")).text()
