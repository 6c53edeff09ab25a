"""The on-disk prediction log: append-only JSONL segments, written ahead of everything else.

Every entry is appended here first, with one unbuffered `os.write` on an O_APPEND descriptor
(a few microseconds: the bytes land in the OS page cache), so it survives a crash of the
process however abrupt (SIGKILL, OOM kill, segfault) as soon as `record` returns. With
`fsync` the writer task also fsyncs the active segment after each batch, which bounds what a
machine crash can take to about one flush interval.

With Redis configured a segment is a write-ahead log: it is rotated by size or age and, once
sealed and every entry of it is settled, either deleted (all confirmed in Redis), kept for
`keep_confirmed_s` (still locked) and then checked against Redis before it goes, or released
(its lock dropped) for the replayer, which re-sends it whole; the stream writer's high-water
mark per (segment, line) makes re-sending exactly-once. Without Redis the segments are the log
itself and are never deleted.

Several gateway workers (and replicas on one volume) may share one directory. Each process
writes its own segments (`predictions-<time_ns>-<pid>-<random>-<seq>.jsonl`: the name is the
segment's id in Redis, unique across hosts) and holds an exclusive `flock` on each until it is
settled; a replayer claims a segment with a non-blocking `flock` (the lock per segment), so it
never reads a segment that is still being written or awaited, and a dead process's segments
are claimable at once.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import structlog

log = structlog.get_logger(__name__)

PATTERN = "predictions-*.jsonl"
#: An empty segment younger than this may be one its writer has not locked yet.
_EMPTY_GRACE_S = 60.0
_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE


@dataclass(eq=False)
class Segment:
    """One file this process wrote, with the bookkeeping that says when it may go."""

    path: Path
    fd: int
    opened_at: float
    size: int = 0
    synced: int = 0
    #: Entries appended.
    written: int = 0
    #: Entries handed to the in-memory fast path and not yet settled (confirmed or failed).
    inflight: int = 0
    #: Entries confirmed in Redis; `written == acked` lets the segment be deleted.
    acked: int = 0
    sealed: bool = False
    #: The first line that missed the fast path (Redis down, buffer full; 0: none). Later lines
    #: must not overtake it into Redis (the high-water mark), so from there the segment goes by
    #: replay only.
    failed_at: int = 0
    #: Highest line per model, to check the segment's marks in Redis before deleting it.
    last: dict[str, int] = field(default_factory=dict)
    #: When every entry was confirmed (kept segments only).
    confirmed_at: float = 0.0

    @property
    def failed(self) -> bool:
        return self.failed_at > 0

    def fail(self, line: int) -> None:
        if not self.failed_at or line < self.failed_at:
            self.failed_at = line

    def holds(self, line: int) -> bool:
        """Must this line wait for the replay (it is not before the first failed one)?"""
        return self.failed_at > 0 and line >= self.failed_at

    @property
    def id(self) -> str:
        return segment_id(self.path)


def segment_id(path: Path) -> str:
    """The segment's name in Redis (its high-water marks)."""
    return path.stem


def encode(entry: dict[str, Any]) -> bytes:
    return orjson.dumps(entry, option=_OPTS, default=str)


class Spool:
    def __init__(
        self,
        directory: Path,
        fsync: bool = False,
        segment_bytes: int = 16 << 20,
        max_age_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        keep_confirmed_s: float = 0.0,
    ) -> None:
        self.directory = directory
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        #: Rotate the active segment once it is this old (0: by size only).
        self.max_age_s = max_age_s
        self.clock = clock
        self.keep_confirmed_s = keep_confirmed_s
        self._token = os.urandom(4).hex()
        self._active: Segment | None = None
        #: Sealed segments still locked: awaiting in-flight entries.
        self._sealed: list[Segment] = []
        #: Confirmed segments kept (locked) for keep_confirmed_s.
        self._kept: list[Segment] = []
        #: Segments deleted since the writer last looked: their marks in Redis can go.
        self.deleted: list[Segment] = []
        self._seq = 0
        #: Entries waiting for a replay (an estimate for the lag).
        self.pending = 0
        #: Segments unlocked for a replay so far (the writer replays when this grows).
        self.released = 0

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    # -- appending (request path) -----------------------------------------------------------
    def append_one(self, entry: dict[str, Any]) -> Segment:
        """One entry, one `os.write`; raises OSError if unwritable. Returns its segment, whose
        `written` is then the entry's line number."""
        seg = self._write(encode(entry), 1)
        seg.last[str(entry.get("model") or "unknown")] = seg.written
        return seg

    def append(self, entries: list[dict[str, Any]]) -> Segment | None:
        """Several entries in one `os.write` (tools and tests)."""
        if not entries:
            return None
        return self._write(b"".join(encode(e) for e in entries), len(entries))

    def _write(self, data: bytes, n: int) -> Segment:
        # Rotation, fsync and unlinking happen in `sync`, off the request path.
        seg = self._active or self._open_segment()
        view = memoryview(data)
        try:
            while view:  # a regular file takes it whole unless the disk is full
                view = view[os.write(seg.fd, view) :]
        except OSError:
            if len(view) < len(data):  # a torn line: later entries go to a fresh segment
                seg.size += len(data) - len(view)
                self._retire(seg)
            raise
        seg.size += len(data)
        seg.written += n
        return seg

    def _open_segment(self) -> Segment:
        self._seq += 1
        name = f"predictions-{time.time_ns():020d}-{os.getpid()}-{self._token}-{self._seq}.jsonl"
        path = self.directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        self._active = Segment(path, fd, self.clock())
        return self._active

    # -- upkeep (writer task) ---------------------------------------------------------------
    @property
    def active(self) -> Segment | None:
        return self._active

    def sync(self) -> None:
        """fsync the active segment when configured; rotate it when big or old enough."""
        seg = self._active
        if seg is None:
            return
        self._fsync(seg)
        if (
            seg.failed
            or seg.size >= self.segment_bytes
            or (self.max_age_s > 0 and self.clock() - seg.opened_at >= self.max_age_s)
        ):
            self.seal()

    def seal(self) -> None:
        """End the active segment; the next append starts a new one. It keeps its lock until
        `collect` settles it."""
        seg = self._active
        if seg is None:
            return
        self._fsync(seg)
        self._retire(seg)
        self.collect()

    def _fsync(self, seg: Segment) -> None:
        if self.fsync and seg.synced < seg.size:
            os.fsync(seg.fd)
            seg.synced = seg.size

    def _retire(self, seg: Segment) -> None:
        self._active = None
        seg.sealed = True
        self._sealed.append(seg)

    def collect(self) -> int:
        """Settle sealed segments with nothing in flight: delete those all confirmed, unlock
        the rest for the replayer. Returns how many were unlocked for a replay."""
        released = 0
        keep = []
        for seg in self._sealed:
            if seg.inflight > 0:
                keep.append(seg)
                continue
            if seg.acked >= seg.written and self.keep_confirmed_s > 0:
                seg.confirmed_at = self.clock()
                self._kept.append(seg)  # still locked: nobody else replays it meanwhile
                continue
            if seg.acked >= seg.written:
                self._delete(seg)
                continue
            released += 1
            os.close(seg.fd)  # closing releases the flock
        self._sealed = keep
        self.released += released
        return released

    def _delete(self, seg: Segment) -> None:
        seg.path.unlink(missing_ok=True)  # before the lock goes: nobody replays it
        os.close(seg.fd)  # closing releases the flock
        self.deleted.append(seg)

    def kept_due(self) -> list[Segment]:
        """Kept segments whose time is up: check them in Redis, then `drop` or `release`."""
        now = self.clock()
        return [s for s in self._kept if now - s.confirmed_at >= self.keep_confirmed_s]

    def drop(self, seg: Segment) -> None:
        """A kept segment Redis still has all of: delete it."""
        self._kept.remove(seg)
        self._delete(seg)

    def release(self, seg: Segment) -> None:
        """A kept segment Redis lost entries of: unlock it for a replay."""
        self._kept.remove(seg)
        os.close(seg.fd)
        self.released += 1

    def close(self) -> None:
        """Seal and unlock everything; what is not confirmed (or still kept) stays on disk
        for a replay, which the high-water marks make a no-op for what Redis has."""
        self.seal()
        for seg in self._sealed + self._kept:
            os.close(seg.fd)
        self._sealed = []
        self._kept = []

    # -- replaying ---------------------------------------------------------------------------
    def segments(self) -> list[Path]:
        return sorted(self.directory.glob(PATTERN))

    @contextmanager
    def claim(self, path: Path) -> Iterator[list[dict[str, Any]] | None]:
        """The entries of a segment nobody else holds, or None. Unlinked on a clean exit."""
        with self.claim_lines(path) as lines:
            yield None if lines is None else [e for _, e in lines]

    @contextmanager
    def claim_lines(self, path: Path) -> Iterator[list[tuple[int, dict[str, Any]]] | None]:
        """`claim`, each entry with its line number (its position in Redis's marks)."""
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
            data = f.read()
            if not data and time.time() - os.fstat(f.fileno()).st_mtime < _EMPTY_GRACE_S:
                # Just created: its writer opens it, then locks it; between the two a claimer
                # could take it and unlink it under the writer. Leave it alone.
                yield None
                return
            entries = list(_parse(data, path))
            yield entries
            path.unlink(missing_ok=True)

    def read_all(self) -> list[dict[str, Any]]:
        """Every entry in the directory (tests and tools; ignores locks)."""
        return [e for p in self.segments() for _, e in _parse(p.read_bytes(), p)]


def _parse(data: bytes, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
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
            yield n, entry
