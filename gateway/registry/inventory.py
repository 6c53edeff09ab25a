"""`models list / verify / retire`: what the repository holds, whether it is intact, pruning.

Where a version is live comes from the route files only (champion, challenger with its weight,
segment, shadow, fallback): the routes are the one mutable fact about versions.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import structlog

from gateway.errors import RegistryError
from gateway.registry.digest import sha256_file, version_digest
from gateway.registry.layout import MANIFEST, read_manifest, report_path, version_dirs
from gateway.registry.publish import STAGING, manifest_digest

log = structlog.get_logger(__name__)
MIN_KEEP = 10  # the spec: the last 10 versions of every model stay loadable
_ALLOWED_UNLISTED = {MANIFEST, "__pycache__"}


@dataclass(frozen=True, slots=True)
class VersionInfo:
    model: str
    version: int
    digest: str
    live: tuple[str, ...]  # e.g. "risk.yaml: champion", "risk.yaml: challenger 10%"


def live_versions(routes_dir: Path) -> dict[tuple[str, str], list[str]]:
    """(target model, version) -> every place a route file names it."""
    from gateway.routing.table import parse_route

    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(routes_dir.glob("*.yaml")):
        route = parse_route(path.read_bytes(), str(path))
        where = f"{path.name}"

        def add(model: str, version: str, role: str, _where: str = where) -> None:
            found[(model, version)].append(f"{_where}: {role}")

        add(route.champion.model, route.champion.version, "champion")
        for arm in route.split.arms if route.split is not None else ():
            if arm.name != "champion":
                add(arm.target.model, arm.target.version, f"challenger {arm.buckets / 100:g}%")
        for seg in route.segments:
            add(seg.target.model, seg.target.version, f"segment {seg.name}")
        for sh in route.shadows:
            add(sh.target.model, sh.target.version, f"shadow {sh.sample:g}")
        if route.fallback.target is not None:
            add(route.fallback.target.model, route.fallback.target.version, "fallback")
    return dict(found)


def list_versions(repo: Path, model: str, routes_dir: Path) -> list[VersionInfo]:
    live = live_versions(routes_dir)
    return [
        VersionInfo(
            model,
            int(vdir.name),
            manifest_digest(read_manifest(vdir)),
            tuple(live.get((model, vdir.name), ())),
        )
        for vdir in version_dirs(repo, model)
    ]


def verify_version(vdir: Path) -> list[str]:
    """Every problem of one version folder, each naming the file; empty when intact."""
    try:
        manifest = read_manifest(vdir)
    except RegistryError as exc:
        return [str(exc)]
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return [f"{vdir / MANIFEST}: lists no files"]
    problems = []
    for rel, want in sorted(files.items()):
        path = vdir / rel
        if not path.is_file():
            problems.append(f"{path}: listed in the manifest but missing")
        elif (have := sha256_file(path)) != want:
            problems.append(f"{path}: sha256 {have} != manifest {want} (tampered)")
    listed = {Path(rel).parts[0] for rel in files}
    for entry in sorted(os.listdir(vdir)):
        if entry not in listed and entry not in _ALLOWED_UNLISTED:
            problems.append(f"{vdir / entry}: present but not listed in the manifest")
    recorded = manifest.get("digest")
    if isinstance(recorded, str) and recorded != version_digest(files):
        problems.append(f"{vdir / MANIFEST}: digest {recorded} does not match its files list")
    return problems


def retire(
    repo: Path, model: str, routes_dir: Path, keep: int = MIN_KEEP, dry_run: bool = False
) -> list[int]:
    """Delete versions older than the newest `keep` (at least 10) that no route names."""
    if keep < MIN_KEEP:
        raise RegistryError(f"--keep {keep}: at least the last {MIN_KEEP} versions are kept")
    live = live_versions(routes_dir)
    dirs = version_dirs(repo, model)
    doomed = [d for d in dirs[: max(0, len(dirs) - keep)] if (model, d.name) not in live]
    if dry_run:
        return [int(d.name) for d in doomed]
    staging = repo / model / STAGING
    for vdir in doomed:
        # Rename out of Triton's sight first, so the version vanishes whole, then delete.
        staging.mkdir(exist_ok=True)
        trash = Path(tempfile.mkdtemp(dir=staging, prefix=f"retire-{vdir.name}-"))
        os.rename(vdir, trash / vdir.name)
        shutil.rmtree(trash)
        report_path(repo, model, vdir.name).unlink(missing_ok=True)
        log.info("version_retired", model=model, version=vdir.name)
    if staging.is_dir() and not any(staging.iterdir()):
        staging.rmdir()
    return [int(d.name) for d in doomed]
