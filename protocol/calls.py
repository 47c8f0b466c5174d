"""What both sides of the Redis protocol call: the registered scripts, running those whose writes
someone is told of (durably, with WAIT, when replicas must have them), reading the fields a
JobEvent is built from, and publishing the stored state of jobs a script changed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import AskError, MovedError, NoScriptError

from jobgate.v1 import job_pb2

from .codec import Fields, event_from_hash, events_message
from .errors import NotReplicated, Unavailable, redis_errors
from .keys import Keys
from .replies import Settled
from .scripts import Scripts

# What event_from_hash reads of a job hash: these as they are, then those that may be large.
EVENT_FIELDS = (
    b"state", b"queue", b"kind", b"attempt", b"worker", b"err_code", b"err_msg", b"updated", b"created", b"due",
    b"big_result", b"big_output",
)  # fmt: skip
LARGE_EVENT_FIELDS = (b"result", b"output")
# A large field longer than this comes with a plain HGET after the read_events call, not through it
# (a value copied into a script costs ten times what a plain reply does).
SCRIPT_FIELD_BYTES = 4096
# A result or output over SCRIPT_FIELD_BYTES is written apart, at Keys.staged (which expires after
# STAGED_MS if no finish takes it), and its finish call's result argument is APART followed by 'r'
# and/or 'o' (no encoded Value starts with a NUL byte); see record_outcome in the Lua prelude.
APART = b"\0"
STAGED_MS = 3_600_000
# The hash fields that mark a value kept apart (in Keys.job_apart), and the field each stands for.
APART_MARKS = {b"big_result": b"result", b"big_output": b"output"}


# A value read plainly (see Calls._read_plainly): the fields it goes into, under which name, from
# which key, and the hash field there (None: the key's own value).
_PlainRead = tuple[dict[bytes, Any], bytes, str, bytes | None]


@dataclass(frozen=True, slots=True)
class Durability:
    """How many replicas must hold a write before the call that made it returns (Redis WAIT), and
    how long to wait for them. Replication is asynchronous: without this, a primary that dies can
    take acknowledged writes with it."""

    replicas: int = 0  # 0: return once the primary has the write
    timeout_ms: int = 1000


NO_WAIT = Durability()

T = TypeVar("T")
R = TypeVar("R")


def by_shard(items: Sequence[T], shard_of: Callable[[T], int]) -> dict[int, list[int]]:
    """The indexes of ``items`` by the shard each falls in, shards in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(shard_of(item), []).append(i)
    return groups


async def per_shard(
    keys: Keys, items: Sequence[T], shard_of: Callable[[T], int], call: Callable[[Keys, list[T]], Awaitable[list[R]]]
) -> list[R]:
    """Runs ``call(shard_keys, items_of_that_shard)`` for each shard the items fall in (at once) and
    returns the results in the order of ``items`` (``call`` answers one result per item, in order).
    With one shard this is one call."""
    groups = by_shard(items, shard_of)
    if len(groups) == 1:
        [(shard, _)] = groups.items()
        return await call(keys.at(shard), list(items))
    replies = await asyncio.gather(*(call(keys.at(s), [items[i] for i in idx]) for s, idx in groups.items()))
    out: list[R | None] = [None] * len(items)
    for idx, reply in zip(groups.values(), replies, strict=True):
        for i, r in zip(idx, reply, strict=True):
            out[i] = r
    return out  # type: ignore[return-value]  # every index was filled


class Calls:
    """The scripts registered on one client, for one namespace."""

    def __init__(self, redis: Redis, keys: Keys, durability: Durability = NO_WAIT) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = Scripts.register(redis)
        self.durability = durability
        # On a Redis Cluster every channel is a shard channel (SPUBLISH/SSUBSCRIBE): a plain message
        # would cross every node, and PUBLISH would count only the subscribers of one.
        self.sharded = isinstance(redis, RedisCluster)

    async def publish(self, channel: str, message: bytes) -> int:
        """Publishes ``message`` on ``channel`` (a shard channel on a cluster); returns how many
        subscribers heard it."""
        async with redis_errors():
            if self.sharded:
                return int(await self.redis.spublish(channel, message))
            return int(await self.redis.publish(channel, message))

    @property
    def writes_apart(self) -> bool:
        """Whether large values may be written beside a script call (``durably``'s ``before``):
        always but on a cluster with ``durability.replicas`` (where the script and WAIT go in a
        pipeline of their own, so large values are arguments there)."""
        return not self.sharded or self.durability.replicas <= 0

    async def durably(
        self,
        script: AsyncScript,
        keys: Sequence[Any],
        args: Sequence[Any],
        before: Sequence[tuple[Any, ...]] = (),
    ) -> Any:
        """Runs a script whose writes someone is told of (a submit, an outcome). With
        ``durability.replicas``, the script and a WAIT go in one pipeline to the node that serves the
        keys, so that WAIT runs on the connection that made the writes, and NotReplicated is raised
        when fewer replicas than that confirmed them in time (the writes stand on the primary).

        ``before``, only where ``writes_apart``: commands (large values written with plain SET or
        HSET) run just before the script, in one MULTI/EXEC with it, so that those values reach
        Redis without entering Lua (about 1 ns a byte there); the script decides what stays of them.
        Redis errors propagate."""
        d = self.durability
        if d.replicas <= 0 and not before:
            return await script(keys=keys, args=args)
        for loaded in (False, True):
            try:
                if before:
                    reply, confirmed = await self._in_transaction(script, keys, args, before)
                else:
                    reply, confirmed = await self._with_wait(script, keys, args)
            except NoScriptError:  # Redis restarted or failed over: load it (once) and run it again
                if loaded:
                    raise
                script.sha = await self.redis.script_load(script.script)
                continue
            if d.replicas > 0 and int(confirmed) < d.replicas:
                raise NotReplicated(
                    f"Redis did not confirm the write on {d.replicas} replica(s) within {d.timeout_ms} ms"
                    f" (redis_wait_replicas); {confirmed} did"
                )
            return reply
        raise AssertionError("unreachable")

    async def _in_transaction(
        self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any], before: Sequence[tuple[Any, ...]]
    ) -> tuple[Any, Any]:
        """The script's reply after the commands ``before``, in one MULTI/EXEC, and WAIT's reply
        (None without durability), from one pipeline on one connection. A script Redis does not
        have (NOSCRIPT) fails inside the transaction after those commands ran: the caller loads it
        and runs the same transaction again, which the script then sees through."""
        d = self.durability
        if self.sharded:  # the cluster client's own transaction, on the node of the keys' slot
            assert d.replicas <= 0
            async with self.redis.pipeline(transaction=True) as cluster_pipe:
                for command in before:
                    cluster_pipe.execute_command(*command)
                cluster_pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                answered = await cluster_pipe.execute()  # raises the first error
            return answered[-1], None
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.execute_command("MULTI")
            for command in before:
                pipe.execute_command(*command)
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            pipe.execute_command("EXEC")
            if d.replicas > 0:
                pipe.execute_command("WAIT", d.replicas, d.timeout_ms)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        for r in replies:  # a refused MULTI or queued command, or EXECABORT
            if isinstance(r, Exception):
                raise r
        done = replies[len(before) + 2]
        for r in done:  # an error of a command inside: NOSCRIPT, or one the script raised
            if isinstance(r, Exception):
                raise r
        return done[-1], replies[-1] if d.replicas > 0 else None

    async def _with_wait(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> list[Any]:
        """The script's reply and WAIT's, from one pipeline on one connection."""
        d = self.durability
        if not isinstance(self.redis, RedisCluster):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                pipe.execute_command("WAIT", d.replicas, d.timeout_ms)
                replies: list[Any] = await pipe.execute()
                return replies
        # A cluster pipeline sends a keyless WAIT anywhere unless told where, and follows a
        # redirection of the script alone: both go to the keys' node, and a redirection is an error
        # here (the layout is learnt again; the caller retries, as after any Redis error).
        await self.redis.initialize()  # learns the layout on first use (then does nothing)
        node = self.redis.get_node_from_key(keys[0])
        async with self.redis.pipeline() as cluster_pipe:
            cluster_pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args, target_nodes=node)
            cluster_pipe.execute_command("WAIT", d.replicas, d.timeout_ms, target_nodes=node)
            try:
                replies = await cluster_pipe.execute(allow_redirections=False)
            except (MovedError, AskError) as exc:
                await self.redis.nodes_manager.initialize()
                raise Unavailable(f"the cluster moved the keys' slot ({type(exc).__name__}); retry") from exc
        return replies

    async def get_fields(self, job_ids: Sequence[str]) -> list[Fields]:
        """The stored fields a JobEvent is built from, for many jobs in one round trip (empty dicts
        for missing ones). Not the spec: a completion needs none of its payload."""
        if not job_ids:
            return []
        return await per_shard(self.keys, job_ids, self.keys.job_shard, self._get_fields)

    async def _get_fields(self, keys: Keys, job_ids: list[str]) -> list[Fields]:
        job_keys = [keys.job(j) for j in job_ids]
        args: list[bytes | int] = [SCRIPT_FIELD_BYTES, len(EVENT_FIELDS), *EVENT_FIELDS, *LARGE_EVENT_FIELDS]
        names = EVENT_FIELDS + LARGE_EVENT_FIELDS
        async with redis_errors():
            rows = await self.scripts.read_events(keys=job_keys, args=args)
            out: list[dict[bytes, Any]] = [
                {k: v for k, v in zip(names, row, strict=True) if v is not None} for row in rows
            ]
            # large fields, answered by their length, and results kept apart: read them plainly
            reads: list[_PlainRead] = []
            for f, job_id, key in zip(out, job_ids, job_keys, strict=True):
                reads += [(f, name, key, name) for name in LARGE_EVENT_FIELDS if type(f.get(name)) is int]
                reads += self._apart_reads(job_id, f)
            await self._read_plainly(reads)
        return cast(list[Fields], out)

    async def values_apart(self, jobs: Sequence[tuple[str, dict[bytes, Any]]]) -> None:
        """Fills in the results and outputs kept apart from their job hashes (marked by APART_MARKS;
        see record_outcome in the prelude) of ``jobs``, (id, fields as HGETALL read them) pairs:
        plain GETs in one pipeline. A value gone since (the job expired, or was retried) stays
        missing."""
        await self._read_plainly([read for job_id, f in jobs for read in self._apart_reads(job_id, f)])

    def _apart_reads(self, job_id: str, fields: dict[bytes, Any]) -> list[_PlainRead]:
        """The reads of the values of job ``job_id`` kept apart, which ``fields`` marks (the marks
        are taken out)."""
        return [
            (fields, name, self.keys.job_apart(job_id, name.decode()), None)
            for mark, name in APART_MARKS.items()
            if fields.pop(mark, None)
        ]

    async def _read_plainly(self, reads: Sequence[_PlainRead]) -> None:
        """Reads each (fields, name, key, hash field or None for the key's value) with one pipeline
        and puts the value into fields[name]; a value gone since (expired, or retried) leaves
        ``name`` out, as if it had never been written."""
        if not reads:
            return
        values = await self.hgets([(key, field) for _, _, key, field in reads])
        for (f, name, _, _), value in zip(reads, values, strict=True):
            if value:
                f[name] = value
            else:
                f.pop(name, None)

    async def hgets(self, fields: Sequence[tuple[str, str | bytes | None]]) -> list[bytes | None]:
        """Hash fields as (key, field) pairs, with plain HGETs in one pipeline (a plain GET of the
        key for the field None): how large values (specs, results) are read, never through a
        script. The keys must share a slot on a cluster (one shard's). None for a missing field."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, name in fields:
                if name is None:
                    pipe.get(key)
                else:
                    pipe.hget(key, name)
            return list(await pipe.execute())

    async def publish_settled(self, settled: Sequence[Settled]) -> None:
        """Publishes the stored state of jobs a script just changed (for RunJob and watchers)."""
        if not settled:
            return
        ids = [s.job_id for s in settled]
        fields = await self.get_fields(ids)
        by_shard: dict[int, list[job_pb2.JobEvent]] = {}
        for job_id, f in zip(ids, fields, strict=True):
            if f:
                by_shard.setdefault(self.keys.job_shard(job_id), []).append(event_from_hash(job_id, f))
        for shard, events in by_shard.items():
            await self.publish(self.keys.at(shard).results_channel(), events_message(events))
