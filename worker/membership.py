"""A worker's registration: heartbeats, status messages, eviction and leaving.

The heartbeat script registers the worker (slots, queues, kinds, an instance token of this
process) and keeps it alive. A beat that finds the worker had been evicted means every job held
before it was placed elsewhere: those are abandoned. A beat is also what takes the worker off
placement while it is not subscribed or is draining.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from jobgate.v1 import relay_pb2
from protocol.errors import REDIS_ERRORS
from protocol.keys import label_text
from protocol.replies import Settled
from protocol.worker_calls import Registration, WorkerCalls

from .config import WorkerSettings
from .execution import Executor
from .metrics import WorkerMetrics

log = logging.getLogger(__name__)

STEP_ERRORS: tuple[type[Exception], ...] = (*REDIS_ERRORS, TimeoutError)  # a bounded shutdown step


class Membership:
    """Registers one worker process and keeps it registered until it leaves."""

    def __init__(
        self,
        calls: WorkerCalls,
        settings: WorkerSettings,
        worker_id: str,
        kinds: Sequence[str],
        metrics: WorkerMetrics,
        executor: Executor,
        instance: str,
    ) -> None:
        self.calls = calls
        self.settings = settings
        self.id = worker_id
        self.kinds = list(kinds)
        self.metrics = metrics
        self.executor = executor
        self.instance = instance  # tells this process's registration from an earlier one's
        self.subscribed = False  # set by the dispatch listener while its subscription stands
        self.registered = False  # set by the first successful heartbeat
        self.shards = calls.shards_of(settings.queue_list)  # shard -> the worker's queues there
        self.registered_in: set[int] = set()  # shards where a heartbeat has registered this process
        self.redis_ok = True
        self.evictions: list[float] = []  # when this process found itself evicted (monotonic s)
        self._background: set[asyncio.Task[None]] = set()

    async def beat(self) -> None:
        """One heartbeat, in each shard that holds one of the worker's queues (at once). When one
        finds this worker had been evicted there (and registered it again), every job of that shard
        still held here was placed elsewhere: those are abandoned."""
        held = self.executor.held()  # what an eviction found by this beat can have taken away
        grants = self.grants()
        async with asyncio.timeout(self.executor.call_s):  # abandoned, the next beat tries again
            replies = await asyncio.gather(
                *(self.calls.heartbeat(self._registration(shard, grants[shard]), shard) for shard in self.shards)
            )
        for shard, reply in zip(self.shards, replies, strict=True):
            if reply.again and shard in self.registered_in:
                self._abandon([task for job_id, task in held if self.calls.keys.job_shard(job_id) == shard])
            self.registered_in.add(shard)
            if reply.inherited:
                log.warning(
                    "an earlier process with id %s held %d jobs; they were placed again", self.id, len(reply.inherited)
                )
                await self.calls.publish_settled(reply.inherited)
        again = any(r.again for r in replies) and self.registered
        self.registered = True
        if self.settings.health_file:
            Path(self.settings.health_file).touch()  # noqa: ASYNC240 - a tiny local file, once a second
        if again and self.subscribed and not self.executor.draining:
            await self.status(relay_pb2.WorkerStatus.CHANGE_JOINED)

    def grants(self) -> dict[int, int]:
        """The slots each shard's registration offers: the worker's (less those held by stuck
        threads) split evenly over its shards, so that together they never offer more than it has."""
        total = max(0, self.settings.concurrency - self.executor.stuck_threads)
        n = len(self.shards)
        return {shard: total // n + (1 if i < total % n else 0) for i, shard in enumerate(self.shards)}

    def _registration(self, shard: int, slots: int) -> Registration:
        return Registration(
            worker_id=self.id,
            instance=self.instance,
            ttl_ms=self.settings.heartbeat_ttl_ms,
            slots=slots,
            queues=self.shards[shard],
            kinds=self.kinds,
            off=self.executor.draining or not self.subscribed,
            labels=label_text(self.settings.label_map),
        )

    async def heartbeat_loop(self) -> None:
        interval = self.settings.heartbeat_ms / 1000
        failing_since = said = 0.0
        while True:
            try:
                await self.beat()
                if not self.redis_ok:
                    log.info("Redis reachable again")
                self.redis_ok = True
            except Exception as exc:  # noqa: BLE001 - heartbeats must outlive any failure
                self.metrics.redis_errors.inc()
                now = time.monotonic()
                if self.redis_ok:
                    failing_since = said = now
                    log.warning("heartbeat failed (%s: %s); retrying", type(exc).__name__, exc)
                elif now - said >= 30:  # still failing: said again every 30 s
                    said = now
                    log.warning(
                        "heartbeats failing for %.0fs (%s: %s); retrying", now - failing_since, type(exc).__name__, exc
                    )
                self.redis_ok = False
            await asyncio.sleep(interval)

    def beat_soon(self) -> None:
        """A heartbeat now, in the background (to report a slot lost to a stuck thread)."""
        task = asyncio.create_task(self.quietly(self.beat()))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @property
    def background(self) -> list[asyncio.Task[None]]:
        return list(self._background)

    def _abandon(self, held: list[asyncio.Task[None] | None]) -> None:
        """After an eviction the jobs held before it were placed again elsewhere: stop running them.
        (A job placed here after the beat re-registered this worker is valid and keeps running.)"""
        now = time.monotonic()
        self.evictions = [t for t in self.evictions if now - t < 60] + [now]
        log.warning("registered again after being evicted; abandoning %d superseded jobs", len(held))
        if len(self.evictions) > 1:  # a crashed predecessor is evicted once; a live twin again and again
            log.error(
                "evicted %d times in a minute: another live process seems to use worker id %s (ids must be unique)",
                len(self.evictions),
                self.id,
            )
        for task in held:
            if task is not None:
                task.cancel()

    async def status(self, change: relay_pb2.WorkerStatus.Change) -> None:
        await self.calls.status(self.id, change)

    async def leave(self) -> None:
        """Deregisters from every shard; the jobs not finished here go back to their queues."""
        parts = await asyncio.gather(*(self.calls.leave(self.id, shard) for shard in self.shards))
        handed: list[Settled] = [s for part in parts for s in part]
        for s in handed:
            log.info("job_id=%s handed back to queue %s", s.job_id, s.queue)
        await self.calls.publish_settled(handed)
        await self.status(relay_pb2.WorkerStatus.CHANGE_LEFT)

    async def quietly(self, coro: Coroutine[Any, Any, None]) -> None:
        """Runs one Redis step of a best-effort sequence (shutdown, an early heartbeat); a failure is
        logged, and the gateways' reaping covers for it."""
        try:
            await asyncio.wait_for(coro, timeout=self.settings.redis_timeout_s + 1)
        except STEP_ERRORS as exc:
            self.metrics.redis_errors.inc()
            log.warning("Redis step failed (%s); heartbeat expiry and reaping cover for it", exc)
