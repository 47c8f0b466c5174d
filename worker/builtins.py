"""Built-in handlers for demos and tests: ``echo``, ``sleep``, ``fail``, ``flaky``, ``count`` and ``gather``."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .registry import Fatal, JobContext, Registry


class HandlerFailed(Exception):
    """Raised by the ``fail`` handler."""


async def echo(job: JobContext) -> Any:
    """Returns its args unchanged (or its payload, when it was given bytes and no args)."""
    if job.args is None and job.payload:
        return job.payload
    return job.args


async def sleep(job: JobContext) -> dict[str, float]:
    """Sleeps ``args.seconds`` (a number, 0-3600) and returns ``{"slept": seconds}``."""
    seconds = job.args.get("seconds", 0) if isinstance(job.args, dict) else 0
    if not isinstance(seconds, int | float) or not 0 <= seconds <= 3600:
        raise ValueError("args.seconds must be a number between 0 and 3600")
    await asyncio.sleep(seconds)
    return {"slept": seconds}


def fail(job: JobContext) -> None:
    """Always raises; ``args.message`` sets the error text, ``args.fatal`` (true) makes it a failure
    for good (:class:`Fatal`: not retried). Runs in the thread pool."""
    args = job.args if isinstance(job.args, dict) else {}
    message = str(args.get("message", "failed on purpose"))
    if args.get("fatal") is True:
        raise Fatal(message)
    raise HandlerFailed(message)


def flaky(job: JobContext) -> dict[str, int]:
    """Raises on the attempts before ``args.succeed_at`` (default 2), then returns ``{"attempt": n}``."""
    succeed_at = job.args.get("succeed_at", 2) if isinstance(job.args, dict) else 2
    if job.attempt < succeed_at:
        raise HandlerFailed(f"attempt {job.attempt} fails on purpose")
    return {"attempt": job.attempt}


def count(job: JobContext) -> dict[str, int]:
    """Counts to ``args.steps`` (1-10,000,000; default 10) over ``args.seconds`` (0-3600; default 1),
    reporting progress at every step ("step i of n"), and returns ``{"steps": n}``, or with
    ``args.fail`` (true) raises at the end (a failure that is retried). Runs in the thread pool."""
    args = job.args if isinstance(job.args, dict) else {}
    steps, seconds = args.get("steps", 10), args.get("seconds", 1)
    if not isinstance(steps, int | float) or not 1 <= steps <= 10_000_000:
        raise Fatal("args.steps must be a number between 1 and 10000000")
    if not isinstance(seconds, int | float) or not 0 <= seconds <= 3600:
        raise Fatal("args.seconds must be a number between 0 and 3600")
    n = int(steps)
    began = time.monotonic()
    for i in range(1, n + 1):
        job.progress(i / n, f"step {i} of {n}")
        pause = began + seconds * i / n - time.monotonic()
        if pause > 0.001:
            time.sleep(pause)
    if args.get("fail") is True:
        raise HandlerFailed(f"counted to {n}, then failed on purpose")
    return {"steps": n}


async def gather(job: JobContext) -> dict[str, Any]:
    """Returns the results of the jobs it depends on, by id: ``{"dependencies": {...}}``."""
    return {"dependencies": dict(job.dependencies)}


def register_builtins(registry: Registry) -> None:
    registry.add("echo", echo)
    registry.add("sleep", sleep)
    registry.add("fail", fail)
    registry.add("flaky", flaky)
    registry.add("count", count)
    registry.add("gather", gather)
