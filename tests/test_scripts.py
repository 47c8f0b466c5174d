"""The Lua state transitions on their own, against a real Redis: the rules every worker relies on."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import AsyncIterator
from typing import Any

import hiredis
import pytest
from google.protobuf import struct_pb2
from redis.asyncio import Redis

from gateway.validation import Limits, prepare, prepare_batch
from jobgate.v1 import job_pb2, relay_pb2
from protocol.connection import LARGE, RUN, now_ms, pack_command, redis_client
from protocol.errors import AlreadyExists, ResourceExhausted
from protocol.gateway_calls import GatewayCalls
from protocol.keys import Keys
from protocol.replies import Finished, Heartbeat, Placed, Placement
from protocol.worker_calls import Outcome, Start, WorkerCalls

from .helpers import registration, request

S = job_pb2
LIMITS = Limits(max_payload_bytes=1 << 20, default_timeout_ms=60_000, max_batch=100, max_watch_ids=100, retention_s=600)


@pytest.fixture(autouse=True)
async def listening(redis: Redis, keys: Keys) -> AsyncIterator[None]:
    """Subscribers on the dispatch channels of the workers these tests register (all but "gone"),
    so that placements reach someone and stay placed."""
    async with redis.pubsub() as ps:
        await ps.subscribe(*(keys.dispatch_channel(w) for w in ("w1", "w2", "busy", "idle", "dead", "draining")))
        yield


@pytest.fixture
def store(redis: Redis, keys: Keys) -> GatewayCalls:
    # Placement at submit is off here, so each test places with the schedule script when it wants.
    return GatewayCalls(redis, keys, idempotency_ttl_s=600, place_most=0)


async def beat(store: GatewayCalls, worker: str, **fields: Any) -> Heartbeat:
    """A heartbeat of ``worker`` (see :func:`tests.helpers.registration` for the fields)."""
    return await WorkerCalls(store.redis, store.keys).heartbeat(registration(worker, **fields))


def worker_calls(store: GatewayCalls) -> WorkerCalls:
    return WorkerCalls(store.redis, store.keys)


async def submit(store: GatewayCalls, kind: str = "echo", **fields: object) -> str:
    [job], _ = await store.submit([prepare(request(kind, **fields), LIMITS)])
    return job.id


async def place(store: GatewayCalls) -> list[Placement]:
    return (await store.schedule("default", ack_timeout_ms=5_000, most=100)).placements


# start and finish are the single-job scripts a worker written from docs/PROTOCOL.md calls
# (tests/node/worker.mjs); WorkerCalls batches them as start_many and finish_many.
async def start(store: GatewayCalls, p: Placement, worker: str | None = None, instance: str = "i1") -> int:
    k = store.keys
    code: int = await store.scripts.start(
        keys=[*k.namespace_keys(), *k.own_keys(worker or p.worker_id), k.job(p.job_id)],
        args=[k.prefix, p.job_id, p.lease, worker or p.worker_id, instance, now_ms(), b""],
    )
    return code


async def finish(store: GatewayCalls, p: Placement, state: int = S.JOB_STATE_SUCCEEDED) -> list[int]:
    k = store.keys
    reply: list[int] = await store.scripts.finish(
        keys=[*k.namespace_keys(), *k.own_keys(p.worker_id), k.job(p.job_id)],
        args=[k.prefix, p.job_id, p.lease, p.worker_id, state, now_ms(), b"", b"", "", "", b""],
    )
    return reply


async def field(redis: Redis, keys: Keys, key: str, name: str) -> str:
    return (await redis.hget(key, name) or b"").decode()


async def test_start_is_idempotent_for_its_placement_and_refuses_any_other(store: GatewayCalls, redis: Redis) -> None:
    await beat(store, "w1")
    job_id = await submit(store)
    [p] = await place(store)
    assert await start(store, p) == 1
    assert await start(store, p) == 1  # a retried call after a lost reply
    assert await start(store, p, worker="w2") == 0
    stale = dataclasses.replace(p, lease=p.lease + 1)
    assert await start(store, stale) == 0
    assert await field(redis, store.keys, store.keys.job(job_id), "attempt") == "1"


async def test_finish_records_once_frees_the_slot_once_and_starts_retention(store: GatewayCalls, redis: Redis) -> None:
    k = store.keys
    await beat(store, "w1", slots=1)
    job_id = await submit(store)
    [p] = await place(store)
    assert await field(redis, k, k.worker("w1"), "used") == "1"
    await start(store, p)
    assert (await finish(store, p))[0] == 1
    assert (await finish(store, p))[0] == 2  # a retried call after a lost reply: already recorded
    assert (await finish(store, p, S.JOB_STATE_FAILED))[0] == 0  # the outcome is recorded once
    assert await field(redis, k, k.worker("w1"), "used") == "0"
    assert await field(redis, k, k.job(job_id), "state") == str(S.JOB_STATE_SUCCEEDED)
    assert 0 < await redis.ttl(k.job(job_id)) <= 600


async def test_submit_places_at_once_and_publishes_what_protobuf_reads_as_the_stored_placement(
    redis: Redis, keys: Keys
) -> None:
    """The placement scripts write the relay messages themselves: they must parse with protobuf and
    agree with the stored job; a dispatch that reaches nobody is taken back in the same call."""
    store = GatewayCalls(redis, keys, idempotency_ttl_s=600, place_most=100)
    await beat(store, "w1", slots=3)
    await beat(store, "gone", slots=1, kinds=["other"])  # nobody subscribes to its channel
    spec_args = {"n": 2**40, "s": "é" * 200}
    async with redis.pubsub() as ps:
        await ps.subscribe(keys.dispatch_channel("w1"), keys.results_channel())
        for _ in range(2):
            await ps.get_message(timeout=1)
        reqs = [request("echo", args={**spec_args, "i": i}) for i in range(2)]
        for r in reqs:
            r.timeout.seconds = 7
        batch = [prepare(r, LIMITS) for r in reqs]
        batch.append(prepare(request("other"), LIMITS))
        jobs, placed = await store.submit(batch)
        assert placed.waiting == {"default"}  # the job taken back waits again
        assert [(p.job_id, p.worker_id, p.attempt, p.reached) for p in placed.placements] == [
            (jobs[0].id, "w1", 1, True), (jobs[1].id, "w1", 1, True), (jobs[2].id, "gone", 1, False),
        ]  # fmt: skip
        msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1)
        sent = relay_pb2.WorkerMessage.FromString(msg["data"])
        assert sent.WhichOneof("body") == "dispatches"
        for d, job, p in zip(sent.dispatches.jobs, jobs, placed.placements, strict=False):
            stored = await redis.hgetall(keys.job(job.id))
            assert (d.job_id, d.lease, d.attempt, d.timeout_ms) == (job.id, p.lease, 1, 7000)
            assert d.spec.SerializeToString(deterministic=True) == stored[b"spec"]
            assert int(stored[b"lease"]) == p.lease and stored[b"state"] == b"2"
        msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1)
        events = relay_pb2.JobEvents.FromString(msg["data"]).events
        assert [(e.job_id, e.queue, e.kind, e.state, e.attempt, e.worker_id) for e in events] == [
            (j.id, "default", "echo", S.JOB_STATE_DISPATCHED, 1, "w1") for j in jobs[:2]
        ]
        assert abs(events[0].time.ToMilliseconds() - now_ms()) < 5000
        # The lost one is back in its queue, its worker takes nothing more until its next heartbeat.
        assert await field(redis, keys, keys.job(jobs[2].id), "state") == str(S.JOB_STATE_QUEUED)
        assert await field(redis, keys, keys.worker("gone"), "off") == "1"
        assert await field(redis, keys, keys.worker("gone"), "used") == "0"
        assert await redis.zscore(keys.acks(), jobs[2].id) is None
        # The next submit places on w1's last slot the job that has waited longest: the one taken back.
        [_], placed = await store.submit([prepare(request("echo"), LIMITS)])
        msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1)
        assert relay_pb2.WorkerMessage.FromString(msg["data"]).dispatch.job_id == jobs[2].id
        assert [(p.job_id, p.worker_id, p.reached) for p in placed.placements] == [(jobs[2].id, "w1", True)]
        assert placed.waiting == {"default"}  # w1 is full: the new job waits
        await beat(store, "w1", slots=4)
        assert (await store.schedule("default", ack_timeout_ms=5_000, most=100)).waiting == set()


async def test_placements_too_big_for_one_message_go_out_in_several(redis: Redis, keys: Keys) -> None:
    """Redis cuts off a subscriber whose buffer passes 32 MB: no message may grow with the batch."""
    store = GatewayCalls(redis, keys, idempotency_ttl_s=600, place_most=400)
    await beat(store, "w1", slots=300)
    async with redis.pubsub() as ps:
        await ps.subscribe(keys.dispatch_channel("w1"), keys.results_channel())
        for _ in range(2):
            await ps.get_message(timeout=1)
        batch = [prepare(request("echo", payload=bytes([i % 256]) * 4000), LIMITS) for i in range(300)]
        jobs, placed = await store.submit(batch)
        assert all(p.reached for p in placed.placements) and len(placed.placements) == 300
        got: list[relay_pb2.DispatchJob] = []
        for _ in range(2):  # 300 specs of 4 KB: 1.2 MB, over the 1 MB a message may hold
            msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1)
            assert len(msg["data"]) < 1_100_000
            got += relay_pb2.WorkerMessage.FromString(msg["data"]).dispatches.jobs
        assert [d.job_id for d in got] == [j.id for j in jobs]
        assert [d.spec.payload for d in got] == [bytes([i % 256]) * 4000 for i in range(300)]


async def test_a_spec_over_4_kib_is_left_out_of_its_dispatch_for_the_worker_to_read(
    store: GatewayCalls, redis: Redis
) -> None:
    """Large values are costly inside scripts: dispatches, and the jobs finish_many takes, carry
    specs of up to 4 KiB; a larger one is marked spec_omitted, read by the worker with HGET."""
    k, calls = store.keys, worker_calls(store)
    await beat(store, "w1", slots=1)
    small = await submit(store, payload=b"s" * 4000)
    large = await submit(store, payload=b"L" * 5000)
    async with redis.pubsub() as ps:
        await ps.subscribe(k.dispatch_channel("w1"))
        await ps.get_message(timeout=1)
        [a] = await place(store)
        d = relay_pb2.WorkerMessage.FromString((await ps.get_message(timeout=1))["data"]).dispatch
    assert (d.job_id, d.spec_omitted, d.spec.payload) == (small, False, b"s" * 4000)
    await start(store, a)
    done = await calls.finish_many("w1", "i1", [outcome(a, S.JOB_STATE_SUCCEEDED)], take={a.job_id})
    [took] = done.taken
    assert (took.job_id, took.spec_omitted, took.HasField("spec")) == (large, True, False)
    [spec] = await calls.specs([large])
    assert spec is not None and job_pb2.JobSpec.FromString(spec).payload == b"L" * 5000
    assert await calls.specs(["0" * 32]) == [None]


async def test_a_spec_over_4_kib_is_written_beside_its_submit_and_never_left_behind_by_a_job_not_stored(
    store: GatewayCalls, redis: Redis, keys: Keys
) -> None:
    """A large spec reaches the job hash with a plain HSET in one transaction with the submit
    script, never as one of its arguments; refused calls, idempotent repeats and a script Redis had
    forgotten leave no hash of it behind, and a resent call leaves the job as it is."""
    big = {"payload": b"B" * 6000}
    await redis.config_set("slowlog-log-slower-than", 0)
    try:
        await redis.slowlog_reset()
        prepared = prepare(request(idempotency_key="i1", **big), LIMITS)
        [job], _ = await store.submit([prepared])
        log = [entry[3] for entry in await redis.execute_command("SLOWLOG", "GET", 20)]  # newest first
    finally:
        await redis.config_set("slowlog-log-slower-than", 10_000)
    assert job_pb2.JobSpec.FromString(await redis.hget(keys.job(job.id), "spec")) == prepared.spec
    commands = [c[0].upper() for c in log]
    spec_write = [c[:3] for c in log].index([b"HSET", keys.job(job.id).encode(), b"spec"])
    assert commands.index(b"EVALSHA") < spec_write < commands.index(b"MULTI")  # newest first
    assert b"more bytes" in log[spec_write][3]  # SLOWLOG shortens long arguments
    assert not any(b"more bytes" in arg for arg in log[commands.index(b"EVALSHA")])
    before = sorted(await redis.keys(f"{keys.prefix}*"))
    # The same request again (new ids): answered with the original job, nothing added.
    [again], _ = await store.submit([prepare(request(idempotency_key="i1", **big), LIMITS)])
    assert again.id == job.id
    assert sorted(await redis.keys(f"{keys.prefix}*")) == before
    # A call refused for a later job stores none of its jobs, large spec or not.
    await submit(store, unique_key="u1")
    before = sorted(await redis.keys(f"{keys.prefix}*"))
    refused = prepare_batch([request(**big), request(unique_key="u1")], LIMITS)
    with pytest.raises(AlreadyExists):
        await store.submit(refused)
    assert sorted(await redis.keys(f"{keys.prefix}*")) == before
    # Resent after a lost reply: the job stays as it is.
    [same], _ = await store.submit([prepared])
    assert same.id == job.id
    assert sorted(await redis.keys(f"{keys.prefix}*")) == before
    # After Redis forgot the scripts, the transaction's HSET runs without the script: the call is
    # made again at once, and stores the job.
    await redis.script_flush()
    fresh = prepare(request(**big), LIMITS)
    [stored], _ = await store.submit([fresh])
    assert int(await field(redis, keys, keys.job(stored.id), "state")) == S.JOB_STATE_QUEUED
    assert job_pb2.JobSpec.FromString(await redis.hget(keys.job(stored.id), "spec")) == fresh.spec


async def test_results_and_outputs_over_4_kib_are_kept_apart_taken_only_by_the_finish_that_records_them(
    store: GatewayCalls, redis: Redis, keys: Keys
) -> None:
    """A large result or output is SET apart by the worker, in one transaction with its finish call
    (a small result beside a large output too): the call that records the outcome renames each to
    a key of its own (expiring with the job); a repeat after a lost reply, a stale finish and a
    finish of a job that is gone leave nothing; a retry of the job drops them; a script Redis had
    forgotten is loaded and the transaction sent again."""
    calls = worker_calls(store)
    big, small = struct_pb2.Value(string_value="R" * 6000).SerializeToString(), b"\x1a\x01x"
    out = b"O" * 5000

    def done(p: Placement, result: bytes = big, output: bytes = out) -> Outcome:
        return Outcome(p.job_id, p.lease, S.JOB_STATE_FAILED, result, output, "BOOM", "", b"")

    async def stored(p: Placement) -> tuple[Any, ...]:
        k = keys.job(p.job_id)
        return (
            *(await redis.hmget(k, "result", "big_result", "output", "big_output")),
            *[await redis.get(keys.job_apart(p.job_id, f)) for f in ("result", "output")],
        )

    await beat(store, "w1", slots=4)
    for _ in range(4):
        await submit(store, max_attempts=1)
    a, b, c, d = await place(store)
    for p in (a, b, c, d):
        assert await start(store, p) == 1
    await redis.script_flush()  # the first transaction meets NOSCRIPT after its SETs ran
    assert (await calls.finish_many("w1", "i1", [done(a), done(c, small), done(d, big, b"o")])).codes == [1, 1, 1]
    assert await stored(a) == (None, b"1", None, b"1", big, out)
    assert await stored(c) == (None, b"1", None, b"1", small, out)
    assert await stored(d) == (None, b"1", b"o", None, big, None)
    for field in ("result", "output"):  # the job's own expiry: read the job's first, the kept value's since
        ttl = await redis.pttl(keys.job(a.job_id))
        assert 0 < ttl - 1000 < await redis.pttl(keys.job_apart(a.job_id, field)) <= ttl
    fields = await store.get_fields([a.job_id, c.job_id])
    assert [(f[b"result"], f[b"output"]) for f in fields] == [(big, out), (small, out)]
    assert not any(mark in f for f in fields for mark in (b"big_result", b"big_output"))
    job = await store.get(a.job_id)
    assert (job.result, job.output) == (struct_pb2.Value.FromString(big), out)
    before = {key: await redis.dump(key) for key in await redis.keys(f"{keys.prefix}*")}
    assert (await calls.finish_many("w1", "i1", [done(a)])).codes == [2]  # sent again after a lost reply
    stale = Placement(b.job_id, "w1", b.lease + 1000, 1, True)
    assert (await calls.finish_many("w1", "i1", [done(stale)])).codes == [0]
    gone = Placement("0" * 32, "w1", 1, 1, True)
    assert (await calls.finish_many("w1", "i1", [done(gone)])).codes == [-1]
    after = {key: await redis.dump(key) for key in await redis.keys(f"{keys.prefix}*")}
    assert after == before  # nothing staged is left, nothing recorded changed
    # Small values stay in the hash; RetryJob drops values kept apart.
    assert (await calls.finish_many("w1", "i1", [done(b, small, b"o")])).codes == [1]
    assert await stored(b) == (small, None, b"o", None, None, None)
    await store.retry(a.job_id)
    assert await stored(a) == (None,) * 6


def one_event(job_id: str, state: int) -> bytes:
    return relay_pb2.JobEvents(events=[job_pb2.JobEvent(job_id=job_id, state=state)]).SerializeToString()  # type: ignore[arg-type]


def outcome(p: Placement, state: int) -> Outcome:
    """The outcome of a placement with nothing but its state, for finish_many."""
    return Outcome(p.job_id, p.lease, state, b"", b"", "", "", one_event(p.job_id, state))


async def test_batched_start_and_finish_handle_each_job_as_alone_and_publish_the_changes_as_one_message(
    store: GatewayCalls, redis: Redis
) -> None:
    k, calls = store.keys, worker_calls(store)
    await beat(store, "w1", slots=3)
    ids = [await submit(store) for _ in range(3)]
    placed = {p.job_id: p for p in await place(store)}
    a, b, c = (placed[i] for i in ids)
    assert await start(store, a) == 1  # started alone before the batch: its event is not repeated
    stale = dataclasses.replace(c, lease=c.lease + 1)
    async with redis.pubsub() as ps:
        await ps.subscribe(k.results_channel())
        await ps.get_message(timeout=1)  # the subscribe confirmation
        jobs = [(a.job_id, a.lease), (b.job_id, b.lease), (c.job_id, stale.lease), ("f" * 32, 1)]
        codes = await calls.start_many(
            "w1", "i1", [Start(j, lease, one_event(j, S.JOB_STATE_RUNNING)) for j, lease in jobs]
        )
        assert codes == [1, 1, 0, -1]
        msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1)
        assert [e.job_id for e in relay_pb2.JobEvents.FromString(msg["data"]).events] == [b.job_id]

        bad = await redis.hgetall(k.job(a.job_id))
        with pytest.raises(Exception, match="terminal state"):
            await calls.finish_many(
                "w1", "i1", [outcome(a, S.JOB_STATE_SUCCEEDED), outcome(b, S.JOB_STATE_RUNNING)], take=()
            )
        assert await redis.hgetall(k.job(a.job_id)) == bad  # nothing of the batch was written
        assert (await finish(store, a))[0] == 1
        await ps.get_message(ignore_subscribe_messages=True, timeout=1)
        d, waiting = await submit(store), await submit(store)
        assert [p.job_id for p in await place(store)] == [d]  # a's slot; w1 is full again: one waits
        await ps.get_message(ignore_subscribe_messages=True, timeout=1)  # d's DISPATCHED
        done = await calls.finish_many(
            "w1",
            "i1",
            [outcome(a, S.JOB_STATE_SUCCEEDED), outcome(b, S.JOB_STATE_FAILED), outcome(stale, S.JOB_STATE_SUCCEEDED)],
            take=(),
        )
        assert done.codes == [2, 1, 0]
        msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1)
        assert [(e.job_id, e.state) for e in relay_pb2.JobEvents.FromString(msg["data"]).events] == [
            (b.job_id, S.JOB_STATE_FAILED)
        ]
        # b's slot went straight to the job that was waiting, with no gateway involved.
        [refill] = done.placements
        assert (refill.job_id, refill.worker_id, refill.reached) == (waiting, "w1", True)
        msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1)
        assert [(e.job_id, e.state) for e in relay_pb2.JobEvents.FromString(msg["data"]).events] == [
            (waiting, S.JOB_STATE_DISPATCHED)
        ]
        assert await ps.get_message(ignore_subscribe_messages=True, timeout=0.2) is None
    assert await field(redis, k, k.worker("w1"), "used") == "3"  # c, d and the refill
    assert await field(redis, k, k.job(c.job_id), "state") == str(S.JOB_STATE_DISPATCHED)
    assert 0 < (await redis.zscore(k.acks(), waiting) or 0) - now_ms() <= 600_000  # the stored ack timeout


async def test_placement_prefers_the_least_loaded_worker_that_handles_the_kind(store: GatewayCalls) -> None:
    await beat(store, "busy", slots=4)
    await beat(store, "idle", slots=4)
    await beat(store, "wrong-kind", slots=4, kinds=["other"])
    await beat(store, "draining", slots=4, off=True)
    await beat(store, "dead", slots=4, ttl_ms=-1)
    for _ in range(2):
        await submit(store)
    first = await place(store)
    assert sorted(p.worker_id for p in first) == ["busy", "idle"]
    for _ in range(6):
        await submit(store)
    later = await place(store)
    assert sorted(p.worker_id for p in later) == ["busy"] * 3 + ["idle"] * 3  # 4 slots each, then full


async def test_a_lost_worker_costs_an_attempt_and_fails_the_job_after_the_last(
    store: GatewayCalls, redis: Redis
) -> None:
    k = store.keys
    job_id = await submit(store, max_attempts=2)
    for attempt in (1, 2):
        await beat(store, f"w{attempt}", ttl_ms=300)
        [p] = await place(store)
        await start(store, p)
        await redis.zadd(k.workers(), {f"w{attempt}": 0})  # its heartbeat expired
        [settled] = await store.reap()
        expected = S.JOB_STATE_QUEUED if attempt == 1 else S.JOB_STATE_FAILED
        assert (settled.job_id, settled.state) == (job_id, expected)
    assert await field(redis, k, k.job(job_id), "err_code") == "WORKER_LOST"
    assert await redis.zcard(k.pending("default", "echo")) == 0


async def test_an_unacknowledged_dispatch_goes_back_to_its_queue_without_using_an_attempt(
    store: GatewayCalls, redis: Redis
) -> None:
    k = store.keys
    await beat(store, "w1", slots=1)
    job_id = await submit(store)
    [p] = await place(store)
    assert await place(store) == [] and await store.queue_names() == []  # nothing waits: queue dropped
    await redis.zadd(k.acks(), {job_id: 0})  # acknowledgement deadline passed
    [settled] = await store.reap()
    assert await store.queue_names() == ["default"]  # back, so the periodic pass finds the job
    assert settled.state == S.JOB_STATE_QUEUED
    assert await field(redis, k, k.job(job_id), "attempt") == "0"
    assert await field(redis, k, k.worker("w1"), "used") == "0"
    assert await start(store, p) == 0  # the swallowed placement can no longer start


async def test_a_new_process_under_a_registered_id_evicts_the_old_registration(
    store: GatewayCalls, redis: Redis
) -> None:
    k = store.keys
    await beat(store, "w1", instance="old")
    job_id = await submit(store)
    [p] = await place(store)
    await start(store, p)
    reply = await beat(store, "w1", instance="new")
    assert reply.again and reply.inherited[0].job_id == job_id
    assert await field(redis, k, k.job(job_id), "state") == str(S.JOB_STATE_QUEUED)
    assert await field(redis, k, k.worker("w1"), "used") == "0"
    assert (await beat(store, "w1", instance="new")) == Heartbeat(False, [])


async def test_cancel_ends_a_queued_job_and_flags_a_running_one(store: GatewayCalls, redis: Redis) -> None:
    k = store.keys
    queued = await submit(store)
    assert (await store.cancel(queued)).queue == "default"
    assert await redis.zcard(k.pending("default", "echo")) == 0
    await beat(store, "w1")
    running = await submit(store)
    [p] = await place(store)
    await start(store, p)
    outcome = await store.cancel(running)
    assert (outcome.worker_id, outcome.lease) == ("w1", p.lease)
    await redis.zadd(k.workers(), {"w1": 0})  # the worker dies before it stops the job
    [settled] = await store.reap()
    assert (settled.job_id, settled.state) == (running, S.JOB_STATE_CANCELLED)
    # the worker's own CANCELLED outcome, arriving late, is stale: the gateway settled the job
    assert (await finish(store, p, S.JOB_STATE_CANCELLED))[0] == 0


async def test_jobs_of_kinds_no_free_worker_handles_do_not_hold_up_the_others(store: GatewayCalls) -> None:
    for _ in range(5):
        await submit(store, "unserved", priority=9)
    wanted = [await submit(store, "echo") for _ in range(2)]
    await beat(store, "w1", slots=10, kinds=["echo"])
    assert [p.job_id for p in await place(store)] == wanted


async def test_placement_across_kinds_follows_priority_then_submission_order(store: GatewayCalls) -> None:
    low = await submit(store, "x", priority=0)
    high_y = await submit(store, "y", priority=5)
    high_x = await submit(store, "x", priority=5)
    await beat(store, "w1", slots=3)
    assert [p.job_id for p in await place(store)] == [high_y, high_x, low]


async def test_an_emptied_queue_leaves_the_queues_set_until_a_job_comes_again(
    store: GatewayCalls, redis: Redis
) -> None:
    k = store.keys
    job_id = await submit(store)
    assert await store.queue_names() == ["default"]
    await store.cancel(job_id)
    assert await place(store) == []
    assert await store.queue_names() == []
    assert not await redis.exists(k.queue_kinds("default"))
    await submit(store)
    assert await store.queue_names() == ["default"]


async def test_a_resent_submit_leaves_the_job_as_it_is(store: GatewayCalls, redis: Redis, keys: Keys) -> None:
    """A client library that resends a submit after a lost reply must not queue the job again."""
    await beat(store, "w1")
    prepared = prepare(request("echo"), LIMITS)
    [job], _ = await store.submit([prepared])
    [p] = await place(store)
    assert await start(store, p) == 1
    seq = await redis.get(keys.seq())
    [again], _ = await store.submit([prepared])  # the same call, sent again
    assert again.id == job.id
    assert int(await field(redis, keys, keys.job(job.id), "state")) == S.JOB_STATE_RUNNING
    assert await field(redis, keys, keys.job(job.id), "lease") == str(p.lease)
    assert await redis.zcard(keys.pending("default", "echo")) == 0
    assert await redis.get(keys.seq()) == seq


async def test_queues_and_kinds_over_their_limits_are_refused_and_nothing_of_the_batch_is_stored(
    redis: Redis, keys: Keys
) -> None:
    store = GatewayCalls(redis, keys, idempotency_ttl_s=600, max_queues=2, max_kinds=2, place_most=0)
    first = await submit(store, queue="q1", idempotency_key="k1")
    q2_job = await submit(store, queue="q2")
    await submit(store, "echo", queue="q1")
    await submit(store, "sleep", queue="q1")  # q1 now has its two kinds
    before = sorted(await redis.keys(f"{keys.prefix}*"))
    third_queue = prepare_batch([request("echo", queue="q1"), request("echo", queue="q3")], LIMITS)
    with pytest.raises(ResourceExhausted, match=r"^jobs\[1\]\.queue: 2 queues"):
        await store.submit(third_queue)
    third_kind = prepare_batch([request("echo", queue="q2"), request("fail", queue="q1")], LIMITS)
    with pytest.raises(ResourceExhausted, match=r"^jobs\[1\]\.kind: queue 'q1'"):
        await store.submit(third_kind)
    assert sorted(await redis.keys(f"{keys.prefix}*")) == before  # all or none: the first jobs neither
    # An idempotent repeat adds nothing, so it is answered even at the limit.
    [again], _ = await store.submit([prepare(request(queue="q1", idempotency_key="k1"), LIMITS)])
    assert again.id == first
    # Once a queue drains, placement forgets it and its place is free again.
    await store.cancel(q2_job)
    assert await store.schedule("q2", ack_timeout_ms=5_000, most=100) == Placed([], set(), {"q2"})  # q2 empty: dropped
    assert await submit(store, queue="q3")


async def test_a_running_jobs_worker_is_told_to_cancel_again_until_the_job_ends(
    store: GatewayCalls, redis: Redis, keys: Keys
) -> None:
    """A CancelJob message can be lost like any pub/sub message: gateways repeat it."""
    await beat(store, "w1")
    job_id = await submit(store)
    [p] = await place(store)
    assert await start(store, p) == 1
    outcome = await store.cancel(job_id)  # the message the gateway would publish now is "lost"
    assert (outcome.worker_id, outcome.lease) == ("w1", p.lease)
    async with redis.pubsub() as ps:
        await ps.subscribe(keys.dispatch_channel("w1"))
        await ps.get_message(timeout=1)  # the subscribe confirmation
        assert await store.resend_cancels(older_than_ms=60_000) == 0  # told just now: not yet again
        assert await store.resend_cancels(older_than_ms=0) == 1
        msg = await ps.get_message(ignore_subscribe_messages=True, timeout=5)
        assert msg is not None
        told = relay_pb2.WorkerMessage.FromString(msg["data"])
        assert (told.cancel.job_id, told.cancel.lease) == (job_id, p.lease)
        assert (await finish(store, p, S.JOB_STATE_CANCELLED))[0] == 1
        assert await store.resend_cancels(older_than_ms=0) == 0  # ended: forgotten, nobody told
        assert await ps.get_message(ignore_subscribe_messages=True, timeout=0.2) is None
    assert await redis.zcard(keys.cancels()) == 0


async def test_calls_that_place_start_and_finish_over_a_thousand_jobs_book_every_one(
    store: GatewayCalls, redis: Redis
) -> None:
    """The scripts write many jobs with one command each, in chunks: past the chunk size (1,000
    arguments) every job is still queued, placed, acknowledged, booked and released exactly once."""
    k, n, slots = store.keys, 1_300, 1_200
    many = Limits(max_payload_bytes=1 << 20, default_timeout_ms=60_000, max_batch=n, max_watch_ids=100)
    await beat(store, "w1", slots=slots)
    jobs, _ = await store.submit(prepare_batch([request("echo") for _ in range(n)], many))
    assert await redis.zcard(k.pending("default", "echo")) == n
    assert [int(await field(redis, k, k.job(j.id), "seq")) for j in jobs] == list(range(1, n + 1))

    placed = (await store.schedule("default", ack_timeout_ms=5_000, most=n)).placements
    assert len(placed) == slots and all(p.reached for p in placed)
    assert [p.job_id for p in placed] == [j.id for j in jobs[:slots]]  # submission order
    assert sorted(p.lease for p in placed) == list(range(1, slots + 1))  # each lease given once
    assert await redis.get(k.lease_seq()) == str(slots).encode()
    assert await redis.zcard(k.pending("default", "echo")) == n - slots
    assert await redis.zcard(k.acks()) == slots
    assert await redis.scard(k.worker_jobs("w1")) == slots
    assert await field(redis, k, k.worker("w1"), "used") == str(slots)

    calls = worker_calls(store)
    codes = await calls.start_many("w1", "i1", [Start(p.job_id, p.lease, one_event(p.job_id, 3)) for p in placed])
    assert codes == [1] * slots
    assert await redis.zcard(k.acks()) == 0

    done = await calls.finish_many("w1", "i1", [outcome(p, S.JOB_STATE_SUCCEEDED) for p in placed], take=())
    assert done.codes == [1] * slots
    refills = done.placements  # the freed slots take the 100 jobs still waiting
    assert [p.job_id for p in refills] == [j.id for j in jobs[slots:]]
    assert sorted(p.lease for p in refills) == list(range(slots + 1, n + 1))
    assert await redis.scard(k.worker_jobs("w1")) == n - slots
    assert await field(redis, k, k.worker("w1"), "used") == str(n - slots)
    assert await redis.zcard(k.pending("default", "echo")) == 0
    assert not await redis.sismember(k.queue_kinds("default"), "echo")  # nothing of the kind waits
    states = {await field(redis, k, k.job(p.job_id), "state") for p in placed}
    assert states == {str(S.JOB_STATE_SUCCEEDED)}


async def test_a_finishing_worker_refills_only_its_own_slots_and_a_pass_fills_the_others(
    store: GatewayCalls, redis: Redis
) -> None:
    k = store.keys
    await beat(store, "w1", slots=1)
    await submit(store)
    [a] = await place(store)
    await beat(store, "w2", slots=2)  # joins with free slots while w1 is busy
    waiting = [await submit(store) for _ in range(3)]  # this store places nothing at submit
    assert await start(store, a) == 1
    done = await worker_calls(store).finish_many("w1", "i1", [outcome(a, S.JOB_STATE_SUCCEEDED)], take=())
    assert done.codes == [1]
    assert [(p.job_id, p.worker_id) for p in done.placements] == [(waiting[0], "w1")]
    assert await field(redis, k, k.worker("w2"), "used") == "0"
    assert sorted((p.job_id, p.worker_id) for p in await place(store)) == sorted((w, "w2") for w in waiting[1:])


async def test_a_finishing_worker_takes_waiting_jobs_started_within_its_budget_and_is_dispatched_the_rest(
    store: GatewayCalls, redis: Redis
) -> None:
    """With a take budget, finish_many starts the refills on the worker's behalf and returns them
    (no dispatch, no acknowledgement deadline, DISPATCHED and RUNNING published); free slots past
    the budget are dispatched as without one."""
    k = store.keys
    await beat(store, "w1", slots=3)
    await submit(store)
    [a] = await place(store)
    await start(store, a)
    waiting = [await submit(store, args={"n": i}) for i in range(4)]
    async with redis.pubsub() as ps:
        await ps.subscribe(k.results_channel(), k.dispatch_channel("w1"))
        await ps.get_message(timeout=1)
        await ps.get_message(timeout=1)

        async def finish_taking_one() -> Finished:
            return await worker_calls(store).finish_many(
                "w1", "i1", [outcome(a, S.JOB_STATE_SUCCEEDED)], take={a.job_id}
            )

        done = await finish_taking_one()
        assert done.codes == [1]
        [took] = done.taken
        refills = done.placements
        assert [p.job_id for p in refills] == waiting[:3]  # one taken, then the two other free slots
        assert (took.job_id, took.lease, took.attempt) == (waiting[0], refills[0].lease, 1)
        assert took.spec.args.struct_value.fields["n"].number_value == 0
        got = []
        while (msg := await ps.get_message(ignore_subscribe_messages=True, timeout=1)) is not None:
            got.append(msg)
    results = [m["data"] for m in got if m["channel"].decode() == k.results_channel()]
    [to_worker] = [m["data"] for m in got if m["channel"].decode() == k.dispatch_channel("w1")]
    events = [(e.job_id, e.state) for m in results for e in relay_pb2.JobEvents.FromString(m).events]
    assert events == [
        (a.job_id, S.JOB_STATE_SUCCEEDED),
        (waiting[0], S.JOB_STATE_DISPATCHED),
        (waiting[0], S.JOB_STATE_RUNNING),
        (waiting[1], S.JOB_STATE_DISPATCHED),
        (waiting[2], S.JOB_STATE_DISPATCHED),
    ]
    dispatched = relay_pb2.WorkerMessage.FromString(to_worker)
    assert [d.job_id for d in dispatched.dispatches.jobs] == waiting[1:3]
    job = k.job(waiting[0])
    assert await field(redis, k, job, "state") == str(S.JOB_STATE_RUNNING)
    assert await field(redis, k, job, "attempt") == "1"
    assert await field(redis, k, job, "lease") == str(took.lease)
    assert await field(redis, k, job, "started") != ""
    assert await redis.zscore(k.acks(), waiting[0]) is None  # running: nothing to acknowledge
    assert await redis.zscore(k.acks(), waiting[1]) is not None
    assert await redis.smembers(k.worker_jobs("w1")) == {w.encode() for w in waiting[:3]}
    assert await field(redis, k, k.worker("w1"), "used") == "3"
    # The same call again (its reply was lost): nothing changes, and the job it took comes back.
    before = {key: await redis.dump(key) for key in await redis.keys(f"{k.prefix}*")}
    assert await finish_taking_one() == Finished([2], [], [took])
    assert {key: await redis.dump(key) for key in await redis.keys(f"{k.prefix}*")} == before
    # The taken job finishes like any started one; then a repeat returns it no more.
    done = Placement(waiting[0], "w1", took.lease, 1, True)
    assert (await finish(store, done))[0] == 1
    assert await finish_taking_one() == Finished([2], [], [])


async def test_values_of_every_size_reach_redis_byte_for_byte_through_the_processes_client(redis_url: str) -> None:
    """The client gateways and workers use packs commands itself (large arguments go out as they
    are, the rest through hiredis): every size around its thresholds, alone, with others, through
    a script and in a pipeline, arrives as it was sent, and packs as hiredis would pack it whole."""
    rng = random.Random(7)
    sizes = [0, 1, LARGE - 1, LARGE, LARGE + 1, RUN - 1, RUN + 1, 3 * RUN, 1 << 20, 3 << 20]
    values = [rng.randbytes(n) for n in sizes]
    words = ("é" * (LARGE // 2 + 5), "é" * (LARGE + 5))  # over LARGE as bytes; the second as characters too
    args: tuple[Any, ...] = ("EVALSHA", "0" * 40, 2, "k", 7, 1.5, *words, *values, *([b"x" * 900] * 300))
    assert b"".join(pack_command(args)) == hiredis.pack_command(args)
    client = redis_client(redis_url, timeout_s=5)
    try:
        echo = client.register_script("return ARGV")
        assert await echo(keys=[], args=values) == values
        async with client.pipeline(transaction=False) as pipe:
            for i, v in enumerate(values):
                pipe.set(f"packing:{i}", v)
                pipe.get(f"packing:{i}")
            assert (await pipe.execute())[1::2] == values
        await client.hset("packing:h", mapping={str(i): v for i, v in enumerate(values)})
        assert await client.hmget("packing:h", [str(i) for i in range(len(values))]) == values
    finally:
        await client.delete("packing:h", *(f"packing:{i}" for i in range(len(values))))
        await client.aclose()
    cluster = redis_client("redis+cluster://127.0.0.1:1", timeout_s=1)  # connects on first use only
    assert cluster.nodes_manager.connection_kwargs["connection_class"].__name__ == "HiredisConnection"  # type: ignore[attr-defined]
