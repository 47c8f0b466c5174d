"""The worker's side of the Redis protocol: heartbeat, start, finish, leave and status messages.

docs/PROTOCOL.md writes the same calls down for workers in other languages. Every method is one
Redis round trip; Redis errors propagate (the runtime decides what to retry).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from jobgate.v1 import relay_pb2

from .calls import APART, SCRIPT_FIELD_BYTES, STAGED_MS, Calls, by_shard, per_shard
from .connection import now_ms
from .errors import redis_errors
from .keys import Keys
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
    labels: str = ""  # sorted "name=value" pairs joined by "," (Keys.label_text)


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


@dataclass(frozen=True, slots=True)
class Report:
    """One job's progress to record: its placement, the Progress and the event that carries it."""

    job_id: str
    lease: int
    progress: bytes  # a jobgate.v1.Progress
    event: bytes  # a JobEvents message holding the progress event


class WorkerCalls(Calls):
    """The calls of one worker process. A worker registers in each shard that holds one of its
    queues (see Keys): a heartbeat, a leave, are per shard; starts and finishes go to the shards
    their jobs name."""

    def shards_of(self, queues: Sequence[str]) -> dict[int, list[str]]:
        """The shards that hold ``queues``, each with its queues, in order of first appearance."""
        out: dict[int, list[str]] = {}
        for q in queues:
            out.setdefault(self.keys.queue_shard(q), []).append(q)
        return out

    async def heartbeat(self, r: Registration, shard: int = 0) -> Heartbeat:
        """Registers or refreshes the worker; settles what an earlier process under its id held.
        Durable like an outcome: a reply that says the worker had been evicted makes it abandon its
        jobs, so that eviction must survive a failover (replication keeps order: a confirmed beat
        confirms every write before it). ``r`` registers the worker in ``shard``: its queues are
        that shard's, its slots the share of the worker's concurrency granted there."""
        k, now = self.keys.at(shard), now_ms()
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
                r.labels,
            ],
        )
        return Heartbeat(bool(reply[0]), settled(reply[1:]))

    async def leave(self, worker_id: str, shard: int = 0) -> list[Settled]:
        """Deregisters the worker from ``shard`` and hands the jobs it did not finish there back to
        their queues."""
        k = self.keys.at(shard)
        keys = [*k.namespace_keys(), *k.own_keys(worker_id)]
        return settled(await self.scripts.leave(keys=keys, args=[k.prefix, worker_id, now_ms()]))

    async def start_many(self, worker_id: str, instance: str, starts: Sequence[Start]) -> list[int]:
        """Acknowledges dispatches: per start, 1 started, 0 stale, -1 missing. ``instance`` is the
        token the worker's heartbeat registered: a placement on another registration is stale."""
        return await per_shard(
            self.keys,
            starts,
            lambda s: self.keys.job_shard(s.job_id),
            lambda k, part: self._start_many(k, worker_id, instance, part),
        )

    async def _start_many(self, k: Keys, worker_id: str, instance: str, starts: Sequence[Start]) -> list[int]:
        keys = [*k.namespace_keys(), *k.own_keys(worker_id)]
        args: list[Any] = [k.prefix, worker_id, instance, now_ms()]
        for s in starts:
            keys.append(k.job(s.job_id))
            args += (s.job_id, s.lease, s.event)
        return [int(c) for c in await self.scripts.start_many(keys=keys, args=args)]

    async def finish_many(
        self, worker_id: str, instance: str, outcomes: Sequence[Outcome], *, take: Collection[str] = ()
    ) -> Finished:
        """Records outcomes (per outcome 1 recorded, 2 recorded before, 0 stale, -1 missing), and
        refills the slots they free: as many waiting jobs as there are outcomes of jobs in ``take``
        (ids whose slot comes free here) are started on this worker at once (only while ``instance`` is the
        token of its registration), more are dispatched as a placement pass would. One call per
        shard the jobs name."""
        groups = by_shard(outcomes, lambda o: self.keys.job_shard(o.job_id))
        parts = await asyncio.gather(
            *(
                self._finish_many(
                    self.keys.at(shard),
                    worker_id,
                    instance,
                    [outcomes[i] for i in idx],
                    sum(1 for i in idx if outcomes[i].job_id in take),
                )
                for shard, idx in groups.items()
            )
        )
        if len(parts) == 1:
            return parts[0]
        codes = [0] * len(outcomes)
        for idx, part in zip(groups.values(), parts, strict=True):
            for i, code in zip(idx, part.codes, strict=True):
                codes[i] = code
        return Finished(
            codes, [p for part in parts for p in part.placements], [d for part in parts for d in part.taken]
        )

    async def _finish_many(
        self, k: Keys, worker_id: str, instance: str, outcomes: Sequence[Outcome], take: int
    ) -> Finished:
        keys = [*k.namespace_keys(), *k.own_keys(worker_id)]
        args: list[Any] = [k.prefix, worker_id, instance, now_ms(), PLACE_MOST, DEFAULT_ACK_MS, take]
        apart: list[tuple[Any, ...]] = []  # values written beside the call (record_outcome in the prelude)
        for o in outcomes:
            keys.append(k.job(o.job_id))
            result, output = o.result, o.output
            if (len(result) > SCRIPT_FIELD_BYTES or len(output) > SCRIPT_FIELD_BYTES) and self.writes_apart:
                flags = b""
                if result:
                    apart.append(("SET", k.staged(o.job_id, "result", o.lease), result, "PX", STAGED_MS))
                    flags += b"r"
                if len(output) > SCRIPT_FIELD_BYTES:
                    apart.append(("SET", k.staged(o.job_id, "output", o.lease), output, "PX", STAGED_MS))
                    flags, output = flags + b"o", b""
                result = APART + flags
            args += (o.job_id, o.lease, o.state, result, output, o.error_code, o.error_message, o.event)
        codes, flat, taken = await self.durably(self.scripts.finish_many, keys, args, apart)
        return Finished(
            [int(c) for c in codes],
            placements(flat),
            list(relay_pb2.DispatchJobs.FromString(taken).jobs) if taken else [],
        )

    async def specs(self, job_ids: Sequence[str]) -> list[bytes | None]:
        """The stored specs (JobSpec bytes) of placed jobs whose DispatchJob left them out
        (``spec_omitted``): plain HGETs, one pipeline per shard, so that large specs never pass
        through a script. None for a job that no longer exists."""
        return await per_shard(self.keys, job_ids, self.keys.job_shard, self._specs)

    async def _specs(self, k: Keys, job_ids: list[str]) -> list[bytes | None]:
        async with redis_errors():
            return await self.hgets([(k.job(job_id), "spec") for job_id in job_ids])

    async def progress(self, worker_id: str, reports: Sequence[Report]) -> int:
        """Records the progress of running jobs and publishes it; returns how many reports were
        recorded (those of jobs still RUNNING under their lease on this worker). One call per shard."""
        counts = await asyncio.gather(
            *(
                self._progress(self.keys.at(shard), worker_id, [reports[i] for i in idx])
                for shard, idx in by_shard(reports, lambda r: self.keys.job_shard(r.job_id)).items()
            )
        )
        return sum(counts)

    async def _progress(self, k: Keys, worker_id: str, reports: Sequence[Report]) -> int:
        keys = [*k.namespace_keys(), *k.own_keys(worker_id)]
        args: list[Any] = [k.prefix, worker_id]
        for r in reports:
            keys.append(k.job(r.job_id))
            args += (r.lease, r.progress, r.event)
        return int(await self.scripts.progress(keys=keys, args=args))

    async def status(self, worker_id: str, change: relay_pb2.WorkerStatus.Change) -> None:
        """Tells the gateways that this worker joined, is leaving or left."""
        msg = relay_pb2.WorkerStatus(worker_id=worker_id, change=change)
        await self.publish(self.keys.workers_channel(), msg.SerializeToString())  # one channel, on shard 0
