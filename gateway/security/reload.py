"""KeyStore: the live key file, re-read on change without a restart.

A poll every `interval_s` (default 0.5 s) stats the file; when its (inode, size, mtime)
changes the content is read and hashed, and only a different content is parsed. So a
revocation written by `keys revoke` (an atomic rename: a new inode) is live within one
interval. A file that fails to parse keeps the previous keys serving and is logged and
counted: a typo must not lock every client out, nor let anyone in.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry, Counter

from gateway.security.keys import KeyFile, KeyFileError, parse_key_bytes

log = structlog.get_logger(__name__)

_Stamp = tuple[int, int, int] | None


class KeyStore:
    def __init__(
        self, path: Path, interval_s: float = 0.5, registry: CollectorRegistry | None = None
    ) -> None:
        self.path = path
        self.interval_s = interval_s
        self.current = KeyFile()
        self.last_error: str | None = None
        self._stamp: _Stamp = None
        self._digest: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._reloads = Counter(
            "auth_key_reloads_total",
            "Key file reloads by result (ok, error)",
            ["result"],
            registry=registry,
        )

    def load(self) -> None:
        """First load: an invalid file is an error (refuse to start), a missing one is empty."""
        self.check(strict=True)

    def check(self, strict: bool = False) -> bool:
        """Re-read the file if it changed; True when new keys took effect."""
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            body = b"" if stamp is None else self.path.read_bytes()
        except FileNotFoundError:
            body = b""
        except OSError as exc:
            self._stamp = None  # a failed read is tried again next poll
            return self._failed(f"cannot read {self.path}: {exc}", strict)
        digest = hashlib.sha256(body).hexdigest()
        if digest == self._digest:
            return False  # touched, same content
        try:
            keys = parse_key_bytes(body, str(self.path))
        except KeyFileError as exc:
            return self._failed(str(exc), strict)
        self._digest, self.current, self.last_error = digest, keys, None
        self._reloads.labels(result="ok").inc()
        log.info("auth_keys_loaded", path=str(self.path), keys=len(keys.keys))
        return True

    def _failed(self, error: str, strict: bool) -> bool:
        if strict:
            raise KeyFileError(error)
        if error != self.last_error:
            log.error("auth_keys_reload_failed", error=error, kept=len(self.current.keys))
        self.last_error = error
        self._reloads.labels(result="error").inc()
        return False

    def _stat(self) -> _Stamp:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="auth-key-reload")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.check()
            except Exception:  # the poll must outlive any one bad read
                log.exception("auth_keys_poll_error")
