"""Placement: moves waiting jobs onto worker slots and publishes them on dispatch channels.

Placement itself is one Lua script (atomic, so several gateways never place a job twice). This
module decides *when* to run it: right after a submit, when a result frees a slot, when a worker
joins, and on a periodic tick that also reaps lost workers and unacknowledged dispatches.
"""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis

from jobgate.v1 import job_pb2, relay_pb2

from .codec import DISPATCHED, events_message, timestamp
from .errors import Unavailable
from .keys import QUEUE_RE, Keys
from .metrics import GatewayMetrics
from .store import JobStore, Placement, now_ms, redis_errors

log = logging.getLogger(__name__)


class Scheduler:
    """Runs placement for the queues that need it; one per gateway process."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        store: JobStore,
        *,
        tick_s: float,
        ack_timeout_ms: int,
        batch: int = 500,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.metrics = metrics or GatewayMetrics()
        self.redis = redis
        self.keys = keys
        self.store = store
        self.tick_s = tick_s
        self.ack_timeout_ms = ack_timeout_ms
        self.batch = batch
        self._dirty: set[str] = set()
        self._reported: set[str] = set()  # queues with a waiting-jobs gauge
        self._all = True
        self._wake = asyncio.Event()

    def kick(self, queue: str) -> None:
        """Asks for placement on ``queue`` soon (validated: only known-good names become keys)."""
        if QUEUE_RE.fullmatch(queue):
            self._dirty.add(queue)
            self._wake.set()

    def kick_all(self) -> None:
        """Asks for placement on every queue (a worker joined or left)."""
        self._all = True
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Places jobs until ``stop`` is set. Redis outages are logged and retried."""
        loop = asyncio.get_running_loop()
        next_tick = 0.0
        while not stop.is_set():
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.tick_s)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                if loop.time() >= next_tick:
                    next_tick = loop.time() + self.tick_s
                    await self._reap()
                    await self.store.resend_cancels(older_than_ms=max(1000, int(self.tick_s * 1000)))
                    self._all = True
                if self._all:
                    self._all = False
                    names = await self.store.queue_names()
                    self._dirty.update(names)
                    await self._census(names)
                queues, self._dirty = self._dirty, set()
                for queue in sorted(queues):
                    await self.place(queue)
            except Exception as exc:  # placement must outlive any failure
                if isinstance(exc, Unavailable):
                    log.warning("placement paused: %s", exc)
                else:  # e.g. an error reply such as OOM: retried on the next pass
                    log.exception("placement failed; trying again")
                self._all = True
                try:
                    await asyncio.wait_for(stop.wait(), timeout=self.tick_s)
                except TimeoutError:
                    pass

    async def _census(self, queues: list[str]) -> None:
        waiting, live = await self.store.census(queues)
        for queue in self._reported - waiting.keys():  # emptied and dropped from the queues set
            self.metrics.waiting.remove(queue)
        for queue, count in waiting.items():
            self.metrics.waiting.labels(queue).set(count)
        self._reported = set(waiting)
        self.metrics.workers.set(live)

    async def _reap(self) -> None:
        settled = await self.store.reap()
        if not settled:
            return
        for s in settled:
            self.metrics.settled.labels(job_pb2.JobState.Name(s.state).removeprefix("JOB_STATE_")).inc()
            log.warning(
                "job_id=%s settled as %s after its worker or dispatch was lost",
                s.job_id,
                job_pb2.JobState.Name(s.state),
            )
            self._dirty.add(s.queue)
        await self.store.publish_settled(settled)

    async def place(self, queue: str) -> int:
        """Places as many waiting jobs of ``queue`` as there are free slots; returns how many."""
        total = 0
        while True:
            placements = await self.store.schedule(queue, ack_timeout_ms=self.ack_timeout_ms, most=self.batch)
            if not placements:
                return total
            lost = await self._publish(queue, placements)
            self.metrics.placed.inc(len(placements) - len(lost))
            self.metrics.dispatch_lost.inc(len(lost))
            for p in lost:
                log.warning(
                    "job_id=%s dispatch to worker %s reached nobody; placing it elsewhere", p.job_id, p.worker_id
                )
                await self.store.unassign(p)
            total += len(placements) - len(lost)
            if len(placements) < self.batch and not lost:
                return total

    async def _publish(self, queue: str, placements: list[Placement]) -> list[Placement]:
        """Publishes one message per worker with its placements, and one message with every
        DISPATCHED event; returns the placements whose worker's message reached nobody."""
        k, now = self.keys, timestamp(now_ms())
        by_worker: dict[str, list[relay_pb2.DispatchJob]] = {}
        events = []
        for p in placements:
            spec = job_pb2.JobSpec.FromString(p.spec)
            dispatch = relay_pb2.DispatchJob(
                job_id=p.job_id, lease=p.lease, attempt=p.attempt, spec=spec, timeout_ms=p.timeout_ms
            )
            by_worker.setdefault(p.worker_id, []).append(dispatch)
            events.append(
                job_pb2.JobEvent(
                    job_id=p.job_id,
                    queue=queue,
                    kind=spec.kind,
                    state=DISPATCHED,
                    attempt=p.attempt,
                    worker_id=p.worker_id,
                    time=now,
                )
            )
        async with redis_errors(), self.redis.pipeline(transaction=False) as pipe:
            for worker_id, jobs in by_worker.items():
                if len(jobs) == 1:
                    msg = relay_pb2.WorkerMessage(dispatch=jobs[0])
                else:
                    msg = relay_pb2.WorkerMessage(dispatches=relay_pb2.DispatchJobs(jobs=jobs))
                pipe.publish(k.dispatch_channel(worker_id), msg.SerializeToString())
            pipe.publish(k.results_channel(), events_message(events))
            receivers = await pipe.execute()
        unreached = {w for w, n in zip(by_worker, receivers, strict=False) if n == 0}
        return [p for p in placements if p.worker_id in unreached]
