"""The worker's side of the Redis protocol: heartbeat, start, finish, leave and status messages.

docs/PROTOCOL.md writes the same calls down for workers in other languages. Every method is one
Redis round trip; Redis errors propagate (the runtime decides what to retry).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jobgate.v1 import relay_pb2

from .calls import Calls
from .connection import now_ms
from .replies import Finished, Heartbeat, Settled, placements, settled

# finish_many places waiting jobs of the queues whose slots it freed: at most this many per queue,
# each to be started within its stored ack timeout (DEFAULT_ACK_MS for a job stored without one).
PLACE_MOST = 500
DEFAULT_ACK_MS = 5000


@dataclass(frozen=True, slots=True)
class Registration:
    """What a heartbeat says of a worker (see docs/PROTOCOL.md, "heartbeat")."""

    worker_id: str
    instance: str  # a token of this process: tells its registration from an earlier process's
    ttl_ms: int
    slots: int
    queues: Sequence[str]
    kinds: Sequence[str]
    off: bool  # take no placements (not yet subscribed, or draining)


@dataclass(frozen=True, slots=True)
class Start:
    """One dispatch to acknowledge: the placement and the RUNNING event to publish with it."""

    job_id: str
    lease: int
    event: bytes  # a JobEvents message


@dataclass(frozen=True, slots=True)
class Outcome:
    """One attempt's outcome to record."""

    job_id: str
    lease: int
    state: int
    result: bytes  # google.protobuf.Value bytes
    output: bytes
    error_code: str
    error_message: str
    event: bytes  # a JobEvents message

    @property
    def size(self) -> int:
        """Roughly what this entry adds to a finish_many call."""
        return len(self.result) + len(self.output) + len(self.event)


class WorkerCalls(Calls):
    """The calls of one worker process."""

    async def heartbeat(self, r: Registration) -> Heartbeat:
        """Registers or refreshes the worker; settles what an earlier process under its id held.
        Durable like an outcome: a reply that says the worker had been evicted makes it abandon its
        jobs, so that eviction must survive a failover (replication keeps order: a confirmed beat
        confirms every write before it)."""
        k, now = self.keys, now_ms()
        reply = await self.durably(
            self.scripts.heartbeat,
            [*k.namespace_keys(), *k.own_keys(r.worker_id)],
            [
                k.prefix,
                r.worker_id,
                now,
                now + r.ttl_ms,
                r.slots,
                ",".join(r.queues),
                ",".join(r.kinds),
                socket.gethostname(),
                os.getpid(),
                "1" if r.off else "0",
                r.instance,
            ],
        )
        return Heartbeat(bool(reply[0]), settled(reply[1:]))

    async def leave(self, worker_id: str) -> list[Settled]:
        """Deregisters the worker and hands the jobs it did not finish back to their queues."""
        k = self.keys
        keys = [*k.namespace_keys(), *k.own_keys(worker_id)]
        return settled(await self.scripts.leave(keys=keys, args=[k.prefix, worker_id, now_ms()]))

    async def start_many(self, worker_id: str, instance: str, starts: Sequence[Start]) -> list[int]:
        """Acknowledges dispatches: per start, 1 started, 0 stale, -1 missing. ``instance`` is the
        token the worker's heartbeat registered: a placement on another registration is stale."""
        k = self.keys
        keys = [*k.namespace_keys(), *k.own_keys(worker_id)]
        args: list[Any] = [k.prefix, worker_id, instance, now_ms()]
        for s in starts:
            keys.append(k.job(s.job_id))
            args += (s.job_id, s.lease, s.event)
        return [int(c) for c in await self.scripts.start_many(keys=keys, args=args)]

    async def finish_many(self, worker_id: str, instance: str, outcomes: Sequence[Outcome], *, take: int) -> Finished:
        """Records outcomes (per outcome 1 recorded, 2 recorded before, 0 stale, -1 missing), and
        refills the slots they free: up to ``take`` waiting jobs are started on this worker at once
        (only while ``instance`` is the token of its registration), more are dispatched as a
        placement pass would."""
        k = self.keys
        keys = [*k.namespace_keys(), *k.own_keys(worker_id)]
        args: list[Any] = [k.prefix, worker_id, instance, now_ms(), PLACE_MOST, DEFAULT_ACK_MS, take]
        for o in outcomes:
            keys.append(k.job(o.job_id))
            args += (o.job_id, o.lease, o.state, o.result, o.output, o.error_code, o.error_message, o.event)
        codes, flat, taken = await self.durably(self.scripts.finish_many, keys, args)
        return Finished(
            [int(c) for c in codes],
            placements(flat),
            list(relay_pb2.DispatchJobs.FromString(taken).jobs) if taken else [],
        )

    async def status(self, worker_id: str, change: relay_pb2.WorkerStatus.Change) -> None:
        """Tells the gateways that this worker joined, is leaving or left."""
        msg = relay_pb2.WorkerStatus(worker_id=worker_id, change=change)
        await self.redis.publish(self.keys.workers_channel(), msg.SerializeToString())
