"""`models publish`: copy an artifact into the next version folder, atomically, never over one.

The version is assembled in `<model>/.publish/<random>/` (Triton and the catalog ignore it), every
file and the folder fsynced, then renamed to `<model>/<N+1>/` in one step: a reader sees no
version or a whole one. Publishing content whose digest an existing version already has creates
nothing and names that version. A model without `model_warmup` gets one from the first
published version's golden inputs (gateway.registry.warmup).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import structlog

from gateway.errors import RegistryError
from gateway.progress import QUIET, Progress
from gateway.registry.digest import hash_tree, version_digest
from gateway.registry.layout import MANIFEST, read_artifact, read_manifest, version_dirs
from gateway.registry.manifest import build_manifest
from gateway.registry.warmup import ensure_warmup

log = structlog.get_logger(__name__)
STAGING = ".publish"


@dataclass(frozen=True, slots=True)
class Published:
    model: str
    version: int
    digest: str
    created: bool  # False: identical content was already that version
    path: Path


def manifest_digest(manifest: dict[str, object]) -> str:
    """A version's digest: recorded by publish, or recomputed from `files` (older manifests)."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise RegistryError("manifest lists no files")
    recorded = manifest.get("digest")
    return recorded if isinstance(recorded, str) else version_digest(files)


def publish(
    repo: Path,
    model: str,
    artifact_dir: Path,
    run_id: str | None = None,
    version: int | None = None,
    progress: Progress = QUIET,
) -> Published:
    """Publish `artifact_dir` as the next version of `model` (or exactly `version`, which must
    be the next one: train.py rebuilds numbered versions in order)."""
    artifact = read_artifact(artifact_dir)
    files = hash_tree(artifact.files_dir, progress, f"{model}: hashing")
    digest = version_digest(files)
    existing = version_dirs(repo, model)
    for vdir in existing:
        if manifest_digest(read_manifest(vdir)) == digest:
            log.info("publish_identical", model=model, version=vdir.name, digest=digest)
            return Published(model, int(vdir.name), digest, False, vdir)
    nxt = int(existing[-1].name) + 1 if existing else 1
    if version is not None and version != nxt:
        raise RegistryError(f"{model}: version {version} requested, but the next one is {nxt}")
    if run_id is None and not artifact.training.get("training_run_id"):
        raise RegistryError("no training run id: pass --run-id or set it in training.json")
    target = repo / model / str(nxt)
    config = (repo / model / "config.pbtxt").read_text()
    manifest = build_manifest(artifact, model, nxt, files, config, run_id, progress)
    staging = repo / model / STAGING
    staging.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=staging, prefix=f"{nxt}-"))
    try:
        for rel in progress.track(files, f"{model}/{nxt}: copying", "file", note=str):
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(artifact.files_dir / rel, dest)
        if hash_tree(tmp, progress, f"{model}/{nxt}: verifying") != files:  # changed under us
            raise RegistryError(f"{artifact.files_dir}: files changed while being copied")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync_tree(tmp)
        if target.exists():
            raise RegistryError(f"{target} already exists; a version is never overwritten")
        os.rename(tmp, target)  # atomic on one filesystem; fails on a non-empty target
        _fsync_dir(target.parent)
    except OSError as exc:
        raise RegistryError(f"publishing {model}/{nxt} failed: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if staging.is_dir() and not any(staging.iterdir()):
            staging.rmdir()
    if ensure_warmup(repo / model, manifest):
        log.info("warmup_added", model=model, version=nxt)
    log.info("published", model=model, version=nxt, digest=digest)
    return Published(model, nxt, digest, True, target)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):  # readable by Triton's user; mkdtemp made the folder 0700
        path.chmod(0o644 if path.is_file() else 0o755)
    root.chmod(0o755)
    for path in sorted(root.rglob("*"), reverse=True):  # files before their folders
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            _fsync_dir(path)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
