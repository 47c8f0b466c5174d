"""Connection and stream limits: concurrent streams, keepalive policy (idle streams survive, ping
floods are refused). Real gateway processes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest
from redis.asyncio import Redis

from devtools.devstack import Stack
from jobgate.v1 import job_pb2, scheduler_pb2, scheduler_pb2_grpc

from .helpers import Client, eventually, request, start_gateway, wait_streams_open


async def test_streams_over_max_streams_are_refused_and_freed_slots_are_reused(
    stack: Stack, client_for: Callable[[str], Client]
) -> None:
    _, address, metrics_port = start_gateway(stack, env={"JOBGATE_MAX_STREAMS": "3"})
    client = client_for(address)
    open_calls = [client.stub.WatchResults(scheduler_pb2.WatchResultsRequest(), timeout=30) for _ in range(3)]
    await wait_streams_open(metrics_port, 3)
    refused = client.stub.WatchResults(scheduler_pb2.WatchResultsRequest(), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await refused.read()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_streams" in (err.value.details() or "")
    # Unary calls are not streams: they still work.
    assert (await client.submit("echo")).job.id

    open_calls[0].cancel()

    async def accepted() -> bool:
        call = client.stub.WatchResults(scheduler_pb2.WatchResultsRequest(), timeout=10)
        try:
            await asyncio.wait_for(call.read(), timeout=0.3)
        except TimeoutError:
            call.cancel()
            return True  # open and waiting for events: admitted
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        return False

    assert await eventually(accepted, what="a freed stream slot reused")
    for call in open_calls[1:]:
        call.cancel()


async def test_thousands_of_streams_opened_at_once_are_all_taken(stack: Stack) -> None:
    """Clients reconnecting together after a restart open their streams at once: calls arriving
    faster than the gateway takes them wait for it, none is cut with CANCELLED (gRPC's core does
    that beyond 1,000 waiting calls unless told otherwise)."""
    _, address, metrics_port = start_gateway(stack)
    n, per_connection = 3000, 90  # under HTTP/2's usual cap of 100 streams per connection
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(-(-n // per_connection))
    ]
    calls = [
        scheduler_pb2_grpc.SchedulerServiceStub(channels[i // per_connection]).WatchResults(
            scheduler_pb2.WatchResultsRequest(kinds=["nothing"]), timeout=60
        )
        for i in range(n)
    ]
    try:
        await wait_streams_open(metrics_port, n, timeout=40)
        ended = [c for c in calls if c.done()]
        assert not ended, [await c.code() for c in ended[:5]]
    finally:
        for c in calls:
            c.cancel()
        await asyncio.gather(*(ch.close() for ch in channels))


async def test_an_idle_stream_survives_server_keepalive_pings(stack: Stack) -> None:
    """A WatchResults stream that sees nothing for many keepalive periods stays open, with the
    client itself pinging at the slowest rate the gateway allows."""
    _, address = stack.start_gateway(
        env={
            "JOBGATE_KEEPALIVE_TIME_MS": "200",
            "JOBGATE_KEEPALIVE_TIMEOUT_MS": "2000",
            "JOBGATE_MIN_PING_INTERVAL_MS": "500",
        }
    )
    stack.start_worker()
    options = [("grpc.keepalive_time_ms", 600), ("grpc.keepalive_permit_without_calls", 1)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        sleeper = await stub.SubmitJob(request("sleep", {"seconds": 4}), timeout=10)
        call = stub.WatchResults(scheduler_pb2.WatchResultsRequest(job_ids=[sleeper.job.id]), timeout=30)
        events = [r.event async for r in call]
        assert [e.state for e in events] == [job_pb2.JOB_STATE_SUCCEEDED]


async def test_a_client_flooding_pings_is_disconnected(stack: Stack) -> None:
    _, address = stack.start_gateway(env={"JOBGATE_MIN_PING_INTERVAL_MS": "5000", "JOBGATE_MAX_PING_STRIKES": "2"})
    options = [
        ("grpc.keepalive_time_ms", 100),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_time_between_pings_ms", 100),
    ]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        call = stub.WatchResults(scheduler_pb2.WatchResultsRequest(), timeout=20)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_cannot_make_more_queues_or_kinds_than_the_limits(
    stack: Stack, client_for: Callable[[str], Client], redis: Redis, namespace: str
) -> None:
    _, address = stack.start_gateway(env={"JOBGATE_MAX_QUEUES": "3", "JOBGATE_MAX_KINDS": "2"})
    client = client_for(address)
    for queue in ("a", "b", "c"):
        assert (await client.submit("echo", queue=queue)).job.id  # no worker: they stay waiting
    assert (await client.submit("sleep", queue="a")).job.id
    before = sorted([k async for k in redis.scan_iter(match=f"{{{namespace}}}:*")])
    for fields, named in (({"queue": "d"}, "queue"), ({"queue": "a", "kind": "fail"}, "kind")):
        kind = str(fields.pop("kind", "echo"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.submit(kind, **fields)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (err.value.details() or "").startswith(f"{named}:")
    assert sorted([k async for k in redis.scan_iter(match=f"{{{namespace}}}:*")]) == before
    stack.start_worker("--queues", "a,b,c,d")  # the queues drain, placement forgets them
    assert await eventually(lambda: _submitted(client, "d"), what="a new queue once others drained")


async def _submitted(client: Client, queue: str) -> bool:
    try:
        return bool((await client.submit("echo", queue=queue)).job.id)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        return False


async def test_single_submits_that_arrive_together_are_accepted_or_refused_each_on_its_own(
    stack: Stack, client_for: Callable[[str], Client], redis: Redis, namespace: str
) -> None:
    """Concurrent SubmitJob calls share script calls: a refused one must not fail its neighbours,
    and the same idempotency key sent at once must still give one job."""
    _, address = stack.start_gateway(env={"JOBGATE_MAX_QUEUES": "2"})
    client = client_for(address)
    await client.submit("echo", queue="a")  # no worker: queue "a" keeps a waiting job

    async def outcome(**fields: object) -> str:
        try:
            return (await client.submit("echo", {"same": True}, **fields)).job.id
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name} {exc.details()}"

    calls = [outcome(queue="a") for _ in range(30)]
    calls += [outcome(queue=f"new{i}") for i in range(10)]  # one new queue fits, nine do not
    calls += [outcome(queue="a", idempotency_key="once") for _ in range(20)]
    results = await asyncio.gather(*calls)
    plain, fresh, keyed = results[:30], results[30:40], results[40:]
    assert all(len(r) == 32 for r in plain)
    assert sum(len(r) == 32 for r in fresh) == 1
    assert all(r.startswith("RESOURCE_EXHAUSTED queue:") for r in fresh if len(r) != 32)
    assert len(set(keyed)) == 1 and len(keyed[0]) == 32  # one job for the key, every caller told its id
    stored = {k async for k in redis.scan_iter(match=f"{{{namespace}}}:job:*")}
    assert len(stored) == 1 + 30 + 1 + 1
