"""The gateway's side of the Redis protocol: the job store and the scheduling transitions.

Every method is one Redis round trip (a script call or a pipeline). Script return codes become
domain errors here; Redis connection and timeout errors become :class:`Unavailable`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any, cast

import hiredis
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from jobgate.v1 import job_pb2, relay_pb2, scheduler_pb2

from .codec import Fields, event_from_hash, events_message, job_from_hash
from .errors import AlreadyExists, FailedPrecondition, JobgateError, NotFound, ResourceExhausted, Unavailable
from .keys import Keys
from .scripts import Scripts
from .validation import PreparedJob

log = logging.getLogger(__name__)


# Redis cannot be reached (refused, dropped or timed out): the errors every caller retries or maps to
# UNAVAILABLE.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, OSError)


@cache
def _packing_with_hiredis(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """``cls`` with commands packed by hiredis (C) instead of redis-py's Python packer, which
    copies its growing buffer for every argument: a batch script call carries thousands of them."""

    class Packed(cls):  # type: ignore[valid-type, misc]
        def pack_command(self, *args: Any) -> list[bytes]:
            try:
                if isinstance(args[0], str):  # e.g. "SCRIPT LOAD": the server expects separate words
                    args = (*args[0].encode().split(), *args[1:])
                elif b" " in args[0]:
                    args = (*args[0].split(), *args[1:])
                return [hiredis.pack_command(args)]
            except TypeError:  # a value Redis cannot take: redis-py's packer raises its own error
                packed: list[bytes] = super().pack_command(*args)
                return packed

    Packed.__name__ = Packed.__qualname__ = f"Hiredis{cls.__name__}"
    return Packed


def redis_client(url: str, timeout_s: float) -> Redis:
    """An asyncio Redis client with bounded waits that reconnects by itself.

    A command that hits a connection dropped by a Redis restart is retried (up to 3 times, 50-500 ms
    apart) on a fresh connection, so the first request after a restart does not fail for nothing.
    """
    client = Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=10,
        socket_keepalive=True,
        # No CLIENT SETINFO on connect: the minimal ACL user (gateway/acl.py) need not be granted it.
        lib_name=None,
        lib_version=None,
        # OSError is not a RedisError, but a dropped socket can surface as one: retry it too.
        retry=Retry(
            ExponentialWithJitterBackoff(base=0.05, cap=0.5),
            3,
            supported_errors=CONNECTION_ERRORS,  # type: ignore[arg-type]
        ),
        retry_on_error=list(CONNECTION_ERRORS),
    )
    pool = client.connection_pool  # connections are made on first use, so this applies to all
    pool.connection_class = _packing_with_hiredis(pool.connection_class)  # type: ignore[arg-type]
    return client


async def bounded(aw: Awaitable[Any], timeout_s: float, what: str) -> None:
    """Awaits a shutdown step for at most ``timeout_s`` (closing connections can wait on a peer,
    for example a TLS shutdown); a step that takes longer is logged and left behind."""
    try:
        await asyncio.wait_for(aw, timeout=timeout_s)
    except TimeoutError:
        log.warning("%s took longer than %.1fs; going on", what, timeout_s)


@asynccontextmanager
async def subscription(
    redis: Redis, channels: Sequence[str], on_reconnect: Callable[[Any], Awaitable[None]]
) -> AsyncIterator[PubSub]:
    """A pub/sub connection subscribed to ``channels``.

    redis-py reconnects a dropped pub/sub connection and subscribes again by itself while it is read;
    ``on_reconnect`` (a bound method: redis-py keeps a weak reference) hears of it, since whatever
    was published in the gap is lost. It is not called for the first connection, nor on closing.
    """
    async with redis.pubsub() as ps:
        await ps.subscribe(*channels)
        connection = ps.connection
        assert connection is not None  # subscribe connected it
        connection.register_connect_callback(on_reconnect)
        try:
            yield ps
        finally:
            connection.deregister_connect_callback(on_reconnect)


def now_ms() -> int:
    """Wall-clock milliseconds since the epoch (shared by every process through Redis)."""
    return time.time_ns() // 1_000_000


# Error replies of a Redis that cannot take writes for now (out of memory, a replica after a
# failover, loading or busy with a script): to a client these mean "unavailable, retry". redis-py
# turns most into classes; the rest keep their code at the start of the message.
UNAVAILABLE_REPLIES = (OutOfMemoryError, ReadOnlyError, TryAgainError, MasterDownError)
UNAVAILABLE_CODES = ("BUSY", "LOADING", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN")


def cannot_write_now(exc: BaseException) -> bool:
    """Whether an error reply means Redis refuses writes only for now (see UNAVAILABLE_REPLIES)."""
    return isinstance(exc, UNAVAILABLE_REPLIES) or (
        isinstance(exc, ResponseError) and str(exc).startswith(UNAVAILABLE_CODES)
    )


@asynccontextmanager
async def redis_errors() -> AsyncIterator[None]:
    """Turns Redis connection and timeout errors, and "cannot write now" replies, into :class:`Unavailable`."""
    try:
        yield
    except CONNECTION_ERRORS as exc:
        raise Unavailable(f"Redis is unavailable: {type(exc).__name__}") from exc
    except ResponseError as exc:
        if not cannot_write_now(exc):
            raise
        raise Unavailable(f"Redis cannot take the request now: {type(exc).__name__}") from exc


# What event_from_hash reads of a job hash.
EVENT_FIELDS = (
    b"state", b"queue", b"kind", b"attempt", b"worker", b"output", b"result", b"err_code", b"err_msg", b"updated",
    b"created",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Placement:
    """One job placed on one worker (and published) by the submit or schedule script."""

    job_id: str
    worker_id: str
    lease: int
    attempt: int
    reached: bool  # False: no subscriber on the worker's channel, so the job went back to its queue


class _Refused(Exception):
    """The submit script refused job ``index`` of its call (and stored nothing)."""

    def __init__(self, index: int, error: JobgateError) -> None:
        super().__init__(error.message)
        self.index = index
        self.error = error


@dataclass(frozen=True, slots=True)
class Placed:
    """What a placing script did: its placements, the queues it placed on (visited) and those of
    them it left jobs waiting in."""

    placements: list[Placement]
    waiting: set[str]
    visited: set[str]


def placements(flat: Sequence[Any]) -> list[Placement]:
    """Parses the flat placement array of the submit and schedule scripts (5 entries each)."""
    return [
        Placement(_text(flat[i]), _text(flat[i + 1]), int(flat[i + 2]), int(flat[i + 3]), flat[i + 4] == 1)
        for i in range(0, len(flat), 5)
    ]


@dataclass(frozen=True, slots=True)
class Settled:
    """A job whose state a script changed (requeued, failed or cancelled)."""

    job_id: str
    queue: str
    state: int


@dataclass(frozen=True, slots=True)
class CancelOutcome:
    """What CancelJob did: ``worker_id``/``lease`` are set when a running worker must be told."""

    queue: str = ""
    worker_id: str = ""
    lease: int = 0


class JobStore:
    """Jobs, queues and workers in Redis for one namespace."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        retention_s: int,
        idempotency_ttl_s: int,
        max_queues: int = 1000,
        max_kinds: int = 1000,
        ack_timeout_ms: int = 5000,
        place_most: int = 500,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = Scripts.register(redis)
        self.retention_s = retention_s
        self.idempotency_ttl_s = idempotency_ttl_s
        self.max_queues = max_queues
        self.max_kinds = max_kinds
        self.ack_timeout_ms = ack_timeout_ms  # stored with each job: how long a worker has to start it
        self.place_most = place_most

    # --- submission -----------------------------------------------------------------------
    async def submit(self, jobs: Sequence[PreparedJob]) -> tuple[list[job_pb2.Job], Placed]:
        """Stores jobs with one script call (all or none) and returns them as stored, with the
        placements the same call made (up to ``place_most`` per queue, published by the script).

        Raises AlreadyExists when an idempotency key is reused with a different request,
        ResourceExhausted when a job would add a queue or a kind over the limits (nothing is written
        then), Unavailable when Redis cannot be reached.
        """
        try:
            return await self._submit_call(jobs)
        except _Refused as refused:
            raise refused.error from None

    async def submit_each(self, jobs: Sequence[PreparedJob]) -> tuple[list[job_pb2.Job | JobgateError], list[Placed]]:
        """Stores unrelated jobs (single submits that arrived together) in as few script calls as
        possible, each accepted or refused on its own: per job, the stored job or the error a submit
        of it alone would raise (Unavailable for those of a call Redis did not answer, and of calls
        not sent after it); and what each call placed. Two jobs with the same idempotency key never
        share a call, so the second sees the first."""
        results: list[job_pb2.Job | JobgateError | None] = [None] * len(jobs)
        calls: list[Placed] = []
        pending = list(range(len(jobs)))
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
                break
            for i, job in zip(batch, stored, strict=True):
                results[i] = job
            calls.append(placed)
            pending = later
        return [r for r in results if r is not None], calls

    async def _submit_call(self, jobs: Sequence[PreparedJob]) -> tuple[list[job_pb2.Job], Placed]:
        k, now = self.keys, now_ms()
        keys = [k.queues(), k.seq()]
        args: list[Any] = [now, self.idempotency_ttl_s, self.retention_s, self.max_queues, self.max_kinds]
        args += [k.prefix, self.ack_timeout_ms, self.place_most]
        for job in jobs:
            spec = job.spec
            keys += [
                k.job(job.id),
                k.pending(spec.queue, spec.kind),
                k.idempotency(job.idempotency_digest or "none"),
                k.queue_kinds(spec.queue),
            ]
            args += [
                job.id,
                job.spec_bytes,
                spec.queue,
                spec.kind,
                spec.priority,
                spec.max_attempts,
                job.timeout_ms,
                job.request_digest,
            ]
        async with redis_errors():
            reply = await self.scripts.submit(keys=keys, args=args)
        status = int(reply[0])
        if status < 0:
            index = int(reply[1])
            raise _Refused(index, self._refusal(status, jobs[index], reply[2:]))
        out: list[job_pb2.Job] = []
        for job, code, stored_id in zip(jobs, reply[3::2], reply[4::2], strict=True):
            if int(code) == 2:
                out.append(await self.get(stored_id.decode()))
                continue
            stored = job_pb2.Job(id=job.id, spec=job.spec, state=job_pb2.JOB_STATE_QUEUED)
            stored.created_at.FromMilliseconds(now)
            out.append(stored)
        if self.place_most > 0:
            visited = {_text(q): left == 1 for q, left in zip(reply[2][::2], reply[2][1::2], strict=True)}
        else:  # nothing was placed: whatever was stored waits
            visited = {job.spec.queue: True for job in jobs}
        return out, Placed(placements(reply[1]), {q for q, left in visited.items() if left}, set(visited))

    def _refusal(self, status: int, job: PreparedJob, rest: Sequence[Any]) -> JobgateError:
        """The error for a submit the script refused (nothing was stored)."""
        if status == -2:
            return AlreadyExists(
                f"{job.field}idempotency_key: already used by job {_text(rest[0])} with a different request"
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
            fields = cast(Fields, await self.redis.hgetall(self.keys.job(job_id)))
        if not fields:
            raise NotFound(f"id: no job {job_id}")
        return job_from_hash(job_id, fields)

    async def get_fields(self, job_ids: Sequence[str]) -> list[Fields]:
        """The stored fields a JobEvent is built from, for many jobs in one round trip (empty dicts
        for missing ones). Not the spec: a completion needs none of its payload."""
        if not job_ids:
            return []
        async with redis_errors():
            rows = await self.scripts.read_events(keys=[self.keys.job(j) for j in job_ids], args=EVENT_FIELDS)
        return [{k: v for k, v in zip(EVENT_FIELDS, row, strict=True) if v is not None} for row in rows]

    async def queue_names(self) -> list[str]:
        """Every queue that may hold waiting jobs (placement drops a queue once it is empty)."""
        async with redis_errors():
            return sorted(_text(q) for q in await self.redis.smembers(self.keys.queues()))

    async def census(self, queues: Sequence[str]) -> tuple[dict[str, int], int]:
        """Waiting jobs per queue and the number of live workers (two round trips)."""
        k = self.keys
        async with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for queue in queues:
                    pipe.smembers(k.queue_kinds(queue))
                pipe.zcount(k.workers(), now_ms(), "+inf")
                replies = await pipe.execute()
            kinds = [sorted(_text(kind) for kind in members) for members in replies[:-1]]
            async with self.redis.pipeline(transaction=False) as pipe:
                for queue, queue_kinds in zip(queues, kinds, strict=True):
                    for kind in queue_kinds:
                        pipe.zcard(k.pending(queue, kind))
                counts = iter(await pipe.execute())
        waiting = {
            queue: sum(next(counts) for _ in queue_kinds) for queue, queue_kinds in zip(queues, kinds, strict=True)
        }
        return waiting, int(replies[-1])

    async def workers(self) -> list[scheduler_pb2.WorkerInfo]:
        """Live workers (heartbeat not expired), by id."""
        k, now = self.keys, now_ms()
        async with redis_errors():
            ids = cast(list[bytes], await self.redis.zrangebyscore(k.workers(), now, "+inf"))
            async with self.redis.pipeline(transaction=False) as pipe:
                for wid in ids:
                    pipe.hgetall(k.worker(wid.decode()))
                hashes = await pipe.execute()
        out = []
        for wid, h in zip(ids, hashes, strict=True):
            if not h:
                continue
            info = scheduler_pb2.WorkerInfo(
                id=wid.decode(),
                queues=[q for q in h.get(b"queues", b"").decode().split(",") if q],
                kinds=[q for q in h.get(b"kinds", b"").decode().split(",") if q],
                slots=int(h.get(b"slots", 0)),
                busy=int(h.get(b"used", 0)),
                host=h.get(b"host", b"").decode(),
                pid=int(h.get(b"pid", 0)),
            )
            info.last_seen.FromMilliseconds(int(h.get(b"seen", 0)))
            out.append(info)
        return sorted(out, key=lambda w: w.id)

    # --- transitions ----------------------------------------------------------------------
    async def cancel(self, job_id: str) -> CancelOutcome:
        """Cancels a job. Raises NotFound, FailedPrecondition (already terminal), Unavailable."""
        k = self.keys
        async with redis_errors():
            reply = await self.scripts.cancel(keys=[k.job(job_id), k.acks()], args=[k.prefix, job_id, now_ms()])
        code = reply[0]
        if code == -1:
            raise NotFound(f"id: no job {job_id}")
        if code == -2:
            raise FailedPrecondition(f"id: job {job_id} has already finished")
        if code == 2:
            return CancelOutcome(worker_id=reply[1].decode(), lease=int(reply[2]))
        return CancelOutcome(queue=reply[1].decode())

    async def schedule(self, queue: str, *, ack_timeout_ms: int, most: int) -> Placed:
        """Places and publishes waiting jobs of ``queue`` on free worker slots (atomic; safe across
        gateways). Raises Unavailable."""
        k, now = self.keys, now_ms()
        async with redis_errors():
            flat = await self.scripts.schedule(
                keys=[k.queue_kinds(queue), k.queue_workers(queue), k.acks(), k.lease_seq(), k.queues()],
                args=[k.prefix, now, ack_timeout_ms, queue, most],
            )
        return Placed(placements(flat[1:]), {queue} if flat[0] == 1 else set(), {queue})

    async def tell_worker_to_cancel(self, worker_id: str, job_id: str, lease: int) -> None:
        """Publishes a CancelJob on the worker's channel (nobody listening: its reaping cancels)."""
        async with redis_errors():
            await self.redis.publish(self.keys.dispatch_channel(worker_id), _cancel_message(job_id, lease))

    async def resend_cancels(self, older_than_ms: int, limit: int = 100) -> int:
        """Tells workers again to stop RUNNING jobs whose cancellation they were told of more than
        ``older_than_ms`` ago (a CancelJob message can be lost like any pub/sub message); forgets
        jobs that have ended. Returns how many were told again."""
        k, now = self.keys, now_ms()
        async with redis_errors():
            ids = [_text(j) for j in await self.redis.zrangebyscore(k.cancels(), "-inf", now - older_than_ms, 0, limit)]
            if not ids:
                return 0
            async with self.redis.pipeline(transaction=False) as pipe:
                for jid in ids:
                    pipe.hmget(k.job(jid), "state", "worker", "lease", "cancel")
                rows = await pipe.execute()
            told, ended = [], []
            for jid, (state, worker, lease, flag) in zip(ids, rows, strict=True):
                if state is not None and int(state) == job_pb2.JOB_STATE_RUNNING and flag and worker:
                    told.append((jid, _text(worker), int(lease)))
                else:
                    ended.append(jid)
            async with self.redis.pipeline(transaction=False) as pipe:
                for jid, worker_id, lease in told:
                    pipe.publish(k.dispatch_channel(worker_id), _cancel_message(jid, lease))
                    pipe.zadd(k.cancels(), {jid: now}, xx=True)
                if ended:
                    pipe.zrem(k.cancels(), *ended)
                await pipe.execute()
        return len(told)

    async def publish_settled(self, settled: Sequence[Settled]) -> None:
        """Publishes the stored state of jobs a script just changed (for RunJob and watchers)."""
        if not settled:
            return
        ids = [s.job_id for s in settled]
        fields = await self.get_fields(ids)
        events = [event_from_hash(job_id, f) for job_id, f in zip(ids, fields, strict=True) if f]
        if events:
            async with redis_errors():
                await self.redis.publish(self.keys.results_channel(), events_message(events))

    async def reap(self, limit: int = 100) -> list[Settled]:
        """Settles jobs of expired workers and unacknowledged dispatches."""
        k = self.keys
        async with redis_errors():
            flat = await self.scripts.reap(keys=[k.workers(), k.acks()], args=[k.prefix, now_ms(), limit])
        return settled(flat)


def _cancel_message(job_id: str, lease: int) -> bytes:
    """A worker's instruction to stop the attempt ``lease`` of a job."""
    return relay_pb2.WorkerMessage(cancel=relay_pb2.CancelJob(job_id=job_id, lease=lease)).SerializeToString()


def _text(value: object) -> str:
    """A Redis reply as text (this client returns bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def settled(flat: Sequence[bytes | int]) -> list[Settled]:
    """Parses the {job id, queue, state} triples returned by the reap and leave scripts."""
    out = []
    for i in range(0, len(flat), 3):
        job_id, queue = flat[i], flat[i + 1]
        assert isinstance(job_id, bytes) and isinstance(queue, bytes)
        out.append(Settled(job_id.decode(), queue.decode(), int(flat[i + 2])))
    return out
