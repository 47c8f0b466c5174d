"""Prometheus plumbing shared by the gateway and the worker: process metrics and the ``/metrics`` server."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, ProcessCollector, start_http_server

from .settings import check_listen

log = logging.getLogger(__name__)


def process_metrics(registry: CollectorRegistry, prefix: str) -> None:
    """Memory, CPU and file descriptors of this process, and the asyncio tasks of its event loop
    (the loop running when this is called): what leak checks and soak runs watch."""
    ProcessCollector(registry=registry)
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    tasks = Gauge(f"{prefix}_asyncio_tasks", "asyncio tasks alive in the process's event loop", registry=registry)
    if loop is not None:
        tasks.set_function(lambda: len(asyncio.all_tasks(loop)))


def serve(listen: str, registry: CollectorRegistry) -> Any:
    """Serves ``/metrics`` on ``host:port`` in a daemon thread; returns the server (``shutdown()``).

    Raises ValueError for a malformed address, OSError when the port is taken.
    """
    check_listen("metrics_listen", listen)
    host, _, port = listen.rpartition(":")
    server, _ = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    log.info("metrics on http://%s/metrics", listen)
    return server
