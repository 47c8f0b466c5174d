"""The worker runtime: a :class:`Worker` holds the handlers; ``run()`` serves them until ``stop()``.

Three parts do the work, each in a module of its own: ``membership`` registers the worker and
keeps it alive with heartbeats (and abandons jobs placed elsewhere after an eviction),
``dispatch`` follows the worker's dispatch channel, and ``execution`` acknowledges each
placement with a start call, runs its handler within the worker's slots and the job's timeout,
and records the outcome with a finish call, which stores it before publishing it (so it survives
a moment when no gateway listens) and refills the freed slot with a waiting job. On stop the
worker leaves placement, lets running jobs finish within the grace period, and hands the rest
back to their queues.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import TypeVar

from common import tracing
from common.metrics import serve
from jobgate.v1 import relay_pb2
from protocol.calls import Durability
from protocol.connection import bounded, redis_client
from protocol.keys import Keys
from protocol.worker_calls import WorkerCalls

from .builtins import register_builtins
from .config import WorkerSettings, default_worker_id
from .dispatch import DispatchListener
from .execution import Executor
from .membership import Membership
from .metrics import WorkerMetrics
from .registry import Handler, Registry

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Handler)


class Worker:
    """A jobgate worker. Register handlers with :meth:`handler`, then ``await run(settings)``.

    Plain functions run in a thread pool; coroutine functions run on the event loop.
    """

    def __init__(self, *, builtins: bool = True) -> None:
        self.registry = Registry()
        if builtins:
            register_builtins(self.registry)
        self._stop: asyncio.Event | None = None
        self.worker_id = ""
        self.threads_left = 0  # handler threads still running when run() returned

    def handler(self, kind: str) -> Callable[[F], F]:
        """Decorator registering a handler for ``kind``. Raises ValueError for a bad or taken kind."""
        return self.registry.decorator(kind)

    def stop(self) -> None:
        """Asks a running worker to drain and exit (safe to call from the event loop)."""
        if self._stop is not None:
            self._stop.set()

    async def run(self, settings: WorkerSettings) -> None:
        """Runs until :meth:`stop`; then drains in-flight jobs and hands the rest back."""
        self._stop = asyncio.Event()
        if settings.tracing:
            tracing.setup("jobgate-worker")
        self.worker_id = settings.worker_id or default_worker_id()
        runtime = _Runtime(self.registry, settings, self.worker_id, self._stop)
        await runtime.run()
        self.threads_left = runtime.executor.stuck_threads


class _Runtime:
    """One run of a worker: its Redis client and its three parts, from start to drain."""

    def __init__(self, registry: Registry, settings: WorkerSettings, worker_id: str, stop: asyncio.Event) -> None:
        self.registry = registry
        self.settings = settings
        self.stop_event = stop
        self.id = worker_id
        self.redis = redis_client(settings.redis_url, settings.redis_timeout_s)
        self.metrics = WorkerMetrics()
        durability = Durability(settings.redis_wait_replicas, settings.redis_wait_timeout_ms)
        calls = WorkerCalls(self.redis, Keys(settings.namespace, settings.redis_shards), durability)
        instance = uuid.uuid4().hex  # tells this process's registration from an earlier one's
        self.executor = Executor(calls, settings, worker_id, instance, registry, self.metrics)
        self.membership = Membership(calls, settings, worker_id, registry.kinds, self.metrics, self.executor, instance)
        self.executor.on_slot_lost = self.membership.beat_soon
        self.listener = DispatchListener(calls, self.membership, self.executor)

    async def run(self) -> None:
        log.info(
            "worker %s serving queues %s with kinds %s (concurrency %d)",
            self.id,
            ",".join(self.settings.queue_list),
            ",".join(self.registry.kinds),
            self.settings.concurrency,
        )
        metrics_server = (
            serve(self.settings.metrics_listen, self.metrics.registry) if self.settings.metrics_listen else None
        )
        beat = asyncio.create_task(self.membership.heartbeat_loop(), name="heartbeat")
        listen = asyncio.create_task(self.listener.listen_loop(), name="listen")
        progress = asyncio.create_task(self.executor.reporter.run(), name="progress")
        try:
            await self.stop_event.wait()
        finally:
            await self._drain(beat, listen, progress)
            await bounded(self.redis.aclose(), self.settings.redis_timeout_s, "closing Redis connections")
            if metrics_server is not None:
                metrics_server.shutdown()
            log.info("worker %s stopped", self.id)

    async def _drain(self, beat: asyncio.Task[None], listen: asyncio.Task[None], progress: asyncio.Task[None]) -> None:
        """Stop taking jobs, let running ones finish within the grace period, hand the rest back."""
        m, ex, s = self.membership, self.executor, self.settings
        ex.draining = True
        log.info("draining: no new jobs; waiting up to %.1fs for %d running", s.grace_s, len(ex.jobs))
        await m.quietly(m.beat())  # off=1: no more placements here
        await m.quietly(m.status(relay_pb2.WorkerStatus.CHANGE_LEAVING))
        # Still subscribed while draining, so cancel requests for running jobs arrive; new
        # dispatches are left unacknowledged and handed back by the leave script.
        await ex.drain(s.grace_s)
        background = [beat, listen, progress, *m.background]  # no heartbeat may re-register us after leaving
        for task in background:
            task.cancel()
        # Bounded: a task's cleanup (closing a pub/sub connection, a TLS shutdown) may wait on Redis.
        _, stuck = await asyncio.wait(background, timeout=s.redis_timeout_s)
        if stuck:
            log.warning("%d background task(s) did not stop within %.1fs", len(stuck), s.redis_timeout_s)
        await ex.aclose()
        await m.quietly(m.leave())
