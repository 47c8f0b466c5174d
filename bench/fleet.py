"""``python -m bench.fleet --workers N``: N jobgate workers in one process, for the benchmarks that
need many of them (a worker process each would take more memory than the machine has to spare).

Each is a ``worker.Worker`` with the built-in handlers, run on one event loop with the settings
``python -m worker`` takes from the environment (``JOBGATE_*``); worker i's id is
``<JOBGATE_WORKER_ID>-<i>`` (``fleet-<pid>-<i>`` without one). SIGTERM or SIGINT drains and stops
them all, as it does one worker.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import sys

import uvloop

from common import gc_tuning
from common.logs import configure_logging
from worker import Worker
from worker.config import WorkerSettings


async def run(n: int, settings: WorkerSettings) -> None:
    workers = [Worker() for _ in range(n)]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: [w.stop() for w in workers])
    prefix = settings.worker_id or f"fleet-{os.getpid()}"
    await asyncio.gather(
        *(w.run(dataclasses.replace(settings, worker_id=f"{prefix}-{i}")) for i, w in enumerate(workers))
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, required=True, help="workers to run in this process")
    args, rest = parser.parse_known_args()
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    try:
        settings = WorkerSettings.from_env().with_args(rest).validate()
    except ValueError as exc:
        parser.error(str(exc))
    configure_logging(settings.log_level, settings.log_format)
    gc_tuning.tune()
    uvloop.run(run(args.workers, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
