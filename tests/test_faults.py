"""Delivery guarantees under failure: killed, stopped and draining workers, lost dispatches,
missing gateways, Redis restarts and forged channel traffic. Real processes, real Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable

import grpc
import pytest
from redis.asyncio import Redis

from devtools.devstack import Stack
from devtools.servers import RedisProcess, free_port
from jobgate.v1 import job_pb2, relay_pb2, scheduler_pb2
from protocol.keys import Keys
from protocol.worker_calls import Start, WorkerCalls

from .helpers import FAST, Client, eventually, registration, request, start_gateway, value, wait_streams_open
from .processes import logged

pytestmark = pytest.mark.slow
S = job_pb2


async def job_state(client: Client, job_id: str) -> scheduler_pb2.GetJobResponse:
    return (await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=job_id), timeout=5)).job


async def wait_running(client: Client, job_id: str, worker_id: str | None = None) -> job_pb2.Job:
    async def running() -> job_pb2.Job | None:
        job = await job_state(client, job_id)
        ok = job.state == S.JOB_STATE_RUNNING and (worker_id is None or job.worker_id == worker_id)
        return job if ok else None

    job: job_pb2.Job = await eventually(running, what=f"job {job_id} running")
    return job


async def test_worker_killed_mid_job_runs_it_again_on_another_worker(
    stack: Stack, client_for: Callable[[str], Client]
) -> None:
    _, address = stack.start_gateway()
    doomed = stack.start_worker(worker_id="doomed")
    client = client_for(address)
    job_id = (await client.submit("sleep", {"seconds": 1.5})).job.id
    await wait_running(client, job_id, "doomed")
    stack.start_worker(worker_id="survivor")
    doomed.kill()
    event = (await client.wait_results([job_id]))[job_id]
    assert (event.state, event.worker_id, event.attempt) == (S.JOB_STATE_SUCCEEDED, "survivor", 2)


async def test_job_is_failed_with_worker_lost_after_its_last_attempt(
    stack: Stack, client_for: Callable[[str], Client]
) -> None:
    _, address = stack.start_gateway()
    doomed = stack.start_worker(worker_id="doomed")
    client = client_for(address)
    job_id = (await client.submit("sleep", {"seconds": 30}, max_attempts=1)).job.id
    await wait_running(client, job_id, "doomed")
    doomed.kill()
    stack.start_worker(worker_id="bystander")
    event = (await client.wait_results([job_id]))[job_id]
    assert event.state == S.JOB_STATE_FAILED and event.error.code == "WORKER_LOST"
    assert "doomed" in event.error.message and event.attempt == 1


async def test_a_dispatch_that_is_never_acknowledged_is_placed_again(
    stack: Stack, client_for: Callable[[str], Client], redis: Redis, keys: Keys
) -> None:
    """A subscriber that swallows its dispatch (as if the message were lost) must not keep the job."""
    calls = WorkerCalls(redis, keys)

    async def beat(off: bool) -> None:
        await calls.heartbeat(registration("sink", slots=1, kinds=["echo"], off=off, instance="sink-instance"))

    async with redis.pubsub() as sink:
        await sink.subscribe(keys.dispatch_channel("sink"))
        await beat(False)
        _, address = stack.start_gateway()
        client = client_for(address)
        job_id = (await client.submit("echo", {"lost": "once"})).job.id
        msg = await eventually(
            lambda: sink.get_message(ignore_subscribe_messages=True, timeout=0.2), what="dispatch to the sink"
        )
        lost = relay_pb2.WorkerMessage.FromString(msg["data"]).dispatch
        assert lost.job_id == job_id
        await beat(True)  # alive but taking no new jobs: only the acknowledgement deadline can free the job
        stack.start_worker(worker_id="real")
        event = (await client.wait_results([job_id]))[job_id]
        assert (event.state, event.worker_id, event.attempt) == (S.JOB_STATE_SUCCEEDED, "real", 1)
        late = await calls.start_many("sink", "sink-instance", [Start(job_id, lost.lease, b"")])
        assert late == [0]  # the swallowed placement's lease is stale


async def test_outcome_recorded_while_no_gateway_listens_reaches_the_next_gateway(
    stack: Stack, client_for: Callable[[str], Client], redis: Redis, keys: Keys
) -> None:
    first, address = stack.start_gateway()
    stack.start_worker()
    job_id = (await client_for(address).submit("sleep", {"seconds": 1})).job.id
    await wait_running(client_for(address), job_id)
    assert first.terminate() == 0

    async def finished() -> bool:
        return int(await redis.hget(keys.job(job_id), "state") or 0) == S.JOB_STATE_SUCCEEDED

    await eventually(finished, what="outcome recorded with no gateway")
    _, second = stack.start_gateway()
    event = (await client_for(second).wait_results([job_id]))[job_id]
    assert event.state == S.JOB_STATE_SUCCEEDED and value(event.result) == {"slept": 1}


async def test_watch_resumed_on_another_gateway_after_a_kill_gets_every_outcome(
    stack: Stack, client_for: Callable[[str], Client]
) -> None:
    doomed, first = stack.start_gateway()
    _, second = stack.start_gateway()
    stack.start_worker("--concurrency", "4")
    client = client_for(first)
    reply = await client.stub.SubmitJobs(
        scheduler_pb2.SubmitJobsRequest(jobs=[request("sleep", {"seconds": 0.1}) for _ in range(40)]), timeout=10
    )
    ids = [j.id for j in reply.jobs]
    seen: set[str] = set()
    call = client.stub.WatchResults(scheduler_pb2.WatchResultsRequest(job_ids=ids), timeout=30)
    async for resp in call:
        seen.add(resp.event.job_id)
        if len(seen) == 5:
            doomed.kill()
            break
    call.cancel()
    rest = await client_for(second).wait_results([i for i in ids if i not in seen])
    assert seen | set(rest) == set(ids)
    assert all(e.state == S.JOB_STATE_SUCCEEDED for e in rest.values())


async def test_two_gateways_share_workers_without_placing_any_job_twice(
    stack: Stack, client_for: Callable[[str], Client]
) -> None:
    addresses = [stack.start_gateway()[1] for _ in range(2)]
    workers = [stack.start_worker("--concurrency", "4") for _ in range(3)]
    clients = [client_for(a) for a in addresses]

    async def submit(c: Client) -> list[str]:
        ids = []
        for _ in range(5):
            reply = await c.stub.SubmitJobs(
                scheduler_pb2.SubmitJobsRequest(jobs=[request("echo") for _ in range(30)]), timeout=10
            )
            ids += [j.id for j in reply.jobs]
        return ids

    batches = await asyncio.gather(*(submit(c) for c in clients))
    ids = batches[0] + batches[1]
    events = await clients[1].wait_results(ids)
    assert len(events) == 300 and all(e.state == S.JOB_STATE_SUCCEEDED and e.attempt == 1 for e in events.values())
    started = [line for w in workers for line in w.log().splitlines() if " started" in line and "job_id=" in line]
    assert len(started) == 300  # each job started exactly once across all workers


async def test_worker_sigterm_finishes_short_jobs_and_hands_long_ones_back(
    stack: Stack, client_for: Callable[[str], Client]
) -> None:
    _, address = stack.start_gateway()
    leaving = stack.start_worker("--concurrency", "2", worker_id="leaving", env={"JOBGATE_GRACE_S": "1"})
    client = client_for(address)
    short = (await client.submit("sleep", {"seconds": 0.3})).job.id
    follow = client.stub.RunJob(scheduler_pb2.RunJobRequest(job=request("sleep", {"seconds": 2})), timeout=30)
    long = (await anext(aiter(follow))).event.job_id
    states = asyncio.create_task(_states(follow))
    await wait_running(client, short, "leaving")
    await wait_running(client, long, "leaving")
    stack.start_worker(worker_id="staying")
    began = time.monotonic()
    assert leaving.terminate(timeout_s=10) == 0
    assert time.monotonic() - began < 6
    events = await client.wait_results([short, long])
    assert (events[short].state, events[short].worker_id) == (S.JOB_STATE_SUCCEEDED, "leaving")
    # handed back, not lost: the interrupted run does not use up an attempt
    assert (events[long].state, events[long].worker_id, events[long].attempt) == (S.JOB_STATE_SUCCEEDED, "staying", 1)
    running, dispatched, queued = S.JOB_STATE_RUNNING, S.JOB_STATE_DISPATCHED, S.JOB_STATE_QUEUED
    # the hand-back is reported to RunJob too
    assert await states == [dispatched, running, queued, dispatched, running, S.JOB_STATE_SUCCEEDED]


async def _states(call: object) -> list[int]:
    return [resp.event.state async for resp in call]  # type: ignore[attr-defined]


async def test_late_outcome_of_a_superseded_attempt_is_discarded(
    stack: Stack, client_for: Callable[[str], Client]
) -> None:
    _, address = stack.start_gateway()
    frozen = stack.start_worker(worker_id="frozen")
    client = client_for(address)
    job_id = (await client.submit("sleep", {"seconds": 1})).job.id
    await wait_running(client, job_id, "frozen")
    frozen.signal(signal.SIGSTOP)
    try:
        stack.start_worker(worker_id="thawed")
        event = (await client.wait_results([job_id]))[job_id]
        assert (event.worker_id, event.attempt) == ("thawed", 2)
    finally:
        frozen.signal(signal.SIGCONT)
    # On waking, the frozen worker either tries to record its late outcome (refused: stale lease)
    # or first learns from its heartbeat that it was evicted and abandons the job.
    await eventually(
        lambda: logged(frozen, "outcome discarded", "abandoning 1 superseded"),
        what="late outcome discarded",
    )
    job = await job_state(client, job_id)
    assert (job.state, job.worker_id, job.attempt) == (S.JOB_STATE_SUCCEEDED, "thawed", 2)


async def test_redis_restart_answers_unavailable_then_everything_accepted_completes(
    private_redis: RedisProcess, client_for: Callable[[str], Client]
) -> None:
    stack = Stack(private_redis.url, "restart", env=FAST)
    try:
        _, address = stack.start_gateway()
        stack.start_worker("--concurrency", "2")
        client = client_for(address)
        accepted = [(await client.submit("sleep", {"seconds": 0.2})).job.id for _ in range(10)]
        private_redis.kill()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.submit("echo", {"during": "outage"})
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        private_redis.start()
        after = await eventually(lambda: _try_submit(client), timeout=30, what="submit after restart")
        events = await client.wait_results([*accepted, after], timeout=60)
        assert all(e.state == S.JOB_STATE_SUCCEEDED for e in events.values())
    finally:
        stack.stop()


async def _try_submit(client: Client) -> str | None:
    try:
        return (await client.submit("echo", {"after": "restart"})).job.id
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE
        return None


async def test_forged_and_malformed_channel_messages_change_nothing(
    stack: Stack, client_for: Callable[[str], Client], redis: Redis, keys: Keys
) -> None:
    gateway, address = stack.start_gateway()
    worker = stack.start_worker(worker_id="target")
    client = client_for(address)
    job_id = (await client.submit("sleep", {"seconds": 1})).job.id
    running = await wait_running(client, job_id, "target")
    call = client.stub.WatchResults(scheduler_pb2.WatchResultsRequest(job_ids=[job_id]), timeout=20)
    forged = job_pb2.JobEvent(job_id=job_id, queue="default", kind="sleep", state=S.JOB_STATE_FAILED)
    forged.error.code = "FORGED"
    phantom = relay_pb2.WorkerMessage(
        dispatch=relay_pb2.DispatchJob(
            job_id="f" * 32, lease=1, attempt=1, spec=job_pb2.JobSpec(kind="echo", queue="default")
        )
    )
    for channel, data in [
        (keys.results_channel(), b"\xff\x00garbage"),
        (keys.results_channel(), relay_pb2.JobEvents(events=[forged]).SerializeToString()),
        (keys.results_channel(), forged.SerializeToString()),  # a bare JobEvent is not a results message
        (
            keys.results_channel(),
            relay_pb2.JobEvents(events=[job_pb2.JobEvent(job_id="../../etc", state=99)]).SerializeToString(),
        ),
        (keys.dispatch_channel("target"), b"\x0a\xffnot a message"),
        (keys.dispatch_channel("target"), phantom.SerializeToString()),
        (
            keys.dispatch_channel("target"),
            relay_pb2.WorkerMessage(
                cancel=relay_pb2.CancelJob(job_id=job_id, lease=running.attempt + 999)
            ).SerializeToString(),
        ),
        (keys.workers_channel(), b"\x08\x08\x08"),
    ]:
        await redis.publish(channel, data)
    [resp] = [r async for r in call]
    assert resp.event.state == S.JOB_STATE_SUCCEEDED and resp.event.error.code == ""
    assert gateway.alive() and worker.alive()
    assert not await redis.exists(keys.job("f" * 32))
    assert "dropped a malformed" in gateway.log() and "dropped a malformed dispatch" in worker.log()


async def test_slow_watcher_is_cut_off_while_fast_watchers_keep_up(
    stack: Stack, client_for: Callable[[str], Client]
) -> None:
    # The buffer must hold a burst for fast watchers: completions come in batches (a worker records
    # the outcomes that end together in one call), and a stream writes one message per event.
    _, address, metrics_port = start_gateway(stack, env={"JOBGATE_STREAM_BUFFER": "3000"})
    stack.start_worker("--concurrency", "8")
    # No BDP probing: the HTTP/2 window stays small, so an unread stream backs up into the gateway.
    slow_channel = grpc.aio.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0)])
    try:
        from jobgate.v1 import scheduler_pb2_grpc

        slow = scheduler_pb2_grpc.SchedulerServiceStub(slow_channel).WatchResults(
            scheduler_pb2.WatchResultsRequest(), timeout=60
        )
        await wait_streams_open(metrics_port, 1)
        client = client_for(address)
        big = {"pad": "x" * 2000}
        ids = []
        for _ in range(16):  # 4,000 events of 2 KB: far more than the slow stream's buffer and window
            reply = await client.stub.SubmitJobs(
                scheduler_pb2.SubmitJobsRequest(jobs=[request("echo", big) for _ in range(250)]), timeout=20
            )
            ids += [j.id for j in reply.jobs]
        groups = await asyncio.gather(
            *(client.wait_results(ids[i : i + 1000], timeout=60) for i in range(0, 4000, 1000))
        )
        assert sum(len(g) for g in groups) == 4000  # four fast watchers, each complete
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in slow:
                pass
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await slow_channel.close()


async def test_gateway_sigterm_stops_within_its_grace_period(stack: Stack) -> None:
    gateway, _ = stack.start_gateway(env={"JOBGATE_GRACE_S": "1"})
    began = time.monotonic()
    assert gateway.terminate(timeout_s=15) == 0
    assert time.monotonic() - began < 6
    assert "stopped" in gateway.log()


async def test_worker_exits_at_once_on_a_second_signal(stack: Stack, client_for: Callable[[str], Client]) -> None:
    _, address = stack.start_gateway()
    worker = stack.start_worker(env={"JOBGATE_GRACE_S": "60"})
    client = client_for(address)
    job_id = (await client.submit("sleep", {"seconds": 60})).job.id
    await wait_running(client, job_id)
    began = time.monotonic()
    os.kill(worker.pid, signal.SIGTERM)
    await eventually(lambda: logged(worker, "draining"), what="worker draining")
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.proc.wait(10) != 0
    assert time.monotonic() - began < 10


async def test_a_worker_restarted_under_the_same_id_does_not_inherit_its_predecessors_jobs(
    stack: Stack, client_for: Callable[[str], Client]
) -> None:
    _, address = stack.start_gateway()
    crashed = stack.start_worker(worker_id="fixed-name", env={"JOBGATE_HEARTBEAT_TTL_MS": "30000"})
    client = client_for(address)
    job_id = (await client.submit("sleep", {"seconds": 1})).job.id
    await wait_running(client, job_id, "fixed-name")
    crashed.kill()
    restarted = stack.start_worker(worker_id="fixed-name")  # back before the old registration expires
    event = (await client.wait_results([job_id], timeout=20))[job_id]
    assert (event.state, event.worker_id, event.attempt) == (S.JOB_STATE_SUCCEEDED, "fixed-name", 2)
    assert "another live process" not in restarted.log()  # a crashed predecessor is no twin


async def test_a_dispatch_that_reaches_no_subscriber_is_taken_back_and_placed_elsewhere(
    stack: Stack, client_for: Callable[[str], Client], redis: Redis, keys: Keys
) -> None:
    """A registered worker whose subscription is gone: PUBLISH returns 0 and the gateway acts on it."""
    await WorkerCalls(redis, keys).heartbeat(registration("ghost", slots=4, instance="ghost-instance"))
    gateway, address = stack.start_gateway()
    client = client_for(address)
    job_id = (await client.submit("echo", {"to": "nobody"})).job.id
    await eventually(lambda: logged(gateway, "reached nobody"), what="PUBLISH returning 0 noticed")

    async def taken_back() -> bool:
        off = await redis.hget(keys.worker("ghost"), "off")  # no more placements on it
        return off == b"1" and (await job_state(client, job_id)).state == S.JOB_STATE_QUEUED

    await eventually(taken_back, what="job back in its queue")
    stack.start_worker(worker_id="present")
    event = (await client.wait_results([job_id]))[job_id]
    assert (event.state, event.worker_id, event.attempt) == (S.JOB_STATE_SUCCEEDED, "present", 1)


async def test_gateway_sigterm_turns_health_not_serving_before_it_stops(stack: Stack) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    gateway, address = stack.start_gateway(env={"JOBGATE_GRACE_S": "2"})
    async with grpc.aio.insecure_channel(address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=20)
        seen = []
        async for reply in watch:
            seen.append(reply.status)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                gateway.signal(signal.SIGTERM)
            elif reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
    assert seen[-2:] == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]
    assert gateway.proc.wait(10) == 0


async def test_gateway_and_worker_resubscribe_after_redis_drops_their_pubsub_connections(
    stack: Stack, client_for: Callable[[str], Client], redis: Redis, keys: Keys
) -> None:
    gateway, address, metrics_port = start_gateway(stack)
    worker = stack.start_worker()
    client = client_for(address)
    earlier = client.stub.WatchResults(scheduler_pb2.WatchResultsRequest(), timeout=30)
    first = (await client.submit("echo")).job.id
    await client.wait_results([first])
    assert (await earlier.read()).event.job_id == first  # the unfiltered stream is live
    await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    # It cannot re-read what it may have missed, so it says so rather than carry on silently.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await earlier.read()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "interrupted" in (err.value.details() or "")

    await eventually(
        lambda: logged(gateway, "re-established") and logged(worker, "re-established"), what="both resubscribed"
    )
    live = client.stub.WatchResults(scheduler_pb2.WatchResultsRequest(kinds=["echo"]), timeout=20)
    await wait_streams_open(metrics_port, 1)
    second = (await client.submit("echo")).job.id
    got = await anext(aiter(live))  # an unfiltered stream is served only by the live subscription
    live.cancel()
    assert got.event.job_id == second and got.event.state == S.JOB_STATE_SUCCEEDED


async def test_gateway_restarted_mid_stream_on_its_address_serves_the_rest_of_the_outcomes(
    stack: Stack, client_for: Callable[[str], Client]
) -> None:
    port = free_port()
    first, address = stack.start_gateway(port=port, env={"JOBGATE_GRACE_S": "0"})
    stack.start_worker("--concurrency", "2")
    client = client_for(address)  # one channel for the whole test: it reconnects by itself
    reply = await client.stub.SubmitJobs(
        scheduler_pb2.SubmitJobsRequest(jobs=[request("sleep", {"seconds": 0.5}) for _ in range(20)]), timeout=10
    )
    ids = [j.id for j in reply.jobs]
    seen: set[str] = set()
    with pytest.raises(grpc.aio.AioRpcError):
        async for resp in client.stub.WatchResults(scheduler_pb2.WatchResultsRequest(job_ids=ids), timeout=30):
            seen.add(resp.event.job_id)
            if len(seen) == 3:
                first.signal(signal.SIGTERM)  # the stream is cut when the gateway stops
    assert first.proc.wait(10) == 0
    stack.start_gateway(port=port)
    rest = await client.wait_results([i for i in ids if i not in seen])
    assert seen | set(rest) == set(ids)


async def test_redis_refusing_writes_gives_unavailable_and_stores_nothing_then_work_resumes(
    private_redis: RedisProcess, client_for: Callable[[str], Client]
) -> None:
    stack = Stack(private_redis.url, "oom", env=FAST)
    admin = Redis.from_url(private_redis.url, socket_timeout=5)
    try:
        gateway, address = stack.start_gateway()
        worker = stack.start_worker()
        client = client_for(address)
        first = (await client.submit("echo", {"before": True})).job.id
        await client.wait_results([first])
        await admin.config_set("maxmemory", "1")  # every write is refused with OOM
        seq = await admin.get(Keys("oom").seq())
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.submit("echo", {"during": "oom"})
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await admin.get(Keys("oom").seq()) == seq  # nothing was stored
        await asyncio.sleep(1.5)  # heartbeats, placement and reaping all meet OOM meanwhile
        await admin.config_set("maxmemory", "0")
        after = await eventually(lambda: _try_submit(client), timeout=20, what="submit after OOM")
        assert (await client.wait_results([after]))[after].state == S.JOB_STATE_SUCCEEDED
        assert gateway.alive() and worker.alive()
    finally:
        await admin.aclose()
        stack.stop()


async def test_a_cancel_whose_message_was_lost_still_reaches_the_worker(
    stack: Stack, client_for: Callable[[str], Client], redis: Redis
) -> None:
    _, address = stack.start_gateway()
    worker = stack.start_worker(worker_id="target", env={"JOBGATE_HEARTBEAT_TTL_MS": "20000"})
    client = client_for(address)
    job_id = (await client.submit("sleep", {"seconds": 15})).job.id
    await wait_running(client, job_id, "target")
    worker.signal(signal.SIGSTOP)  # it cannot resubscribe before the cancel is published
    try:
        await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        reply = await client.stub.CancelJob(scheduler_pb2.CancelJobRequest(id=job_id), timeout=5)
        assert reply.job.state == S.JOB_STATE_RUNNING  # flagged; the message reached nobody
    finally:
        worker.signal(signal.SIGCONT)
    event = (await client.wait_results([job_id], timeout=30))[job_id]
    assert event.state == S.JOB_STATE_CANCELLED, event  # told again once it was back


async def test_two_live_workers_with_one_id_are_reported(stack: Stack) -> None:
    """Ids must be unique: a restarted worker evicts its crashed predecessor once, but two live
    processes under one id evict each other on every heartbeat, and say so."""
    twins = [stack.start_worker(worker_id="twin") for _ in range(2)]

    await eventually(
        lambda: any(logged(w, "another live process seems to use worker id twin") for w in twins),
        what="the duplicate id reported",
    )
