"""The gateway's single subscription to the result channel, fanned out to local stream handlers.

Pub/sub is at-most-once, so the hub only ever *adds* speed: stream handlers register a
:class:`Watcher` before they read stored state, re-read stored state when the subscription was
re-established and whenever they have been idle for a while. A terminal event is forwarded only
after it has been checked against the stored job, so a forged message never reaches a client as a
completion, and what the client gets is the stored record.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from google.protobuf.message import DecodeError
from redis.asyncio import Redis

from jobgate.v1 import job_pb2, relay_pb2
from protocol.codec import SCHEDULED, TERMINAL, event_from_hash
from protocol.connection import Subscription, subscription
from protocol.errors import REDIS_ERRORS
from protocol.gateway_calls import GatewayCalls
from protocol.keys import JOB_ID_RE, QUEUE_RE, Keys

from .metrics import GatewayMetrics
from .streams import Watcher

log = logging.getLogger(__name__)

MAX_BATCH = 512  # messages handled per wake-up; terminal events checked per read
_KNOWN_STATES = frozenset(v for v in job_pb2.JobState.values() if v != job_pb2.JOB_STATE_UNSPECIFIED)


class Hub:
    """Owns the gateway's pub/sub connection and routes events to watchers."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        store: GatewayCalls,
        *,
        on_slot_freed: Callable[[str], None],
        on_worker_change: Callable[[], None],
        on_due: Callable[[int], None] = lambda ms: None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.metrics = metrics or GatewayMetrics()
        self.redis = redis
        self.keys = keys
        self.store = store
        self.on_slot_freed = on_slot_freed
        self.on_worker_change = on_worker_change
        self.on_due = on_due  # a job went SCHEDULED (a retry's backoff): when it is due (ms)
        self.by_job: dict[str, set[Watcher]] = {}
        self.broad: set[Watcher] = set()
        self.connected = False  # whether the subscription is up, for the log

    # --- registration ---------------------------------------------------------------------
    def add(self, w: Watcher) -> None:
        if w.job_ids:
            for job_id in w.job_ids:
                self.by_job.setdefault(job_id, set()).add(w)
        else:
            self.broad.add(w)

    def remove(self, w: Watcher) -> None:
        self.broad.discard(w)
        for job_id in w.job_ids:
            group = self.by_job.get(job_id)
            if group is not None:
                group.discard(w)
                if not group:
                    del self.by_job[job_id]

    def _interested(self, event: job_pb2.JobEvent) -> list[Watcher]:
        found = [w for w in self.by_job.get(event.job_id, ()) if w.matches(event)]
        found.extend(w for w in self.broad if w.matches(event))
        return found

    # --- the subscription loop ------------------------------------------------------------
    async def run(self, stop: asyncio.Event, *, retry_s: float = 0.5) -> None:
        """Subscribes and routes messages until ``stop`` is set; resubscribes after any failure."""
        while not stop.is_set():
            try:
                results = [k.results_channel() for k in self.keys.all_shards()]  # one per shard
                async with subscription(self.redis, [*results, self.keys.workers_channel()], self._resubscribed) as ps:
                    self.connected = True
                    log.info("subscribed to %s", ", ".join(results))
                    self.all_missed()  # anything published while we were away was missed
                    self.on_worker_change()
                    await self._listen(ps, stop)
            except Exception as exc:  # the hub must outlive any failure
                if not isinstance(exc, REDIS_ERRORS):
                    log.exception("result routing failed; resubscribing")
                elif self.connected:
                    log.warning("result subscription lost (%s); resubscribing", exc)
                self.connected = False
                self.all_missed()
                try:
                    await asyncio.wait_for(stop.wait(), timeout=retry_s)
                except TimeoutError:
                    pass
        self.connected = False

    async def _listen(self, ps: Subscription, stop: asyncio.Event) -> None:
        get = ps.get_message
        while not stop.is_set():
            msg = await get(ignore_subscribe_messages=True, timeout=1.0)
            if msg is None:
                continue
            batch = [msg]
            while len(batch) < MAX_BATCH and (more := await get(ignore_subscribe_messages=True, timeout=0)):
                batch.append(more)
            await self.handle(batch)

    async def _resubscribed(self, connection: object) -> None:
        log.warning("result subscription re-established after a dropped connection; reconciling")
        self.all_missed()
        self.on_worker_change()

    def _watchers(self) -> list[Watcher]:
        return [*self.broad, *(w for group in self.by_job.values() for w in group)]

    def wake_all(self) -> None:
        """Wakes every stream handler (to notice a shutdown)."""
        for w in self._watchers():
            w.wake()

    def all_missed(self) -> None:
        """The subscription was (re)established: events published meanwhile were missed."""
        for w in self._watchers():
            w.mark_missed()

    # --- routing --------------------------------------------------------------------------
    async def handle(self, batch: list[dict[str, object]]) -> None:
        """Routes one batch of raw pub/sub messages. Malformed messages are logged and dropped.

        Every gateway process receives every event, most of them of jobs no stream here follows:
        those cost a look at their state, no more. The queues whose slots terminal events freed
        are handed on once per batch; an event's job id and state are checked only where the
        event is used (a watcher's, or a terminal one to verify)."""
        status = self.keys.workers_channel().encode()
        to_verify: dict[str, job_pb2.JobEvent] = {}
        freed: set[str] = set()
        self.metrics.messages.inc(len(batch))
        for msg in batch:
            data = msg.get("data")
            if not isinstance(data, bytes):
                continue
            if msg.get("channel") == status:
                self._worker_status(data)
                continue
            events = parse_events(data)
            if events is None:
                self.metrics.dropped.inc()
                continue
            for event in events:
                if self._route(event, to_verify, freed) and len(to_verify) >= MAX_BATCH:
                    await self._forward_verified(list(to_verify))  # bounded bursts: watchers drain in between
                    to_verify.clear()
        for queue in freed:
            if QUEUE_RE.fullmatch(queue):
                self.on_slot_freed(queue)
        if to_verify:
            await self._forward_verified(list(to_verify))

    def _route(self, event: job_pb2.JobEvent, to_verify: dict[str, job_pb2.JobEvent], freed: set[str]) -> bool:
        """Hands a progress event to its watchers; a terminal one notes its queue's freed slot and,
        when someone may want it, goes to ``to_verify`` (returns True then) to be checked first."""
        state = event.state
        if state in TERMINAL:
            freed.add(event.queue)
            job_id = event.job_id
            if (job_id in self.by_job or self.broad) and job_id not in to_verify:
                if not JOB_ID_RE.fullmatch(job_id):
                    self._bad(event)
                    return False
                to_verify[job_id] = event
                return True
            return False
        if state == SCHEDULED and event.HasField("due_at"):  # a retry's backoff: promote then
            self.on_due(event.due_at.ToMilliseconds())
        if self.by_job and event.job_id in self.by_job:  # only watchers of job ids take progress
            if state not in _KNOWN_STATES:
                self._bad(event)
                return False
            for w in self._interested(event):
                w.push(event)
        return False

    def _bad(self, event: job_pb2.JobEvent) -> None:
        log.warning("dropped a result event with a bad job id or state")
        self.metrics.dropped.inc()

    async def _forward_verified(self, job_ids: list[str]) -> None:
        for job_id, fields in zip(job_ids, await self.store.get_fields(job_ids), strict=True):
            if not fields:
                log.warning("dropped a result for unknown job job_id=%s", job_id)
                self.metrics.dropped.inc()
                continue
            stored = event_from_hash(job_id, fields)
            if stored.state not in TERMINAL:
                log.warning("dropped a result that does not match the stored state job_id=%s", job_id)
                self.metrics.dropped.inc()
                continue
            for w in self._interested(stored):
                w.push(stored)

    def _worker_status(self, data: bytes) -> None:
        status = relay_pb2.WorkerStatus()
        try:
            status.ParseFromString(data)
        except DecodeError:
            log.warning("dropped a malformed worker status message (%d bytes)", len(data))
            self.metrics.dropped.inc()
            return
        if status.change in (relay_pb2.WorkerStatus.CHANGE_JOINED, relay_pb2.WorkerStatus.CHANGE_LEFT):
            self.on_worker_change()


def parse_events(data: bytes) -> Sequence[job_pb2.JobEvent] | None:
    """The events of a JobEvents message from the result channel; None (logged) for a malformed
    or empty message. Their job ids and states are the router's to check, where they are used."""
    msg = relay_pb2.JobEvents()
    try:
        msg.ParseFromString(data)
    except DecodeError:
        log.warning("dropped a malformed result message (%d bytes)", len(data))
        return None
    if not msg.events:
        log.warning("dropped a result message with no events (%d bytes)", len(data))
        return None
    return msg.events
