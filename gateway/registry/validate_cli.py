"""`models validate`: run the validation checks against a real tritonserver, write the report."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def add_validate_parser(msub: Any, common: Callable[[Any], None]) -> None:
    return None
