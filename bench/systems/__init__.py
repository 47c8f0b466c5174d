"""The systems the benchmark compares, each behind the same interface (``base.System``).

Adapters are imported only when a run asks for them, so ``python -m bench.run --systems jobgate``
works where the peers (Celery, RQ, Dramatiq, arq) are not installed.
"""

from __future__ import annotations

import importlib

from bench.systems.base import System

# name -> (module, class); the report and the charts keep this order.
SYSTEMS = {
    "jobgate": ("bench.systems.jobgate", "Jobgate"),
    "celery": ("bench.systems.celery_peer", "CeleryPeer"),
    "rq": ("bench.systems.rq_peer", "RQPeer"),
    "dramatiq": ("bench.systems.dramatiq_peer", "DramatiqPeer"),
    "arq": ("bench.systems.arq_peer", "ArqPeer"),
}
PEERS = tuple(name for name in SYSTEMS if name != "jobgate")


def load(name: str, redis_url: str) -> System:
    """The adapter for ``name``. Raises ImportError when its library is not installed."""
    module, cls = SYSTEMS[name]
    system: System = getattr(importlib.import_module(module), cls)(redis_url)
    return system
