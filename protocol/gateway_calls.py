"""The gateway's side of the Redis protocol: submit, read, cancel, place, reap and list.

Every method is one Redis round trip (a script call or a pipeline). Script return codes become
domain errors here; Redis connection and timeout errors become :class:`Unavailable`.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

from redis.asyncio import Redis

from jobgate.v1 import job_pb2, relay_pb2, scheduler_pb2

from .calls import NO_WAIT, SCRIPT_FIELD_BYTES, Calls, Durability, by_shard
from .codec import job_from_hash, set_ms
from .connection import now_ms
from .errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    JobgateError,
    NotFound,
    ResourceExhausted,
    Unavailable,
    redis_errors,
)
from .keys import Keys, label_text, parse_group
from .replies import CancelOutcome, Placed, Settled, merge_placed, placements, settled, text


@dataclass(frozen=True, slots=True)
class PreparedJob:
    """A validated job: its new id, the normalised spec and what the submit script needs."""

    id: str
    spec: job_pb2.JobSpec
    spec_bytes: bytes
    timeout_ms: int
    idempotency_digest: str  # SHA-256 of the queue, a NUL and the idempotency key; '' without a key
    request_digest: str  # SHA-256 of the normalised spec, '' without an idempotency key
    field: str = ""  # where the job sits in its request, for error messages: '', 'job.', 'jobs[3].'
    due_ms: int = 0  # when it may first run (ms since the epoch); 0: at once
    backoff: str = "1000,300000,2"  # its retry backoff: "initial,max,multiplier" (ms), as lua/_common.lua reads it
    retention_s: int = 86_400  # how long it is kept once finished
    dead_retention_s: int = 604_800  # how long it is kept once FAILED
    unique_digest: str = ""  # SHA-256 of the queue, a NUL and the unique key; '' without a key
    group: str = ""  # its placement group when it requires worker labels (Keys.placement_group), else ''
    depends: tuple[str, ...] = ()  # ids of the jobs it depends on


@dataclass(frozen=True, slots=True)
class QueueLimitValues:
    """A queue's limits (SetQueueLimits); None where it has none. A rate is (starts, period ms)."""

    max_running: int | None = None
    rate: tuple[int, int] | None = None
    max_running_per_key: int | None = None
    rate_per_key: tuple[int, int] | None = None


LIST_SCAN_FACTOR = 10  # ListJobs reads at most this many entries per job of a page
LIST_SCAN_MOST = 10_000  # and at most this many in all
STATS_WINDOW_HOURS = 168  # the ends counted by GetQueueStats: at most 7 days (P ended: hashes live 8)


def idempotency_digest(queue: str, key: str) -> str:
    """What names an idempotency key in Redis: the SHA-256 of the queue, a NUL and the key (keys are
    per queue, so a token limited to other queues can neither see nor claim one)."""
    return hashlib.sha256(f"{queue}\0{key}".encode()).hexdigest()


class _Refused(Exception):
    """The submit script refused job ``index`` of its call (and stored nothing)."""

    def __init__(self, index: int, error: JobgateError) -> None:
        super().__init__(error.message)
        self.index = index
        self.error = error


class GatewayCalls(Calls):
    """The gateway's calls: submit, read, cancel, place, reap and list, for one namespace."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        idempotency_ttl_s: int,
        max_queues: int = 1000,
        max_kinds: int = 1000,
        ack_timeout_ms: int = 5000,
        place_most: int = 500,
        durability: Durability = NO_WAIT,
    ) -> None:
        super().__init__(redis, keys, durability)
        self.idempotency_ttl_s = idempotency_ttl_s
        self.max_queues = max_queues
        self.max_kinds = max_kinds
        self.ack_timeout_ms = ack_timeout_ms  # stored with each job: how long a worker has to start it
        self.place_most = place_most

    # --- submission -----------------------------------------------------------------------
    async def submit(
        self, jobs: Sequence[PreparedJob], batch: tuple[str, bytes] | None = None
    ) -> tuple[list[job_pb2.Job], Placed]:
        """Stores jobs with one script call per shard their queues fall in (all or none within a
        shard) and returns them as stored, with the placements the same calls made (up to
        ``place_most`` per queue, published by the script). Each job's id is made to name its
        queue's shard (see Keys.job_id_for).

        With ``batch`` (an id that names the jobs' shard, and the callback's SubmitJobRequest bytes
        or b''), the new jobs form that batch; they must all go to queues of one shard.

        Raises AlreadyExists when an idempotency key is reused with a different request,
        ResourceExhausted when a job would add a queue or a kind over the limits (nothing of that
        shard's part is written then; the parts of shards stored before it stand), Unavailable when
        Redis cannot be reached.
        """
        jobs = self._with_shard_ids(jobs)
        groups = self._by_shard(jobs)
        out: list[job_pb2.Job | None] = [None] * len(jobs)
        placed: list[Placed] = []
        for idx in groups:
            try:
                stored, p = await self._submit_call([jobs[i] for i in idx], batch)
            except _Refused as refused:
                raise refused.error from None
            for i, job in zip(idx, stored, strict=True):
                out[i] = job
            placed.append(p)
        return [j for j in out if j is not None], merge_placed(placed)

    async def submit_each(self, jobs: Sequence[PreparedJob]) -> tuple[list[job_pb2.Job | JobgateError], list[Placed]]:
        """Stores unrelated jobs (single submits that arrived together) in as few script calls as
        possible (one shard's jobs per call, the shards at once), each accepted or refused on its
        own: per job, the stored job or the error a submit of it alone would raise (Unavailable for
        those of a call Redis did not answer, and of calls of its shard not sent after it); and what
        each call placed. Two jobs with the same idempotency key never share a call, so the second
        sees the first."""
        jobs = self._with_shard_ids(jobs)
        results: list[job_pb2.Job | JobgateError | None] = [None] * len(jobs)
        calls: list[Placed] = []
        groups = self._by_shard(jobs)
        if len(groups) == 1:  # no task to gather: one turn of the event loop less
            await self._submit_each_shard(jobs, groups[0], results, calls)
        else:
            await asyncio.gather(*(self._submit_each_shard(jobs, idx, results, calls) for idx in groups))
        return [r for r in results if r is not None], calls

    async def _submit_each_shard(
        self,
        jobs: Sequence[PreparedJob],
        pending: list[int],
        results: list[job_pb2.Job | JobgateError | None],
        calls: list[Placed],
    ) -> None:
        while pending:
            batch: list[int] = []
            later: list[int] = []
            digests: set[str] = set()
            for i in pending:
                digest = jobs[i].idempotency_digest
                (later if digest and digest in digests else batch).append(i)
                digests.add(digest)
            try:
                stored, placed = await self._submit_call([jobs[i] for i in batch])
            except _Refused as refused:  # nothing of the call was stored: the others go again
                results[batch[refused.index]] = refused.error
                pending = [i for n, i in enumerate(batch) if n != refused.index] + later
                continue
            except Unavailable as exc:  # this call and those not sent yet fail; earlier calls stand
                for i in pending:
                    results[i] = exc
                return
            for i, job in zip(batch, stored, strict=True):
                results[i] = job
            calls.append(placed)
            pending = later

    def _with_shard_ids(self, jobs: Sequence[PreparedJob]) -> Sequence[PreparedJob]:
        """The jobs with ids that name their queues' shards. Raises InvalidArgument for a job that
        depends on a job of another shard."""
        if self.keys.shards == 1:
            return jobs
        for job in jobs:
            shard = self.keys.queue_shard(job.spec.queue)
            for i, dep in enumerate(job.depends):
                if self.keys.job_shard(dep) != shard:
                    raise InvalidArgument(
                        f"{job.field}depends_on[{i}]: job {dep} is in another shard than queue {job.spec.queue!r}"
                    )
        return [replace(j, id=self.keys.job_id_for(j.id, j.spec.queue)) for j in jobs]

    def _by_shard(self, jobs: Sequence[PreparedJob]) -> list[list[int]]:
        """The indexes of ``jobs`` grouped by the shard of their queue, in order of first appearance."""
        return list(by_shard(jobs, lambda j: self.keys.queue_shard(j.spec.queue)).values())

    async def _submit_call(
        self, jobs: Sequence[PreparedJob], batch: tuple[str, bytes] | None = None
    ) -> tuple[list[job_pb2.Job], Placed]:
        """One submit script call for jobs of one shard (and the batch they open, if any)."""
        k, now = self.keys.of_queue(jobs[0].spec.queue), now_ms()
        keys = [*k.namespace_keys(), k.batch(batch[0]) if batch else k.prefix + "batch:none", k.known_queues()]
        args: list[Any] = [now, self.idempotency_ttl_s, self.max_queues, self.max_kinds]
        args += [k.prefix, self.ack_timeout_ms, self.place_most, batch[0] if batch else "", batch[1] if batch else ""]
        apart: list[tuple[Any, ...]] = []  # specs written beside the call (see submit.lua)
        for job in jobs:
            spec = job.spec
            spec_arg = job.spec_bytes
            if len(spec_arg) > SCRIPT_FIELD_BYTES and self.writes_apart:
                apart.append(("HSET", k.job(job.id), "spec", spec_arg))
                spec_arg = b""
            keys += [
                k.job(job.id),
                k.pending(spec.queue, job.group or spec.kind),
                k.idempotency(job.idempotency_digest or "none"),
                k.queue_kinds(spec.queue),
                k.unique(job.unique_digest or "none"),
            ]
            args += [
                job.id,
                spec_arg,
                spec.queue,
                spec.kind,
                spec.priority,
                spec.max_attempts,
                job.timeout_ms,
                job.request_digest,
                job.due_ms,
                job.backoff,
                job.retention_s,
                job.dead_retention_s,
                job.unique_digest,
                job.group,
                ",".join(job.depends),
                job.spec.concurrency_key,
            ]
        async with redis_errors():
            reply = await self.durably(self.scripts.submit, keys, args, apart)
        status = int(reply[0])
        if status < 0:
            index = int(reply[1])
            raise _Refused(index, self._refusal(status, jobs[index], reply[2:]))
        out: list[job_pb2.Job] = []
        for job, code, stored_id in zip(jobs, reply[3::2], reply[4::2], strict=True):
            if int(code) in (2, 4):  # the original job; or one FAILED at once (a dependency failed)
                out.append(await self.get(stored_id.decode()))
                continue
            stored = job_pb2.Job(id=job.id, spec=job.spec, state=job_pb2.JOB_STATE_QUEUED)
            if batch:
                stored.batch_id = batch[0]
            set_ms(stored.created_at, now)
            if job.due_ms > now:
                stored.state = job_pb2.JOB_STATE_SCHEDULED
                set_ms(stored.due_at, job.due_ms)
            if int(code) == 3:
                stored.state = job_pb2.JOB_STATE_BLOCKED
            out.append(stored)
        if self.place_most > 0:
            visited = {text(q): left == 1 for q, left in zip(reply[2][::2], reply[2][1::2], strict=True)}
        else:  # nothing was placed: whatever was stored waits
            visited = {job.spec.queue: True for job in jobs}
        return out, Placed(placements(reply[1]), {q for q, left in visited.items() if left}, set(visited))

    def _refusal(self, status: int, job: PreparedJob, rest: Sequence[Any]) -> JobgateError:
        """The error for a submit the script refused (nothing was stored)."""
        if status == -2:
            return AlreadyExists(
                f"{job.field}idempotency_key: already used by job {text(rest[0])} with a different request"
            )
        if status == -6:
            return InvalidArgument(f"{job.field}depends_on: no job {text(rest[0])}")
        if status == -5:
            return AlreadyExists(
                f"{job.field}unique_key: job {text(rest[0])} with this unique_key has not finished; submit again"
                " once it has"
            )
        if status == -3:
            return ResourceExhausted(
                f"{job.field}queue: {self.max_queues} queues already hold waiting jobs (max_queues);"
                " use one of them or retry when one drains"
            )
        return ResourceExhausted(
            f"{job.field}kind: queue {job.spec.queue!r} already holds waiting jobs of {self.max_kinds} kinds"
            " (max_kinds); retry when one drains"
        )

    # --- reads ----------------------------------------------------------------------------
    async def get(self, job_id: str) -> job_pb2.Job:
        """The stored job. Raises NotFound, Unavailable."""
        async with redis_errors():
            fields = cast(dict[bytes, Any], await self.redis.hgetall(self.keys.job(job_id)))
            await self.values_apart([(job_id, fields)])
        if not fields:
            raise NotFound(f"id: no job {job_id}")
        return job_from_hash(job_id, fields)

    async def get_batch(self, batch_id: str) -> dict[bytes, bytes]:
        """A batch's hash (empty when unknown). Raises Unavailable."""
        async with redis_errors():
            return cast(dict[bytes, bytes], await self.redis.hgetall(self.keys.batch(batch_id)))

    async def ended_batches(self, limit: int = 100) -> list[tuple[str, bytes]]:
        """Batches whose jobs have all ended and whose callback waits to be submitted, in every
        shard: (batch id, callback SubmitJobRequest bytes)."""
        out = []
        async with redis_errors():
            for k in self.keys.all_shards():
                ids = [text(i) for i in await self.redis.zrange(k.batches_done(), 0, limit - 1)]
                for batch_id in ids:
                    callback, submitted = await self.redis.hmget(k.batch(batch_id), "callback", "callback_job")
                    if callback and not submitted:
                        out.append((batch_id, callback if isinstance(callback, bytes) else callback.encode()))
                    else:  # expired, or recorded by another gateway
                        await self.redis.zrem(k.batches_done(), batch_id)
        return out

    async def batch_callback_submitted(self, batch_id: str, job_id: str) -> None:
        """Records a batch's callback job and takes the batch off the ended list."""
        k = self.keys.of_job(batch_id)
        async with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:  # each step safe to repeat
                pipe.hset(k.batch(batch_id), "callback_job", job_id)
                pipe.zrem(k.batches_done(), batch_id)
                await pipe.execute()

    async def idempotent_job(self, queue: str, key: str) -> str:
        """The id of the job stored with idempotency ``key`` in ``queue`` (remembered for
        idempotency_ttl_s), or ''. Raises Unavailable."""
        async with redis_errors():
            found = await self.redis.get(self.keys.of_queue(queue).idempotency(idempotency_digest(queue, key)))
        return text(found).split(" ")[0] if found else ""

    async def waiting_reason(self, job: job_pb2.Job) -> str:
        """Why ``job`` (as stored) is not running yet, in words; '' when it is running or finished.
        Reads the queue's pause flag and its live workers (bounded by the workers of one queue)."""
        queue, kind = job.spec.queue, job.spec.kind
        reason = await self._key_reason(job) or await self._held_reason(job)
        if reason or job.state != job_pb2.JOB_STATE_QUEUED:
            return reason
        k, now = self.keys.of_queue(queue), now_ms()
        async with redis_errors():
            paused = await self.redis.hget(k.queue_settings(queue), "paused")
            if paused == b"1":
                return f"queue {queue!r} is paused (ResumeQueue resumes it)"
            ids = [text(w) for w in await self.redis.smembers(k.queue_workers(queue))]
            async with self.redis.pipeline(transaction=False) as pipe:
                for w in ids:
                    pipe.hmget(k.worker(w), "slots", "used", "expires", "kinds", "off", "labels")
                rows = await pipe.execute()
        live = [r for r in rows if r[0] is not None and int(r[2] or 0) > now]
        if not live:
            return f"no live worker serves queue {queue!r}"
        handled = {text(kd) for r in live for kd in (r[3] or b"").split(b",") if kd}
        able = [r for r in live if _handles(r[3], kind)]
        if not able:
            return (
                f"no live worker of queue {queue!r} has a handler for kind {kind!r}"
                f" (they handle: {', '.join(sorted(handled))})"
            )
        able = [r for r in able if _has_labels(r[5], job.spec.labels)]
        if not able:
            labels = label_text(job.spec.labels)
            return f"no live worker of queue {queue!r} that runs kind {kind!r} has the labels {labels}"
        taking = [r for r in able if r[4] != b"1"]
        if not taking:
            return f"the live workers that can run kind {kind!r} take no jobs now (starting up or leaving)"
        if any(int(r[1] or 0) < int(r[0]) for r in taking):
            return "about to be placed: a live worker that can run it has a free slot"
        slots = sum(int(r[0]) for r in taking)
        return (
            f"waiting for a free slot: the {len(taking)} live worker(s) that can run it have {slots} slot(s), all busy"
        )

    async def _held_reason(self, job: job_pb2.Job) -> str:
        """Why a SCHEDULED, DISPATCHED or BLOCKED ``job`` is not running yet; '' for another state."""
        if job.state == job_pb2.JOB_STATE_SCHEDULED:
            failed = f" after attempt {job.attempt} failed ({job.error.code})" if job.attempt else ""
            return f"scheduled{failed}: due at {job.due_at.ToJsonString()}"
        if job.state == job_pb2.JOB_STATE_DISPATCHED:
            return f"dispatched to worker {job.worker_id}, which has not started it yet"
        if job.state == job_pb2.JOB_STATE_BLOCKED:
            async with redis_errors():
                left = await self.redis.hget(self.keys.job(job.id), "deps_left")
            return f"waiting for {int(left or 0)} of the {len(job.spec.depends_on)} job(s) it depends on to succeed"
        return ""

    async def _key_reason(self, job: job_pb2.Job) -> str:
        """Why ``job`` waits for its concurrency key, or '' when it is the key's head (in line with
        the queue's other jobs) for another reason."""
        queue, key = job.spec.queue, job.spec.concurrency_key
        if not key or job.state not in (job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_SCHEDULED):
            return ""
        k = self.keys.of_queue(queue)
        async with redis_errors():
            running, head = await self.redis.hmget(k.concurrency_key(queue, key), "running", "head")
            limits = await self.limits(queue)
        if text(head or b"") == job.id:
            if job.state == job_pb2.JOB_STATE_SCHEDULED and limits.rate_per_key:
                n, ms = limits.rate_per_key
                return (
                    f"concurrency key {key!r} has used its {n} start(s) per {ms / 1000:g} s"
                    f" (rate_per_key): due at {job.due_at.ToJsonString()}"
                )
            return ""
        if job.state != job_pb2.JOB_STATE_QUEUED:
            return ""
        most = limits.max_running_per_key
        placed = int(running or 0)
        if most is not None and placed >= most:
            return (
                f"concurrency key {key!r} has {placed} job(s) placed, its limit (max_running_per_key {most}):"
                " it waits for one of them to end"
            )
        return f"waiting its turn behind the earlier jobs of concurrency key {key!r}"

    async def unserved(self, queues: Sequence[str]) -> list[tuple[str, str]]:
        """The (queue, kind) pairs among ``queues`` with jobs waiting that no live worker of the queue
        has a handler for (a typo in a kind, a worker not deployed). Two round trips."""
        now = now_ms()
        async with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for q in queues:
                    pipe.smembers(self.keys.queue_kinds(q))
                    pipe.smembers(self.keys.queue_workers(q))
                sets = await pipe.execute()
            kinds = [sorted(text(kd) for kd in s) for s in sets[::2]]
            workers = [[text(w) for w in s] for s in sets[1::2]]
            async with self.redis.pipeline(transaction=False) as pipe:
                for q, ws in zip(queues, workers, strict=True):
                    k = self.keys.of_queue(q)
                    for w in ws:
                        pipe.hmget(k.worker(w), "expires", "kinds", "labels")
                rows = iter(await pipe.execute())
        out = []
        for q, groups, ws in zip(queues, kinds, workers, strict=True):
            live = [r for r in (next(rows) for _ in ws) if r[0] is not None and int(r[0]) > now]
            for group in groups:
                kind, labels = parse_group(group)
                if not any(_handles(r[1], kind) and _has_labels(r[2], labels) for r in live):
                    out.append((q, group))
        return out

    async def queue_names(self) -> list[str]:
        """Every queue that may hold waiting jobs (placement drops a queue once it is empty), in
        every shard."""
        async with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for k in self.keys.all_shards():
                    pipe.smembers(k.queues())
                replies = await pipe.execute()
        return sorted({text(q) for members in replies for q in members})

    async def census(self, queues: Sequence[str]) -> tuple[dict[str, int], int]:
        """Waiting jobs per queue and the number of live workers (two round trips)."""
        k = self.keys
        shards = k.all_shards()
        async with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for queue in queues:
                    pipe.smembers(k.queue_kinds(queue))
                for sk in shards:
                    pipe.zrangebyscore(sk.workers(), now_ms(), "+inf")
                replies = await pipe.execute()
            kinds = [sorted(text(kind) for kind in members) for members in replies[: len(queues)]]
            async with self.redis.pipeline(transaction=False) as pipe:
                for queue, queue_kinds in zip(queues, kinds, strict=True):
                    for kind in queue_kinds:
                        pipe.zcard(k.pending(queue, kind))
                counts = iter(await pipe.execute())
        waiting = {
            queue: sum(next(counts) for _ in queue_kinds) for queue, queue_kinds in zip(queues, kinds, strict=True)
        }
        live = {w for ids in replies[len(queues) :] for w in ids}  # a worker registers in each shard it serves
        return waiting, len(live)

    async def workers(self) -> list[scheduler_pb2.WorkerInfo]:
        """Live workers (heartbeat not expired), by id; a worker serving queues of several shards
        is one entry, with the slots and busy slots of its registrations summed."""
        now = now_ms()
        found: dict[str, scheduler_pb2.WorkerInfo] = {}
        async with redis_errors():
            for k in self.keys.all_shards():
                ids = cast(list[bytes], await self.redis.zrangebyscore(k.workers(), now, "+inf"))
                async with self.redis.pipeline(transaction=False) as pipe:
                    for wid in ids:
                        pipe.hgetall(k.worker(wid.decode()))
                    hashes = await pipe.execute()
                for wid, h in zip(ids, hashes, strict=True):
                    if h:
                        _add_registration(found, wid.decode(), h)
        return sorted(found.values(), key=lambda w: w.id)

    # --- transitions ----------------------------------------------------------------------
    async def cancel(self, job_id: str) -> CancelOutcome:
        """Cancels a job. Raises NotFound, FailedPrecondition (already terminal), Unavailable."""
        k = self.keys.of_job(job_id)
        async with redis_errors():
            reply = await self.durably(
                self.scripts.cancel, [*k.namespace_keys(), k.job(job_id)], [k.prefix, job_id, now_ms()]
            )
        code = reply[0]
        if code == -1:
            raise NotFound(f"id: no job {job_id}")
        if code == -2:
            raise FailedPrecondition(f"id: job {job_id} has already finished")
        if code == 2:
            return CancelOutcome(worker_id=reply[1].decode(), lease=int(reply[2]))
        return CancelOutcome(queue=reply[1].decode())

    async def pause(self, queue: str, paused: bool) -> bool:
        """Pauses (or resumes) ``queue``; returns True when it was so already. Raises Unavailable."""
        k = self.keys.of_queue(queue)
        async with redis_errors():
            reply = await self.durably(
                self.scripts.pause, [*k.namespace_keys(), k.queue_settings(queue)], ["1" if paused else "0"]
            )
            await self.redis.sadd(k.known_queues(), queue)
        return int(reply) == 1

    async def set_limits(self, queue: str, limits: QueueLimitValues) -> None:
        """Sets ``queue``'s limits (None removes one). Raises Unavailable."""
        k = self.keys.of_queue(queue)
        args: list[Any] = []
        for most, rate in ((limits.max_running, limits.rate), (limits.max_running_per_key, limits.rate_per_key)):
            args += ["" if most is None else most, *(rate if rate else ("", ""))]
        async with redis_errors():
            await self.durably(self.scripts.limits, [*k.namespace_keys(), k.queue_settings(queue)], args)
            await self.redis.sadd(k.known_queues(), queue)

    async def limits(self, queue: str) -> QueueLimitValues:
        """``queue``'s limits. Raises Unavailable."""
        async with redis_errors():
            got = await self.redis.hmget(self.keys.queue_settings(queue), *LIMIT_FIELDS)
        return _limit_values({f: text(v) for f, v in zip(LIMIT_FIELDS, got, strict=True) if v is not None})

    async def retry(self, job_id: str) -> str:
        """Puts a FAILED or CANCELLED job back in its queue with a fresh count of attempts (its QUEUED
        event published); returns the queue. Raises NotFound, FailedPrecondition, Unavailable."""
        k = self.keys.of_job(job_id)
        async with redis_errors():
            reply = await self.durably(
                self.scripts.retry, [*k.namespace_keys(), k.job(job_id)], [k.prefix, job_id, now_ms()]
            )
        if reply[0] == -1:
            raise NotFound(f"id: no job {job_id}")
        if reply[0] == -2:
            state = job_pb2.JobState.Name(int(reply[1])).removeprefix("JOB_STATE_")
            raise FailedPrecondition(f"id: job {job_id} is {state}; only a FAILED or CANCELLED job can be retried")
        if reply[0] == -3:
            raise AlreadyExists(f"id: job {text(reply[1])} holds this job's unique_key and has not finished")
        return text(reply[1])

    async def failed_jobs(
        self, queue: str, size: int, after: tuple[int, str] | None, *, apart: bool = True
    ) -> list[job_pb2.Job]:
        """Up to ``size`` FAILED jobs of ``queue``, the most recently failed first, starting after
        ``after`` (the failure time in ms and id of the last job of the previous page). Forgets
        entries whose jobs have expired or left FAILED. Without ``apart``, results and outputs kept
        apart from their job hashes are not read (a reply that leaves them out). Raises Unavailable."""
        key = self.keys.failed(queue)
        top = "+inf" if after is None else after[0]
        out: list[job_pb2.Job] = []
        offset = 0
        async with redis_errors():
            while len(out) < size:
                chunk = max(size - len(out), 16)
                rows = cast(
                    list[tuple[bytes, float]],
                    await self.redis.zrevrangebyscore(key, top, "-inf", start=offset, num=chunk, withscores=True),
                )
                if not rows:
                    break
                offset += len(rows)
                # jobs that failed in the same millisecond come in descending id order
                ids = [text(m) for m, score in rows if after is None or int(score) < after[0] or text(m) < after[1]]
                async with self.redis.pipeline(transaction=False) as pipe:
                    for jid in ids:
                        pipe.hgetall(self.keys.job(jid))
                    hashes = await pipe.execute()
                if apart:
                    await self.values_apart(list(zip(ids, hashes, strict=True)))
                gone = []
                for jid, fields in zip(ids, hashes, strict=True):
                    if fields and int(fields.get(b"state", 0)) == job_pb2.JOB_STATE_FAILED:
                        out.append(job_from_hash(jid, fields))
                    else:
                        gone.append(jid)
                if gone:
                    await self.redis.zrem(key, *gone)
                    offset -= len(gone)
        return out[:size]

    async def list_jobs(
        self, queue: str, states: frozenset[int], kind: str, size: int, before: int | None, *, apart: bool = True
    ) -> tuple[list[job_pb2.Job], int | None]:
        """Up to ``size`` jobs of ``queue`` in ``states`` (all when empty) and of ``kind`` (all when
        ''), newest first, from those submitted before seq ``before`` (None: from the newest). Reads
        at most ``LIST_SCAN_FACTOR`` times ``size`` entries of the queue's jobs zset (up to
        ``LIST_SCAN_MOST``); returns the jobs and the seq to go on before, or None at the oldest.
        Without ``apart``, as failed_jobs. Raises Unavailable."""
        key = self.keys.jobs(queue)
        budget = min(LIST_SCAN_FACTOR * size, LIST_SCAN_MOST)
        out: list[job_pb2.Job] = []
        read = 0
        async with redis_errors():
            while read < budget:
                top = "+inf" if before is None else f"({before}"
                chunk = min(budget - read, max(2 * size, 100))
                rows = cast(
                    list[tuple[bytes, float]],
                    await self.redis.zrevrangebyscore(key, top, "-inf", start=0, num=chunk, withscores=True),
                )
                if not rows:
                    return out, None
                ids = [text(m) for m, _ in rows]
                async with self.redis.pipeline(transaction=False) as pipe:
                    for jid in ids:
                        pipe.hmget(self.keys.job(jid), "state", "kind")
                    heads = await pipe.execute()
                for n, ((member, score), (state, job_kind)) in enumerate(zip(rows, heads, strict=True)):
                    read += 1
                    before = int(score)
                    if state is None or (states and int(state) not in states) or (kind and text(job_kind) != kind):
                        continue
                    out.append(job_pb2.Job(id=text(member)))
                    if len(out) == size:
                        if n == len(rows) - 1 and len(rows) < chunk:
                            before = None  # that was the oldest
                        break
                if len(out) == size or before is None:
                    break
                if len(rows) < chunk:
                    before = None  # the oldest was read
                    break
            async with self.redis.pipeline(transaction=False) as pipe:
                for job in out:
                    pipe.hgetall(self.keys.job(job.id))
                hashes = await pipe.execute()
            if apart:
                await self.values_apart([(job.id, h) for job, h in zip(out, hashes, strict=True)])
        found = [job_from_hash(job.id, h) for job, h in zip(out, hashes, strict=True) if h]
        return found, before

    async def known_queues(self) -> list[str]:
        """Every queue that has had jobs, limits or a pause, or has jobs waiting, in every shard."""
        async with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for k in self.keys.all_shards():
                    pipe.smembers(k.known_queues())
                    pipe.smembers(k.queues())
                replies = await pipe.execute()
        return sorted({text(q) for members in replies for q in members})

    async def queue_stats(self, queue: str, window_s: int) -> tuple[scheduler_pb2.QueueStats, QueueLimitValues]:
        """``queue``'s counts, rates and limits now; ends are counted over ``window_s`` (whole
        hours, at most ``STATS_WINDOW_HOURS``). Three round trips, bounded by the queue's kinds and
        workers and the window's hours. Raises Unavailable."""
        k, now = self.keys, now_ms()
        hour = now // 3_600_000
        hours = max(1, min(STATS_WINDOW_HOURS, -(-window_s // 3600)))
        async with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(k.queue_settings(queue))
                pipe.smembers(k.queue_kinds(queue))
                pipe.scard(k.running(queue))
                pipe.zcard(k.failed(queue))
                pipe.smembers(k.queue_workers(queue))
                for h in range(hour - hours + 1, hour + 1):
                    pipe.hgetall(k.ended(queue, h))
                settings, groups, running, dead, worker_ids, *ended = await pipe.execute()
            groups = sorted(text(g) for g in groups)
            worker_ids = [text(w) for w in worker_ids]
            async with self.redis.pipeline(transaction=False) as pipe:
                for g in groups:
                    pipe.zcard(k.pending(queue, g))
                    pipe.zrange(k.pending(queue, g), 0, 9)
                for w in worker_ids:
                    pipe.hmget(k.worker(w), "slots", "expires")
                replies = await pipe.execute()
            heads = [text(j) for ids in replies[1 : 2 * len(groups) : 2] for j in ids]
            async with self.redis.pipeline(transaction=False) as pipe:
                for j in heads:
                    pipe.hget(k.job(j), "created")
                created = [int(c) for c in await pipe.execute() if c]
        settings = {text(f): text(v) for f, v in settings.items()}
        stats = scheduler_pb2.QueueStats(
            queue=queue,
            waiting=sum(replies[0 : 2 * len(groups) : 2]) + int(settings.get("n_lined", 0)),
            scheduled=int(settings.get("n_scheduled", 0)),
            running=running,
            blocked=int(settings.get("n_blocked", 0)),
            dead_letters=dead,
            paused=settings.get("paused") == "1",
        )
        stats.window.FromSeconds(hours * 3600)
        by_minute = _count_ends(stats, dict(zip(range(hour - hours + 1, hour + 1), ended, strict=True)), now)
        stats.ended_per_minute_1m = float(by_minute[-1])
        stats.ended_per_minute_5m = sum(by_minute[-5:]) / 5
        stats.ended_per_minute_15m = sum(by_minute[-15:]) / 15
        if created:
            stats.oldest_waiting_age.FromMilliseconds(max(0, now - min(created)))
        for slots, expires in replies[2 * len(groups) :]:
            if slots is not None and int(expires or 0) > now:
                stats.workers += 1
                stats.slots += int(slots)
        return stats, _limit_values(settings)

    async def schedule(self, queue: str, *, ack_timeout_ms: int | None = None, most: int | None = None) -> Placed:
        """Places and publishes up to ``most`` (default ``place_most``) waiting jobs of ``queue`` on
        free worker slots (atomic; safe across gateways), each to be started within the job's stored
        ack timeout (``ack_timeout_ms``, default this gateway's, for a job stored without one).
        Raises Unavailable."""
        ack_timeout_ms = self.ack_timeout_ms if ack_timeout_ms is None else ack_timeout_ms
        most = self.place_most if most is None else most
        k, now = self.keys.of_queue(queue), now_ms()
        async with redis_errors():
            flat = await self.scripts.schedule(
                keys=[*k.namespace_keys(), k.queue_kinds(queue), k.queue_workers(queue)],
                args=[k.prefix, now, ack_timeout_ms, queue, most],
            )
        return Placed(placements(flat[1:]), {queue} if flat[0] == 1 else set(), {queue})

    async def tell_worker_to_cancel(self, worker_id: str, job_id: str, lease: int) -> None:
        """Publishes a CancelJob on the worker's channel (nobody listening: its reaping cancels)."""
        await self.publish(self.keys.of_job(job_id).dispatch_channel(worker_id), _cancel_message(job_id, lease))

    async def resend_cancels(self, older_than_ms: int, limit: int = 100) -> int:
        """Tells workers again to stop RUNNING jobs whose cancellation they were told of more than
        ``older_than_ms`` ago (a CancelJob message can be lost like any pub/sub message); forgets
        jobs that have ended. Returns how many were told again, in every shard."""
        told = 0
        for k in self.keys.all_shards():
            told += await self._resend_cancels(k, older_than_ms, limit)
        return told

    async def _resend_cancels(self, k: Keys, older_than_ms: int, limit: int) -> int:
        now = now_ms()
        async with redis_errors():
            ids = [text(j) for j in await self.redis.zrangebyscore(k.cancels(), "-inf", now - older_than_ms, 0, limit)]
            if not ids:
                return 0
            async with self.redis.pipeline(transaction=False) as pipe:
                for jid in ids:
                    pipe.hmget(k.job(jid), "state", "worker", "lease", "cancel")
                rows = await pipe.execute()
            told, ended = [], []
            for jid, (state, worker, lease, flag) in zip(ids, rows, strict=True):
                if state is not None and int(state) == job_pb2.JOB_STATE_RUNNING and flag and worker:
                    told.append((jid, text(worker), int(lease)))
                else:
                    ended.append(jid)
            async with self.redis.pipeline(transaction=False) as pipe:
                for jid, worker_id, lease in told:
                    publish = pipe.spublish if self.sharded else pipe.publish
                    publish(k.dispatch_channel(worker_id), _cancel_message(jid, lease))
                    pipe.zadd(k.cancels(), {jid: now}, xx=True)
                if ended:
                    pipe.zrem(k.cancels(), *ended)
                await pipe.execute()
        return len(told)

    async def promote(self, limit: int = 1000) -> set[str]:
        """Queues the SCHEDULED jobs that are due (delayed submits, retries whose backoff is over), in
        every shard; returns the queues they went to."""
        queues: set[str] = set()
        async with redis_errors():
            for k in self.keys.all_shards():
                more = True
                while more:
                    reply = [
                        text(q)
                        for q in await self.scripts.promote(keys=k.namespace_keys(), args=[k.prefix, now_ms(), limit])
                    ]
                    more = bool(reply) and reply[-1] == ""
                    queues.update(q for q in reply if q)
        return queues

    async def next_due(self) -> int | None:
        """When the earliest SCHEDULED job of any shard is due (ms), or None when none waits."""
        async with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for k in self.keys.all_shards():
                    pipe.zrange(k.delayed(), 0, 0, withscores=True)
                firsts = await pipe.execute()
        dues = [int(score) for first in firsts for _, score in first]
        return min(dues) if dues else None

    async def reap(self, limit: int = 100) -> list[Settled]:
        """Settles jobs of expired workers and unacknowledged dispatches, in every shard."""
        out: list[Settled] = []
        async with redis_errors():
            for k in self.keys.all_shards():
                flat = await self.scripts.reap(keys=k.namespace_keys(), args=[k.prefix, now_ms(), limit])
                out += settled(flat)
        return out


LIMIT_FIELDS = ("max_running", "rate_n", "rate_ms", "key_max_running", "key_rate_n", "key_rate_ms")


def _limit_values(settings: Mapping[str, str]) -> QueueLimitValues:
    """A queue's limits from the fields of its settings hash."""
    num = [int(settings[f]) if settings.get(f) else None for f in LIMIT_FIELDS]
    return QueueLimitValues(
        num[0],
        (num[1], num[2]) if num[1] and num[2] else None,
        num[3],
        (num[4], num[5]) if num[4] and num[5] else None,
    )


ENDED_FIELDS = {
    str(job_pb2.JOB_STATE_SUCCEEDED): "succeeded",
    str(job_pb2.JOB_STATE_FAILED): "failed",
    str(job_pb2.JOB_STATE_CANCELLED): "cancelled",
}


def _count_ends(stats: scheduler_pb2.QueueStats, ended: Mapping[int, Mapping[bytes, bytes]], now: int) -> list[int]:
    """Adds the ends of the hours ``ended`` (hour -> its P ended: hash) to ``stats``'s counts by
    state and its ends of the last 60 minutes (oldest first, which it returns too)."""
    by_minute = [0] * 60
    minute_now = now // 60_000
    for hour, counts in ended.items():
        for field, n in counts.items():
            minute, _, state = text(field).partition(":")
            name = ENDED_FIELDS.get(state)
            if name:
                setattr(stats, name, getattr(stats, name) + int(n))
            ago = minute_now - (hour * 60 + int(minute))
            if 0 <= ago < 60:
                by_minute[59 - ago] += int(n)
    stats.ended_by_minute.extend(by_minute)
    return by_minute


def _handles(kinds: bytes | None, kind: str) -> bool:
    """Whether a worker registered with ``kinds`` (its hash's field: '' or absent for any) runs ``kind``."""
    return not kinds or kind in text(kinds).split(",")


def _has_labels(labels: bytes | None, needed: Mapping[str, str]) -> bool:
    """Whether a worker registered with ``labels`` (its hash's field) has every label of ``needed``."""
    return {f"{n}={v}" for n, v in needed.items()} <= set(text(labels or b"").split(","))


def _add_registration(found: dict[str, scheduler_pb2.WorkerInfo], worker_id: str, h: dict[bytes, bytes]) -> None:
    """Adds one shard's registration of a worker (its hash) to ``found``."""
    queues = [q for q in h.get(b"queues", b"").decode().split(",") if q]
    seen = int(h.get(b"seen", 0))
    info = found.get(worker_id)
    if info is not None:
        info.queues.extend(queues)
        info.slots += int(h.get(b"slots", 0))
        info.busy += int(h.get(b"used", 0))
        if seen > info.last_seen.ToMilliseconds():
            info.last_seen.FromMilliseconds(seen)
        return
    info = scheduler_pb2.WorkerInfo(
        id=worker_id,
        queues=queues,
        kinds=[q for q in h.get(b"kinds", b"").decode().split(",") if q],
        slots=int(h.get(b"slots", 0)),
        busy=int(h.get(b"used", 0)),
        host=h.get(b"host", b"").decode(),
        pid=int(h.get(b"pid", 0)),
        labels=parse_group("|" + h.get(b"labels", b"").decode())[1],
    )
    info.last_seen.FromMilliseconds(seen)
    found[worker_id] = info


def _cancel_message(job_id: str, lease: int) -> bytes:
    """A worker's instruction to stop the attempt ``lease`` of a job."""
    return relay_pb2.WorkerMessage(cancel=relay_pb2.CancelJob(job_id=job_id, lease=lease)).SerializeToString()
