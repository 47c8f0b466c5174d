"""The arq worker the benchmark starts (``python -m bench.systems.arq_app``): one ``echo``
function, Redis at ``BENCH_REDIS_URL``.

arq's own command line logs every job at INFO; this entry point runs the same ``Worker`` with
Python's default logging (warnings and errors only), as the other systems' workers run.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from arq.connections import RedisSettings
from arq.worker import run_worker

READY = "bench worker ready"
MAX_JOBS = int(os.environ.get("BENCH_ARQ_MAX_JOBS", "64"))
POLL_DELAY_S = float(os.environ.get("BENCH_ARQ_POLL_DELAY_S", "0.005"))


async def echo(ctx: dict[str, Any], value: Any) -> Any:
    """Returns its input."""
    return value


async def ready(ctx: dict[str, Any]) -> None:
    print(READY, flush=True)


class WorkerSettings:
    functions: ClassVar[list[Any]] = [echo]
    redis_settings = RedisSettings.from_dsn(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    max_jobs = MAX_JOBS
    poll_delay = POLL_DELAY_S
    max_tries = 1
    log_results = False
    on_startup = ready


if __name__ == "__main__":
    run_worker(WorkerSettings)  # type: ignore[arg-type]
