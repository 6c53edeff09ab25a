"""Validation reports (`<model>/validation/<N>.json`) and the gate that requires one.

A report binds a verdict to a version's digest: a report for other content (a version folder
rebuilt under the same number) is stale and refuses like a failed one. `ValidationGate` is what
the reloader (`VersionGate`), `routes set-weight` and the rollout controller consult, when
`routing.require_validation` is on, before a version may take traffic.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gateway.registry.layout import read_manifest, report_path
from gateway.registry.publish import manifest_digest


def write_report(repo: Path, model: str, version: str, report: dict[str, Any]) -> Path:
    path = report_path(repo, model, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{version}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(report, indent=2) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def refusal(repo: Path, model: str, version: str) -> str | None:
    """Why `model@version` may not take traffic, or None when its report passes."""
    path = report_path(repo, model, version)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        return (
            f"{model}@{version} has no validation report ({path}); run "
            f"`python -m gateway models validate --model {model} --version {version}`"
        )
    except (OSError, ValueError) as exc:
        return f"{model}@{version}: unreadable validation report {path}: {exc}"
    try:
        digest = manifest_digest(read_manifest(path.parent.parent / version))
    except Exception as exc:
        return f"{model}@{version}: cannot read its manifest: {exc}"
    if report.get("digest") != digest:
        return f"{model}@{version}: validation report {path} is for other content (stale)"
    # the first failure, not a check skipped because of it
    checks = report.get("checks", [])
    failed = [c for c in checks if not c.get("passed") and not _skipped(c)] or [
        c for c in checks if not c.get("passed")
    ]
    if failed or not report.get("passed"):
        first = failed[0] if failed else {"name": "?", "detail": "report not passed"}
        return (
            f"{model}@{version} failed validation check '{first['name']}': {first['detail']} "
            f"({path})"
        )
    return None


def report_status(repo: Path, model: str, version: str) -> str:
    """One word for `models list`: validated, unvalidated, stale or failed:<check>."""
    path = report_path(repo, model, version)
    if not path.is_file():
        return "unvalidated"
    why = refusal(repo, model, version)
    if why is None:
        return "validated"
    if "stale" in why:
        return "stale"
    try:
        checks = json.loads(path.read_text())["checks"]
        failed = [c["name"] for c in checks if not c["passed"] and not _skipped(c)]
    except (OSError, ValueError, KeyError, TypeError):
        return "failed"
    return "failed:" + ",".join(failed)


def _skipped(check: dict[str, Any]) -> bool:
    return str(check.get("detail", "")).startswith("not run")


class ValidationGate:
    """Refuses targets without a passing report for their current content."""

    def __init__(self, repository: Path) -> None:
        self.repository = repository

    def refusal(self, model: str, version: str) -> str | None:
        return refusal(self.repository, model, version)

    def require(self, targets: Iterable[Any]) -> None:
        """Raise RouteError naming the first target (model, version) without a passing report."""
        from gateway.routing.table import RouteError

        for t in sorted(targets, key=str):
            why = self.refusal(t.model, t.version)
            if why is not None:
                raise RouteError(why)
