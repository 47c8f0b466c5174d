"""What the Lua scripts and the Python side of the protocol each encode must agree: key names,
the order of the namespace's keys, protobuf field numbers, and the registration a start needs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, timestamp_pb2
from redis.asyncio import Redis

from gateway.validation import Limits, prepare
from jobgate.v1 import job_pb2, relay_pb2
from protocol.gateway_calls import GatewayCalls
from protocol.keys import Keys
from protocol.worker_calls import Registration, Start, WorkerCalls

from .helpers import request

S = job_pb2
LIMITS = Limits(max_payload_bytes=1 << 20, default_timeout_ms=60_000, max_batch=100, max_watch_ids=100)


async def run_lua(redis: Redis, body: str, keys: list[str], args: list[Any]) -> Any:
    """Runs ``body`` after the scripts' shared prelude (as every script is sent)."""
    prelude = (resources.files("protocol") / "lua" / "_common.lua").read_text()
    return await redis.eval(prelude + "\n" + body, len(keys), *keys, *args)


async def test_the_lua_key_functions_name_every_derived_key_as_protocol_keys_does(redis: Redis) -> None:
    keys = Keys("a.b-c_1")
    queue, kind, job, worker = "q.x-1", "kind:v2", "0123456789abcdef0123456789abcdef", "w_7.host-1"
    body = """
    local P, q, kind, id, w = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
    return {job_key(P, id), pending_key(P, q, kind), kinds_key(P, q), qworkers_key(P, q), worker_key(P, w),
      worker_jobs_key(P, w), dispatch_channel(P, w), failed_key(P, q), queue_key(P, q), running_key(P, q),
      batch_key(P, id), ckey_key(P, q, 'c:1/x'), ckey_jobs_key(P, q, 'c:1/x'), jobs_key(P, q), ended_key(P, q, 493),
      apart_key(P, id, 'output'), staged_key(P, id, 'result', '12')}
    """
    got = await run_lua(redis, body, [], [keys.prefix, queue, kind, job, worker])
    assert [g.decode() for g in got] == [
        keys.job(job),
        keys.pending(queue, kind),
        keys.queue_kinds(queue),
        keys.queue_workers(queue),
        keys.worker(worker),
        keys.worker_jobs(worker),
        keys.dispatch_channel(worker),
        keys.failed(queue),
        keys.queue_settings(queue),
        keys.running(queue),
        keys.batch(job),
        keys.concurrency_key(queue, "c:1/x"),
        keys.concurrency_line(queue, "c:1/x"),
        keys.jobs(queue),
        keys.ended(queue, 493),
        keys.job_apart(job, "output"),
        keys.staged(job, "result", 12),
    ]


async def test_the_namespace_keys_reach_the_scripts_in_the_order_the_prelude_names_them(redis: Redis) -> None:
    keys = Keys("order")
    body = """
    local ns = namespace(ARGV[1])
    return {ns.queues, ns.seq, ns.lease, ns.acks, ns.cancels, ns.workers, ns.results, NS_KEYS, OWN_KEYS,
      KEYS[NS_KEYS + 1] == worker_key(ARGV[1], 'w1'), KEYS[OWN_KEYS] == worker_jobs_key(ARGV[1], 'w1')}
    """
    got = await run_lua(redis, body, [*keys.namespace_keys(), *keys.own_keys("w1")], [keys.prefix])
    assert got[-2:] == [1, 1]  # Lua's true; the worker's own keys come where the scripts read them
    got = got[:-2]
    assert got[-1] == len(keys.namespace_keys()) + len(keys.own_keys("w1"))
    got = got[:-1]
    assert [g.decode() for g in got[:-1]] == [
        keys.queues(),
        keys.seq(),
        keys.lease_seq(),
        keys.acks(),
        keys.cancels(),
        keys.workers(),
        keys.results_channel(),
    ]
    assert got[-1] == len(keys.namespace_keys())


def descriptor_fields() -> dict[tuple[str, str], int]:
    """(message, field) -> number, from the descriptor set ``make proto`` writes (and the
    Timestamp's, which that set imports)."""
    raw = (resources.files("jobgate.v1") / "descriptor_set.binpb").read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(raw)
    out = {}
    for f in files.file:
        for m in f.message_type:
            for field in m.field:
                out[m.name, field.name] = field.number
    out.update({("Timestamp", f.name): f.number for f in timestamp_pb2.Timestamp.DESCRIPTOR.fields})
    return out


async def test_the_protobuf_field_numbers_the_lua_encoders_use_match_the_generated_descriptors(redis: Redis) -> None:
    body = """
    local out = {}
    for message, fields in pairs(PB) do
      for name, number in pairs(fields) do out[#out + 1] = message .. '.' .. name .. '=' .. number end
    end
    return out
    """
    lua = {}
    for entry in await run_lua(redis, body, [], []):
        name, number = entry.decode().split("=")
        message, field = name.split(".")
        lua[message, field] = int(number)
    known = descriptor_fields()
    assert {"DispatchJob", "DispatchJobs", "WorkerMessage", "JobEvent", "JobEvents"} <= {m for m, _ in lua}
    assert {key: known.get(key) for key in lua} == lua
    # Every DispatchJob field is encoded by placement, so a new one cannot be forgotten there.
    assert {f for m, f in known if m == "DispatchJob"} == {f for m, f in lua if m == "DispatchJob"}


@pytest.fixture
async def dispatch_heard(redis: Redis, keys: Keys) -> AsyncIterator[Any]:
    """A subscriber on worker w1's dispatch channel (so that placements on it stay placed)."""
    async with redis.pubsub() as ps:
        await ps.subscribe(keys.dispatch_channel("w1"))
        await ps.get_message(timeout=1)
        yield ps


def registration(instance: str, *, off: bool = False) -> Registration:
    return Registration(
        worker_id="w1", instance=instance, ttl_ms=60_000, slots=2, queues=["default"], kinds=[], off=off
    )


async def test_a_process_that_takes_over_a_crashed_workers_id_cannot_start_what_was_placed_on_its_predecessor(
    redis: Redis, keys: Keys, dispatch_heard: Any
) -> None:
    """A restarted process that subscribes before its first heartbeat hears dispatches placed on its
    predecessor's still-live registration. Its start is refused; its first heartbeat settles those
    jobs (placed again, no attempt used), and they run as new placements."""
    gateway = GatewayCalls(redis, keys, idempotency_ttl_s=600, place_most=0)
    worker = WorkerCalls(redis, keys)
    await worker.heartbeat(registration("crashed"))
    [job], _ = await gateway.submit([prepare(request("echo", max_attempts=1), LIMITS)])
    [p] = (await gateway.schedule("default", ack_timeout_ms=60_000, most=10)).placements
    assert (p.job_id, p.worker_id, p.reached) == (job.id, "w1", True)
    heard = relay_pb2.WorkerMessage.FromString(
        (await dispatch_heard.get_message(ignore_subscribe_messages=True, timeout=1))["data"]
    ).dispatch
    assert (heard.job_id, heard.lease) == (job.id, p.lease)
    assert heard.HasField("ack_deadline")

    # The new process gets it wrong: it starts what it heard before registering.
    assert await worker.start_many("w1", "restarted", [Start(job.id, p.lease, b"")]) == [0]
    assert int(await redis.hget(keys.job(job.id), "state")) == S.JOB_STATE_DISPATCHED

    beat = await worker.heartbeat(registration("restarted", off=True))
    assert beat.again
    assert [(s.job_id, s.state) for s in beat.inherited] == [(job.id, S.JOB_STATE_QUEUED)]
    stored = await gateway.get(job.id)
    assert (stored.state, stored.attempt) == (S.JOB_STATE_QUEUED, 0)
    assert await worker.start_many("w1", "restarted", [Start(job.id, p.lease, b"")]) == [0]  # still stale

    await worker.heartbeat(registration("restarted"))
    [again] = (await gateway.schedule("default", ack_timeout_ms=60_000, most=10)).placements
    assert again.lease > p.lease
    assert await worker.start_many("w1", "restarted", [Start(job.id, again.lease, b"")]) == [1]
    stored = await gateway.get(job.id)
    assert (stored.state, stored.attempt) == (S.JOB_STATE_RUNNING, 1)
