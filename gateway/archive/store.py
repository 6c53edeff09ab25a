"""Where the archive lives: a local directory, or any fsspec URL whose package is installed.

Layout, the same on both:

    <root>/predictions/model=<model>/date=<YYYY-MM-DD>/part-<first-id>_<last-id>.parquet
    <root>/aggregates/model=<model>/date=<YYYY-MM-DD>/daily.parquet

A file appears whole or not at all. Locally: write a temp file beside it, fsync it, rename it
into place, fsync the directory (then the rename survives a machine crash too). Through
fsspec: write a temp object, then move it to its name (on object stores the copy that makes
the final name appears at once). A crashed run leaves at most a temp file, which the next
listing of that partition removes (local) or ignores (fsspec).

fsspec is imported only for a URL; local paths need nothing beyond the standard library.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from gateway.errors import ArchiveUnavailable

PREDICTIONS = "predictions"
AGGREGATES = "aggregates"
_TMP = ".tmp-"


class ArchiveStore:
    def __init__(self, location: str | Path) -> None:
        text = str(location)
        self.fs: Any = None
        if "://" in text and not text.startswith("file://"):
            try:
                import fsspec
            except ImportError as exc:
                raise ArchiveUnavailable(
                    f"archive URL {text!r} needs fsspec (pip install fsspec and the "
                    "protocol's package, e.g. s3fs)"
                ) from exc
            try:
                self.fs, root = fsspec.core.url_to_fs(text)
            except (ImportError, ValueError) as exc:
                raise ArchiveUnavailable(f"archive URL {text!r}: {exc}") from exc
            self.protocol = text.split("://", 1)[0]
            self.root = str(root).rstrip("/")
        else:
            self.protocol = ""
            self.root = str(Path(text.removeprefix("file://")).absolute())

    @property
    def local(self) -> bool:
        return self.fs is None

    def __repr__(self) -> str:
        return f"ArchiveStore({self.url(self.root)!r})"

    # -- paths -------------------------------------------------------------------------------
    def partition(self, dataset: str, model: str, date: str) -> str:
        return f"{self.root}/{dataset}/model={model}/date={date}"

    def url(self, path: str) -> str:
        """A path as DuckDB reads it: plain locally, with the protocol through fsspec."""
        return path if self.local else f"{self.protocol}://{path}"

    # -- listing -----------------------------------------------------------------------------
    def files(self, directory: str) -> list[str]:
        """Names of the finished files in a directory (none if it does not exist); a crashed
        run's temp files are removed on the way (local; nothing else writes here)."""
        try:
            if self.local:
                names = os.listdir(directory)
            else:
                names = [
                    p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(directory, detail=False)
                ]
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ArchiveUnavailable(f"cannot list {self.url(directory)}: {exc}") from exc
        out = []
        for name in names:
            if _TMP in name:
                if self.local:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(directory, name))
                continue
            out.append(name)
        return sorted(out)

    def partitions(self, dataset: str) -> list[tuple[str, dt.date, str]]:
        """(model, date, directory) of every date partition of a dataset."""
        out = []
        base = f"{self.root}/{dataset}"
        for mdir in self.files(base):
            if not mdir.startswith("model="):
                continue
            for ddir in self.files(f"{base}/{mdir}"):
                if not ddir.startswith("date="):
                    continue
                try:
                    day = dt.date.fromisoformat(ddir[len("date=") :])
                except ValueError:
                    continue  # not ours
                out.append((mdir[len("model=") :], day, f"{base}/{mdir}/{ddir}"))
        return out

    def delete_partition(self, directory: str) -> None:
        try:
            if self.local:
                shutil.rmtree(directory)
                _fsync_dir(os.path.dirname(directory))
            else:
                self.fs.rm(directory, recursive=True)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ArchiveUnavailable(f"cannot delete {self.url(directory)}: {exc}") from exc

    # -- writing -----------------------------------------------------------------------------
    def write_table(self, directory: str, name: str, table: pa.Table) -> str:
        """Write `table` as `directory/name`, atomically and durably; returns the path."""
        final = f"{directory}/{name}"
        tmp = f"{directory}/.{name}{_TMP}{os.getpid()}"
        try:
            if self.local:
                self._write_local(directory, tmp, final, table)
            else:
                self.fs.makedirs(directory, exist_ok=True)
                with self.fs.open(tmp, "wb") as f:
                    pq.write_table(table, f, compression="zstd")
                self.fs.mv(tmp, final)
        except OSError as exc:
            raise ArchiveUnavailable(f"cannot write {self.url(final)}: {exc}") from exc
        return final

    def _write_local(self, directory: str, tmp: str, final: str, table: pa.Table) -> None:
        _makedirs_durably(Path(directory))
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(directory)  # the rename itself, before the caller XACKs


def _makedirs_durably(directory: Path) -> None:
    """mkdir -p, fsyncing the parent of every directory it creates."""
    missing = []
    d = directory
    while not d.exists():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        _fsync_dir(str(d.parent))


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
