"""The on-disk prediction log: append-only JSONL segments.

It holds the log while Redis is unreachable (or not configured, when it is the log itself)
and whatever the in-process buffer could not take. Appends go to Python's file buffer, so the
request path never waits on the disk; `sync` flushes (and fsyncs, when configured) from the
writer task.

Several gateway workers may share one directory. Each process writes its own segment
(`predictions-<time_ns>-<pid>.jsonl`) and holds an exclusive `flock` on it while it is
active; a replayer claims a segment with a non-blocking `flock`, so it never reads a segment
that is still being written, and a dead worker's segment becomes claimable at once.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import orjson
import structlog

log = structlog.get_logger(__name__)

PATTERN = "predictions-*.jsonl"


class Spool:
    def __init__(self, directory: Path, fsync: bool = False, segment_bytes: int = 16 << 20):
        self.directory = directory
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self._file: IO[bytes] | None = None
        self._seq = 0
        #: Entries this process appended and has not seen replayed (an estimate for the lag).
        self.pending = 0

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    def append(self, entries: list[dict[str, Any]]) -> None:
        """Buffered append to this process's active segment; raises OSError if unwritable."""
        if not entries:
            return
        data = b"".join(
            orjson.dumps(e, option=orjson.OPT_SERIALIZE_NUMPY, default=str) + b"\n" for e in entries
        )
        f = self._active()
        f.write(data)
        self.pending += len(entries)

    def sync(self) -> None:
        """Push appended entries to the OS (and the disk, with fsync); rotate a full segment."""
        if self._file is None:
            return
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())
        if self._file.tell() >= self.segment_bytes:
            self.seal()

    def seal(self) -> None:
        """Close the active segment; the next append starts a new one. Releases its lock."""
        if self._file is not None:
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
            self._file.close()  # closing releases the flock
            self._file = None

    close = seal

    def segments(self) -> list[Path]:
        return sorted(self.directory.glob(PATTERN))

    @contextmanager
    def claim(self, path: Path) -> Iterator[list[dict[str, Any]] | None]:
        """The entries of a segment nobody else holds, or None. Unlinked on a clean exit."""
        try:
            f = path.open("rb")
        except FileNotFoundError:
            yield None
            return
        with f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
            if not path.exists():  # replayed and removed by another process meanwhile
                yield None
                return
            entries = list(_parse(f.read(), path))
            yield entries
            path.unlink(missing_ok=True)

    def read_all(self) -> list[dict[str, Any]]:
        """Every entry in the directory (tests and tools; ignores locks)."""
        self.sync()
        return [e for p in self.segments() for e in _parse(p.read_bytes(), p)]

    def _active(self) -> IO[bytes]:
        if self._file is None:
            self._seq += 1
            name = f"predictions-{time.time_ns():020d}-{os.getpid()}-{self._seq}.jsonl"
            f = (self.directory / name).open("ab")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._file = f
        return self._file


def _parse(data: bytes, path: Path) -> Iterator[dict[str, Any]]:
    """Entries of one segment; a torn last line (a crash mid-write) is skipped and logged."""
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            log.warning("spool_line_unreadable", segment=str(path), line=n)
            continue
        if isinstance(entry, dict):
            yield entry
