"""The job function the benchmark's RQ workers run (RQ imports it by its dotted path)."""

from __future__ import annotations

from typing import Any


def echo(value: Any) -> Any:
    """Returns its input."""
    return value
