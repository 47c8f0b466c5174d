"""A user application for the worker runtime tests: ``python -m worker --app tests.apps:app``."""

from __future__ import annotations

import os
import signal
import threading
import time

from worker import JobContext, Worker

app = Worker(builtins=False)


@app.handler("add")
def add(job: JobContext) -> dict[str, object]:
    """A plain function: runs in the worker's thread pool, not on the event loop."""
    return {"sum": sum(job.args["numbers"]), "thread": threading.current_thread().name}


@app.handler("shout")
async def shout(job: JobContext) -> str:
    return f"{job.args['text'].upper()} (attempt {job.attempt}, queue {job.queue})"


@app.handler("reverse-bytes")
async def reverse_bytes(job: JobContext) -> bytes:
    return job.payload[::-1]


@app.handler("not-json")
async def not_json(job: JobContext) -> object:
    return {1, 2, 3}


@app.handler("lookup")
def lookup(job: JobContext) -> object:
    """Looks ``args.key`` up in an empty table: a KeyError, as a handler's bug would raise."""
    table: dict[str, object] = {}
    return table[str(job.args["key"])]


@app.handler("own-timeout")
async def own_timeout(job: JobContext) -> None:
    """Raises a TimeoutError of its own (a call it made timed out), well within the job's timeout."""
    raise TimeoutError("upstream took too long")


@app.handler("block")
def block(job: JobContext) -> None:
    """Blocks its thread for ``args.seconds``, ignoring any timeout (threads cannot be stopped)."""
    time.sleep(job.args["seconds"])


chaos = Worker()  # the built-in handlers, and one that kills its own worker


@chaos.handler("poison")
async def poison(job: JobContext) -> None:
    """Kills the worker process running it, as a crash would (every attempt, on every worker)."""
    os.kill(os.getpid(), signal.SIGKILL)
