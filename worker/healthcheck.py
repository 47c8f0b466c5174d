"""``python -m worker.healthcheck``: exit 0 when the worker's health file is fresh, else 1.

The worker touches ``JOBGATE_HEALTH_FILE`` after every successful heartbeat, so a stale file
means the worker is stuck or cannot reach Redis. Meant for container health checks.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence


def file_age_s(path: str) -> float:
    """Seconds since ``path`` was last modified. Raises OSError when it cannot be read."""
    return time.time() - os.stat(path).st_mtime


def check(path: str, max_age_s: float) -> str | None:
    """None when ``path`` was modified within ``max_age_s`` seconds, else the reason it is not."""
    if not path:
        return "no health file: set JOBGATE_HEALTH_FILE or pass --file"
    try:
        age = file_age_s(path)
    except OSError as exc:
        return f"cannot read health file {path}: {exc.strerror or exc}"
    if age > max_age_s:
        return f"health file {path} is {age:.1f}s old (max {max_age_s:g}s): no heartbeat"
    return None


def cli(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m worker.healthcheck", description="Exit 0 when the worker's health file is fresh, else 1."
    )
    parser.add_argument("--file", default=os.environ.get("JOBGATE_HEALTH_FILE", ""), help="env JOBGATE_HEALTH_FILE")
    parser.add_argument("--max-age-s", type=float, default=10.0, help="oldest acceptable heartbeat (default 10)")
    args = parser.parse_args(argv)
    reason = check(args.file, args.max_age_s)
    if reason:
        sys.exit(f"unhealthy: {reason}")


if __name__ == "__main__":
    cli()
