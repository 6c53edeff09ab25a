"""Deployment secrets that settings name: given inline (from the environment) or in a file.

A secret file is the Kubernetes/compose way (a mounted Secret); the value is its content with
surrounding whitespace removed. An unreadable or empty named file stops the start: running
with a silently missing secret is worse than not running.

The redaction salt may also be generated: with redaction on and no salt given, one is made
once (256 random bits) and persisted in `predlog.redact_salt_file`, published by a hard link
so that workers starting together agree on one. That suits one host; replicas on several
hosts must share one salt (env or a mounted file), or their hashes will not join.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path

import structlog

from gateway.config import ConfigError, Settings

log = structlog.get_logger(__name__)


def read_secret(value: str, file: Path | None, what: str) -> str:
    """``value`` if set, else the content of ``file`` (if named), else ""."""
    if value:
        return value
    if file is None:
        return ""
    try:
        text = file.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{what}_file {file}: {exc}") from exc
    if not text:
        raise ConfigError(f"{what}_file {file} is empty")
    return text


def sticky_secret(settings: Settings) -> str:
    r = settings.routing
    return read_secret(r.sticky_salt, r.sticky_salt_file, "routing.sticky_salt")


def redaction_salt(settings: Settings) -> str:
    """The key for redaction hashes: set, in the file, or generated into the file once."""
    p = settings.predlog
    if p.redact_salt:
        return p.redact_salt
    path = p.redact_salt_file
    if path is not None and path.exists():
        return read_secret("", path, "predlog.redact_salt")
    if path is None or not p.generate_redact_salt:
        raise ConfigError(
            "redaction is on (predlog.hash_always or a policy's hash) but there is no salt: "
            "set SWITCHYARD__PREDLOG__REDACT_SALT or predlog.redact_salt_file, or "
            "predlog.generate_redact_salt: true"
        )
    generate_secret(path)
    log.warning(
        "redact_salt_generated",
        path=str(path),
        note="replicas on other hosts need this same salt for their hashes to join",
    )
    return read_secret("", path, "predlog.redact_salt")


def generate_secret(path: Path) -> None:
    """Write 256 random bits to ``path`` unless it exists; the first writer wins, whole."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):  # another worker was first: use theirs
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
