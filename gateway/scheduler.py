"""Placement: moves waiting jobs onto worker slots; the scripts publish them on dispatch channels.

Placement itself is Lua (``place_jobs``, atomic, so several gateways never place a job twice),
run by the submit script for the jobs it stores, by a worker's finish_many in the slots it frees,
and by the schedule script. This module decides when a gateway runs schedule: when a submit's own
placement stopped at its limit or lost a dispatch, when a result frees a slot in a queue known to
hold waiting jobs, when a worker joins or leaves, and on a periodic tick that also reaps lost
workers and unacknowledged dispatches, and queues the SCHEDULED jobs that are due (delayed submits,
retries whose backoff is over), and submits the jobs of the periodic schedules' due ticks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from jobgate.v1 import job_pb2
from protocol.connection import now_ms
from protocol.errors import Unavailable
from protocol.gateway_calls import GatewayCalls
from protocol.keys import QUEUE_RE
from protocol.replies import Placed

from .metrics import GatewayMetrics

log = logging.getLogger(__name__)

T = TypeVar("T")
UNSERVED_LOG_S = 30.0  # how often kinds with waiting jobs that no live worker handles are logged
UNSERVED_FIRST_S = 5.0


class Scheduler:
    """Runs placement for the queues that need it; one per gateway process."""

    def __init__(
        self,
        store: GatewayCalls,
        *,
        tick_s: float,
        step_s: float = 30.0,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.metrics = metrics or GatewayMetrics()
        self.store = store
        self.tick_s = tick_s
        # The longest one Redis call of a pass may take (its retries included): a call that hangs
        # (a connection stuck in a failover) is abandoned, so placement never stops for good.
        self.step_s = step_s
        self._dirty: set[str] = set()
        self._reported: set[str] = set()  # queues with a waiting-jobs gauge
        # Queues known to hold waiting jobs (from placements and the census): only a slot freed in
        # one of them calls for a placement pass.
        self._backlog: set[str] = set()
        self._all = True
        self._wake = asyncio.Event()
        # Run on every tick, after promote: the schedules' due ticks (gateway/schedules.py), the
        # callbacks of ended batches (gateway/batches.py).
        self.every_tick: list[Callable[[], Awaitable[int]]] = []
        # The earliest due time of a SCHEDULED job this gateway knows of (ms): promote runs then,
        # not only on the next tick.
        self._next_due: int | None = None
        # When kinds that no worker handles were last looked for (loop time); the first look comes
        # UNSERVED_FIRST_S after the first census, once workers have had time to register.
        self._unserved_at: float | None = None

    def due_at(self, ms: int) -> None:
        """A job was stored SCHEDULED until ``ms``: queue it then (or earlier, with others)."""
        if self._next_due is None or ms < self._next_due:
            self._next_due = ms
            self._wake.set()

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
            if not self._wake.is_set():
                await self._sleep(max(0.0, next_tick - loop.time()))
            self._wake.clear()
            try:
                if loop.time() >= next_tick:
                    next_tick = loop.time() + self.tick_s
                    await self._tick()
                elif self._next_due is not None and now_ms() >= self._next_due:
                    await self._promote()
                if self._all:
                    self._all = False
                    names = await self._step(self.store.queue_names())
                    self._dirty.update(names)
                    await self._step(self._census(names))
                queues, self._dirty = self._dirty, set()
                for queue in sorted(queues):
                    await self._step(self.place(queue))
            except Exception as exc:  # placement must outlive any failure
                if isinstance(exc, Unavailable):
                    log.warning("placement paused: %s", exc)
                elif isinstance(exc, TimeoutError):
                    log.warning("placement paused: a Redis call took longer than %.0fs; trying again", self.step_s)
                else:  # e.g. an error reply such as OOM: retried on the next pass
                    log.exception("placement failed; trying again")
                self._all = True
                try:
                    await asyncio.wait_for(stop.wait(), timeout=self.tick_s)
                except TimeoutError:
                    pass

    async def _tick(self) -> None:
        """The periodic part of a pass: reaping, due jobs, schedules, repeated cancels; then a
        pass over every queue."""
        await self._step(self._reap())
        await self._promote()
        for step in self.every_tick:
            await self._step(step())
        await self._step(self.store.resend_cancels(older_than_ms=max(1000, int(self.tick_s * 1000))))
        self._all = True

    async def _sleep(self, until_tick_s: float) -> None:
        """Waits for a wake-up, the next tick, or the next due job, whichever comes first."""
        wait_s = until_tick_s
        if self._next_due is not None:
            wait_s = min(wait_s, max(0.0, (self._next_due - now_ms()) / 1000))
        try:
            async with asyncio.timeout(wait_s):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def _promote(self) -> None:
        """Queues the SCHEDULED jobs that are due, then learns when the next one is."""
        self._next_due = None  # a due_at() meanwhile lowers it again
        for queue in await self._step(self.store.promote()):
            self.kick(queue)
        upcoming = await self._step(self.store.next_due())
        if upcoming is not None:
            self.due_at(upcoming)

    async def _step(self, aw: Awaitable[T]) -> T:
        async with asyncio.timeout(self.step_s):
            return await aw

    async def _census(self, queues: list[str]) -> None:
        waiting, live = await self.store.census(queues)
        loop = asyncio.get_running_loop()
        if self._unserved_at is None:
            self._unserved_at = loop.time() - UNSERVED_LOG_S + UNSERVED_FIRST_S
        if loop.time() - self._unserved_at >= UNSERVED_LOG_S:
            self._unserved_at = loop.time()
            for queue, kind in await self.store.unserved([q for q, n in waiting.items() if n]):
                log.warning(
                    "jobs of kind %r wait in queue %r, and no live worker of that queue can run them (a typo in"
                    " the kind, labels no worker has, or no worker deployed for them?)",
                    kind,
                    queue,
                )
        for queue in self._reported - waiting.keys():  # emptied and dropped from the queues set
            self.metrics.waiting.remove(queue)
        for queue, count in waiting.items():
            self.metrics.waiting.labels(queue).set(count)
            if count:
                self._backlog.add(queue)
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
        """Places up to ``place_most`` waiting jobs of ``queue`` on free slots; returns how many. When
        more may be placed (the limit was reached, or dispatches went back), :meth:`record` asks for
        another pass."""
        placed = await self.store.schedule(queue)
        self.record(placed)
        return len(placed.placements)

    def record(self, placed: Placed) -> None:
        """Takes note of what a placing script (schedule, or submit right away) did: counts its
        placements, logs those that went back (no subscriber on their worker's channel) and
        remembers which of the queues it placed on still hold waiting jobs. Asks for another pass
        when jobs went back or when jobs still wait after the script stopped at its limit."""
        lost = [p for p in placed.placements if not p.reached]
        self.metrics.placed.inc(len(placed.placements) - len(lost))
        if lost:
            self.metrics.dispatch_lost.inc(len(lost))
        for p in lost:
            log.warning("job_id=%s dispatch to worker %s reached nobody; placing it elsewhere", p.job_id, p.worker_id)
        for queue in placed.visited:
            if queue not in placed.waiting:
                self._backlog.discard(queue)
                continue
            self._backlog.add(queue)
            if lost or len(placed.placements) >= self.store.place_most:
                self.kick(queue)

    def slot_freed(self, queue: str) -> None:
        """A job of ``queue`` ended: runs placement there if jobs are known to wait in it."""
        if queue in self._backlog:
            self.kick(queue)
