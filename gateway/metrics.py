"""Prometheus metrics for the gateway and the worker, served on ``metrics_listen`` when it is set.

Each process builds one :class:`GatewayMetrics` or :class:`WorkerMetrics` with a registry of its
own and passes it to the parts that count; nothing is registered at import time. Queue names are
labels: they are validated names chosen by operators, not free-form client input.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server

from .config import check_listen

log = logging.getLogger(__name__)


def _process(registry: CollectorRegistry, prefix: str) -> None:
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


class GatewayMetrics:
    """What a gateway counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        _process(r, "jobgate_gateway")
        self.rpcs = Counter(
            "jobgate_gateway_rpcs", "RPCs handled, by method and status code", ["method", "code"], registry=r
        )
        self.submitted = Counter(
            "jobgate_gateway_jobs_submitted",
            "Jobs accepted by SubmitJob, SubmitJobs and RunJob (idempotent repeats included)",
            registry=r,
        )
        self.placed = Counter("jobgate_gateway_jobs_placed", "Jobs placed on a worker and published to it", registry=r)
        self.dispatch_lost = Counter(
            "jobgate_gateway_dispatches_lost",
            "Dispatches that reached no subscriber (PUBLISH returned 0) and were taken back",
            registry=r,
        )
        self.settled = Counter(
            "jobgate_gateway_jobs_settled",
            "Jobs of lost workers or unacknowledged dispatches, by the state they were moved to",
            ["state"],
            registry=r,
        )
        self.messages = Counter(
            "jobgate_gateway_channel_messages", "Messages received on the result channels", registry=r
        )
        self.dropped = Counter(
            "jobgate_gateway_channel_messages_dropped", "Malformed or unverifiable channel messages dropped", registry=r
        )
        self.denied = Counter(
            "jobgate_gateway_requests_denied",
            "Calls refused for a missing or unknown token (UNAUTHENTICATED) or a queue the token does not cover",
            ["code"],
            registry=r,
        )
        self.streams = Gauge("jobgate_gateway_streams_open", "Open RunJob and WatchResults streams", registry=r)
        self.redis_up = Gauge("jobgate_gateway_redis_up", "1 while Redis answers PING", registry=r)
        self.waiting = Gauge("jobgate_queue_jobs_waiting", "Jobs waiting in each queue", ["queue"], registry=r)
        self.workers = Gauge("jobgate_workers_live", "Workers whose heartbeat has not expired", registry=r)


class WorkerMetrics:
    """What a worker counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        _process(r, "jobgate_worker")
        self.jobs = Counter(
            "jobgate_worker_jobs", "Jobs finished here, by kind and recorded state", ["kind", "state"], registry=r
        )
        self.duration = Histogram(
            "jobgate_worker_job_duration_seconds", "Handler run time, by kind", ["kind"], registry=r
        )
        self.running = Gauge("jobgate_worker_jobs_running", "Jobs running now", registry=r)
        self.superseded = Counter(
            "jobgate_worker_outcomes_discarded", "Outcomes refused because the attempt had been superseded", registry=r
        )
        self.redis_errors = Counter(
            "jobgate_worker_redis_errors", "Redis calls that failed and were retried", registry=r
        )
        self.placed = Counter(
            "jobgate_worker_jobs_placed",
            "Waiting jobs placed (on any worker) by this worker's finish calls, in the slots they freed",
            registry=r,
        )


def serve(listen: str, registry: CollectorRegistry) -> Any:
    """Serves ``/metrics`` on ``host:port`` in a daemon thread; returns the server (``shutdown()``).

    Raises ValueError for a malformed address, OSError when the port is taken.
    """
    check_listen("metrics_listen", listen)
    host, _, port = listen.rpartition(":")
    server, _ = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    log.info("metrics on http://%s/metrics", listen)
    return server
