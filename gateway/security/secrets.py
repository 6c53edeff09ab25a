"""Deployment secrets that settings name: given inline (from the environment) or in a file.

A secret file is the Kubernetes/compose way (a mounted Secret); the value is its content with
surrounding whitespace removed. An unreadable or empty named file stops the start: running
with a silently missing secret is worse than not running.
"""

from __future__ import annotations

from pathlib import Path

from gateway.config import ConfigError, Settings


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
