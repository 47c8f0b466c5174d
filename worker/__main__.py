"""``python -m worker``: run a worker until SIGTERM or SIGINT (a second signal exits at once)."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

from common import gc_tuning
from common.logs import configure_logging

from .config import WorkerSettings
from .runtime import Worker

log = logging.getLogger("worker")


def load_app(spec: str) -> Worker:
    """Imports ``module:attr`` and returns the Worker it names.

    Raises ValueError when the spec is malformed or does not name a Worker.
    """
    if not spec:
        return Worker()
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--app {spec!r}: expected module:attribute")
    target = getattr(importlib.import_module(module_name), attr)
    if not isinstance(target, Worker):
        raise ValueError(f"--app {spec!r}: {attr} is not a worker.Worker")
    return target


async def main(worker: Worker, settings: WorkerSettings) -> None:
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)

    def second_signal() -> None:
        log.warning("second signal: exiting at once")
        os._exit(1)

    def first_signal() -> None:
        worker.stop()
        for sig in signals:
            loop.add_signal_handler(sig, second_signal)

    for sig in signals:
        loop.add_signal_handler(sig, first_signal)
    await worker.run(settings)


def cli(argv: Sequence[str] | None = None) -> None:
    try:
        settings = WorkerSettings.from_env().with_args(argv).validate()
        sys.path.insert(0, os.getcwd())
        worker = load_app(settings.app)
    except (ValueError, ImportError, AttributeError) as exc:
        sys.exit(f"worker: {exc}")
    configure_logging(settings.log_level, settings.log_format)
    log.info("starting with %r", settings)
    gc_tuning.tune()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(worker, settings))
    else:
        uvloop.run(main(worker, settings))
    if worker.threads_left:
        # Python would wait for handler threads at exit, and a thread cannot be stopped; their jobs
        # were handed back already, so exit without them.
        log.warning("exiting with %d handler threads still running", worker.threads_left)
        logging.shutdown()
        os._exit(0)


if __name__ == "__main__":
    cli()
