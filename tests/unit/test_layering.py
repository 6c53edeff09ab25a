"""The request path is one stack: no layer imports one above it (checked on the source)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Bottom to top. A module may import its own floor and those below, never one above.
FLOORS: list[tuple[str, ...]] = [
    ("gateway.errors", "gateway.clock", "gateway.types", "gateway.tensors", "gateway.stats",
     "gateway.tracing", "gateway.progress"),
    ("gateway.backends.base", "gateway.backends.triton"),
    ("gateway.resilience.admission", "gateway.resilience.breaker", "gateway.resilience.retry",
     "gateway.backends.pool"),
    ("gateway.batching",),
    ("gateway.resilience.cache", "gateway.resilience.fallback"),
    ("gateway.service",),
    ("gateway.api.oip", "gateway.api.routes", "gateway.api.middleware", "gateway.app"),
]  # fmt: skip


def floor_of(module: str) -> int | None:
    for i, floor in enumerate(FLOORS):
        if module in floor:
            return i
    return None


def imports(module: str) -> set[str]:
    path = ROOT / (module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.startswith("gateway")}


@pytest.mark.parametrize("module", [m for floor in FLOORS for m in floor])
def test_no_layer_imports_one_above_it(module: str) -> None:
    mine = floor_of(module)
    assert mine is not None
    above = {m for m in imports(module) if (f := floor_of(m)) is not None and f > mine}
    assert not above, f"{module} (floor {mine}) imports from above: {sorted(above)}"
