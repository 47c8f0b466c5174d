"""Built-in handlers for demos and tests: ``echo``, ``sleep``, ``fail`` and ``flaky``."""

from __future__ import annotations

import asyncio
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


def register_builtins(registry: Registry) -> None:
    registry.add("echo", echo)
    registry.add("sleep", sleep)
    registry.add("fail", fail)
    registry.add("flaky", flaky)
