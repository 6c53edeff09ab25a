"""Content addressing: the sha256 of every file and one version digest over all of them.

The version digest is the sha256 of the sorted `(path, sha256)` pairs, one `path\0sha\n` line
each, so it names the content of a version independently of its number: publishing the same
files twice is detected, and a tampered file changes it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from gateway.progress import QUIET, Progress


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 16), b""):
            digest.update(chunk)
    return digest.hexdigest()


def version_digest(files: Mapping[str, str]) -> str:
    """`sha256:<hex>` over the sorted (relative path, sha256) pairs of a version's files."""
    h = hashlib.sha256()
    for path, sha in sorted(files.items()):
        h.update(f"{path}\0{sha}\n".encode())
    return "sha256:" + h.hexdigest()


def hash_tree(root: Path, progress: Progress = QUIET, desc: str = "hashing") -> dict[str, str]:
    """Relative POSIX path -> sha256 of every regular file under `root` (caches skipped)."""
    sizes = {
        p: p.stat().st_size
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.relative_to(root).parts
    }
    found = {}
    with progress.task(desc, sum(sizes.values()), "B", unit_scale=True) as task:
        for p, size in sizes.items():
            found[p.relative_to(root).as_posix()] = sha256_file(p)
            task.advance(size)
    return found
