"""The Celery app that the benchmark's Celery workers run and its submitter uses: Redis broker and
Redis result backend at ``BENCH_REDIS_URL``, JSON messages, one ``echo`` task.

Celery needs its app at import time (``celery -A bench.systems.celery_app worker``), hence the
module-level app; the URL comes from the environment the benchmark sets for both sides.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, signals

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
READY = "bench worker ready"

app = Celery("bench", broker=URL, backend=URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="echo")
def echo(value: Any) -> Any:
    """Returns its input."""
    return value


@signals.worker_ready.connect
def _ready(**_: Any) -> None:
    print(READY, flush=True)
