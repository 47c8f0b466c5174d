"""The Dramatiq broker and actor that the benchmark's Dramatiq workers run and its submitter uses:
Redis broker and the Results middleware with its Redis backend at ``BENCH_REDIS_URL``.

Dramatiq needs its broker at import time (``dramatiq bench.systems.dramatiq_app``), hence the
module-level broker; the URL comes from the environment the benchmark sets for both sides.
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

broker = RedisBroker(url=URL)
broker.add_middleware(Results(backend=RedisBackend(url=URL)))
dramatiq.set_broker(broker)


@dramatiq.actor(store_results=True, max_retries=0)
def echo(value: Any) -> Any:
    """Returns its input."""
    return value
