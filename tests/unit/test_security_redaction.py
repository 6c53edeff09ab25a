"""Data protection in the prediction log: entity ids hashed for every model by default, hashes
keyed by a salt that is required (set, read, or generated once), context by allow-list."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest

from gateway.app import build_app
from gateway.config import ConfigError, Settings
from gateway.observability import log_policies
from gateway.predlog.redaction import LogPolicy
from gateway.security.secrets import generate_secret, redaction_salt
from tests.unit.fakes import toy_backend, write_repo


def predlog_settings(settings: Settings, **changes: object) -> Settings:
    return dataclasses.replace(settings, predlog=dataclasses.replace(settings.predlog, **changes))


def spooled_entries(spool: Path) -> list[dict]:
    lines = [
        line for f in sorted(spool.rglob("*")) if f.is_file() for line in f.read_text().splitlines()
    ]
    return [json.loads(line) for line in lines if line.strip()]


async def test_default_settings_log_no_entity_id_and_no_free_text_context(
    tmp_path: Path, aiohttp_client
) -> None:
    """No policy for the model at all: entity_id is still hashed, with a generated salt."""
    settings = predlog_settings(write_repo(tmp_path), sample_rate=1.0)
    client = await aiohttp_client(build_app(settings, backend=toy_backend()))
    body = {
        "model_name": "toy",
        "entity_id": "alice@example.com",
        "features": [1, 2, 3],
        "context": {"segment": "eu", "note": "call alice on +44 7700 900123"},
    }
    resp = await client.post("/v1/predict", data=io.BytesIO(json.dumps(body).encode()))
    assert resp.status == 200, await resp.text()
    (entry,) = spooled_entries(settings.predlog.spool_dir)
    text = json.dumps(entry)
    assert "alice" not in text and "7700" not in text
    assert entry["entity_id"].startswith("h:")
    assert entry["payload"]["context"] == {"segment": "eu"}  # only allow-listed keys
    salt_file = settings.predlog.redact_salt_file
    assert salt_file is not None and oct(salt_file.stat().st_mode & 0o777) == "0o600"
    unkeyed = LogPolicy(salt=b"").hash_value("alice@example.com")
    assert entry["entity_id"] != unkeyed  # nobody can recompute it without the salt


def test_salt_is_generated_once_and_kept(tmp_path: Path) -> None:
    settings = write_repo(tmp_path)
    first = redaction_salt(settings)
    assert len(first) == 64 and redaction_salt(settings) == first
    generate_secret(settings.predlog.redact_salt_file)  # a second worker racing: no overwrite
    assert redaction_salt(settings) == first
    other = write_repo(tmp_path / "elsewhere")
    assert redaction_salt(other) != first
    assert redaction_salt(predlog_settings(settings, redact_salt="from-env")) == "from-env"


def test_no_salt_and_no_generation_refuses_to_start(tmp_path: Path) -> None:
    settings = predlog_settings(write_repo(tmp_path), generate_redact_salt=False)
    with pytest.raises(ConfigError, match="no salt"):
        build_app(settings, backend=toy_backend())
    # Nothing hashed anywhere: no salt needed, none generated.
    off = predlog_settings(settings, hash_always=())
    assert not log_policies(off).redacts
    assert settings.predlog.redact_salt_file is not None
    assert not settings.predlog.redact_salt_file.exists()


def test_policies_add_to_hash_always_and_may_drop_instead(tmp_path: Path) -> None:
    settings = predlog_settings(
        write_repo(tmp_path),
        redact_salt="k",
        policies={"a": {"hash": ["segment"]}, "b": {"drop": ["entity_id"]}},
    )
    policies = log_policies(settings)
    assert policies.for_model("a").hash_fields == {"entity_id", "segment"}
    assert policies.for_model("b").hash_fields == set()
    assert policies.for_model("b").apply({"request_id": "r", "entity_id": "e"}) == {
        "request_id": "r"
    }
    assert policies.for_model("unlisted").hash_fields == {"entity_id"}
