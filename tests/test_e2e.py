"""The public contract end to end: a gateway and workers as subprocesses against a real Redis."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from redis.asyncio import Redis

from devtools.devstack import Stack
from jobgate.v1 import job_pb2, relay_pb2, scheduler_pb2, scheduler_pb2_grpc
from protocol.keys import Keys

from .helpers import Client, eventually, request, start_gateway, value, wait_streams_open

S = job_pb2
pytestmark = pytest.mark.gateway(worker=("--concurrency", "4"))  # the `client` fixture's worker


async def test_submitted_job_runs_and_its_result_streams_back(client: Client) -> None:
    reply = await client.submit("echo", {"x": 1, "tags": ["a", "b"]})
    assert len(reply.job.id) == 32 and reply.job.state == S.JOB_STATE_QUEUED
    events = await client.wait_results([reply.job.id])
    event = events[reply.job.id]
    assert event.state == S.JOB_STATE_SUCCEEDED
    assert value(event.result) == {"x": 1, "tags": ["a", "b"]}
    job = (await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=reply.job.id))).job
    assert job.state == S.JOB_STATE_SUCCEEDED and job.attempt == 1 and job.worker_id
    assert job.finished_at.ToMilliseconds() >= job.started_at.ToMilliseconds() >= job.created_at.ToMilliseconds()


async def test_run_job_streams_every_lifecycle_event_until_the_terminal_one(client: Client) -> None:
    call = client.stub.RunJob(scheduler_pb2.RunJobRequest(job=request("sleep", {"seconds": 0.2})), timeout=20)
    states = [resp.event.state async for resp in call]
    assert states == [S.JOB_STATE_QUEUED, S.JOB_STATE_DISPATCHED, S.JOB_STATE_RUNNING, S.JOB_STATE_SUCCEEDED]


async def test_large_values_come_back_whole_from_every_read(client: Client, redis: Redis, keys: Keys) -> None:
    """Specs, results and outputs over 4 KiB are stored beside their script calls (a result or an
    output in a key of its own): RunJob, GetJob, ListJobs and a late WatchResults all give them
    back as they were."""
    args = {"text": "r" * 20_000, "n": 7.5}
    with_args = request("echo", args, payload=b"p" * 9_000)  # echo returns its args as the result
    with_payload = request("echo", payload=b"o" * 30_000)  # and, without args, its payload as the output
    done = []
    for job in (with_args, with_payload):
        events = [r.event async for r in client.stub.RunJob(scheduler_pb2.RunJobRequest(job=job), timeout=20)]
        done.append(events[-1])
    assert [e.state for e in done] == [S.JOB_STATE_SUCCEEDED] * 2
    want = [(args, b""), (None, b"o" * 30_000)]

    def got(e: job_pb2.JobEvent | job_pb2.Job) -> tuple[object, bytes]:
        return (value(e.result) if e.HasField("result") else None, e.output)

    assert [got(e) for e in done] == want
    for e, field in zip(done, ("result", "output"), strict=True):
        assert await redis.hget(keys.job(e.job_id), f"big_{field}") == b"1"
        ttl = await redis.pttl(keys.job(e.job_id))  # the job's own expiry: read the job's first
        assert 0 < ttl - 1000 < await redis.pttl(keys.job_apart(e.job_id, field)) <= ttl
    jobs = [(await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=e.job_id))).job for e in done]
    assert [got(j) for j in jobs] == want and jobs[0].spec.payload == b"p" * 9_000
    listed = {j.id: j for j in (await client.stub.ListJobs(scheduler_pb2.ListJobsRequest(queue="default"))).jobs}
    assert [got(listed[e.job_id]) for e in done] == want
    late = client.stub.WatchResults(scheduler_pb2.WatchResultsRequest(job_ids=[e.job_id for e in done]), timeout=20)
    assert sorted([got(r.event) async for r in late], key=repr) == sorted(want, key=repr)


async def test_binary_payload_comes_back_as_output(client: Client) -> None:
    reply = await client.submit("echo", payload=b"\x00\xffbinary")
    event = (await client.wait_results([reply.job.id]))[reply.job.id]
    assert event.state == S.JOB_STATE_SUCCEEDED and event.output == b"\x00\xffbinary"


async def test_batch_submit_stores_every_job_in_request_order(client: Client) -> None:
    reqs = [request("echo", {"i": i}) for i in range(200)]
    reply = await client.stub.SubmitJobs(scheduler_pb2.SubmitJobsRequest(jobs=reqs), timeout=10)
    assert [value(j.spec.args)["i"] for j in reply.jobs] == list(range(200))
    events = await client.wait_results([j.id for j in reply.jobs])
    assert {value(e.result)["i"] for e in events.values()} == set(range(200))
    assert all(e.state == S.JOB_STATE_SUCCEEDED for e in events.values())


async def test_the_basic_view_leaves_inputs_and_outputs_out_of_submit_and_listing_replies(
    client: Client, redis: Redis, keys: Keys
) -> None:
    """JOB_VIEW_BASIC: the jobs a SubmitJobs, ListJobs or ListFailedJobs reply carries have no args,
    payload, result or output; the stored jobs keep them (GetJob, the default view), and a basic
    listing does not read the large results kept apart from their jobs. A view that is not a JobView
    is refused, and the refused submit stores nothing."""
    basic, full = scheduler_pb2.JOB_VIEW_BASIC, scheduler_pb2.JOB_VIEW_FULL
    reqs = [request("echo", {"i": 1}, payload=b"p" * 50_000), request("fail"), request("echo", {"big": "b" * 20_000})]
    reply = await client.stub.SubmitJobs(scheduler_pb2.SubmitJobsRequest(jobs=reqs, view=basic), timeout=10)
    ok, failing, big = reply.jobs
    assert [(j.spec.kind, j.spec.queue, j.state) for j in reply.jobs] == [
        ("echo", "default", S.JOB_STATE_QUEUED),
        ("fail", "default", S.JOB_STATE_QUEUED),
        ("echo", "default", S.JOB_STATE_QUEUED),
    ]
    assert not ok.spec.HasField("args") and ok.spec.payload == b"" and len(ok.id) == 32
    assert reply.ByteSize() < 1_000
    await client.wait_results([ok.id, failing.id, big.id])
    assert await redis.exists(keys.job_apart(big.id, "result"))  # its result is kept apart

    def inputs_and_outputs(job: job_pb2.Job) -> tuple[object, int, object, int]:
        return (
            value(job.spec.args) if job.spec.HasField("args") else None,
            len(job.spec.payload),
            value(job.result) if job.HasField("result") else None,
            len(job.output),
        )

    stored = (await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=ok.id))).job
    assert inputs_and_outputs(stored) == ({"i": 1}, 50_000, {"i": 1}, 0)
    for view, want, gets in ((full, ({"i": 1}, 50_000, {"i": 1}, 0), 1), (basic, (None, 0, None, 0), 0)):
        before = await command_calls(redis, "get")  # how values kept apart from job hashes are read
        page = await client.stub.ListJobs(scheduler_pb2.ListJobsRequest(view=view), timeout=10)
        assert await command_calls(redis, "get") - before == gets  # the big result, read only for the full view
        listed = {j.id: j for j in page.jobs}
        assert inputs_and_outputs(listed[ok.id]) == want
        assert listed[ok.id].state == S.JOB_STATE_SUCCEEDED and listed[ok.id].attempts[0].worker_id
        assert (value(listed[big.id].result) == {"big": "b" * 20_000}) == (view == full)
    failed = (await client.stub.ListFailedJobs(scheduler_pb2.ListFailedJobsRequest(view=basic))).jobs
    assert [j.id for j in failed] == [failing.id] and failed[0].error.code

    for call in (
        client.stub.SubmitJobs(scheduler_pb2.SubmitJobsRequest(jobs=[request("echo")], view=7)),
        client.stub.ListJobs(scheduler_pb2.ListJobsRequest(view=7)),
        client.stub.ListFailedJobs(scheduler_pb2.ListFailedJobsRequest(view=-1)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert re.fullmatch(r"view: -?\d+ is not a JobView", err.value.details() or "")
    page = await client.stub.ListJobs(scheduler_pb2.ListJobsRequest(view=basic), timeout=10)
    assert len(page.jobs) == 3  # the refused submit stored nothing


async def test_watch_with_max_batch_delivers_every_completion_once_in_bounded_responses(client: Client) -> None:
    done = [(await client.submit("echo", {"n": n})).job.id for n in range(5)]
    await client.wait_results(done)
    broad = client.stub.WatchResults(scheduler_pb2.WatchResultsRequest(kinds=["echo"], max_batch=50), timeout=30)
    await client.wait_streams_open(1)  # the unfiltered stream registered before the jobs finish
    reqs = [request("echo", {"i": i}) for i in range(120)]
    ids = [j.id for j in (await client.stub.SubmitJobs(scheduler_pb2.SubmitJobsRequest(jobs=reqs), timeout=10)).jobs]
    call = client.stub.WatchResults(
        scheduler_pb2.WatchResultsRequest(job_ids=done + ids, max_batch=7), timeout=30
    )  # the finished ones are replayed in batches too
    responses = [r async for r in call]
    assert all(not r.HasField("event") and 1 <= len(r.events) <= 7 for r in responses)
    seen = [e.job_id for r in responses for e in r.events]
    assert sorted(seen) == sorted(done + ids) and len(responses) >= 125 // 7
    broad_seen: list[str] = []
    async for r in broad:
        assert not r.HasField("event") and 1 <= len(r.events) <= 50
        broad_seen.extend(e.job_id for e in r.events if e.state == S.JOB_STATE_SUCCEEDED)
        if len(broad_seen) >= len(ids):
            break
    broad.cancel()
    assert sorted(broad_seen) == sorted(ids)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await anext(aiter(client.stub.WatchResults(scheduler_pb2.WatchResultsRequest(max_batch=1001), timeout=5)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_batch" in (refused.value.details() or "")


async def test_watch_batches_stay_under_the_message_limit_however_big_the_outputs(client: Client) -> None:
    ids = []
    for half in range(2):  # 3 MB per request, under the 4 MB limit
        reqs = [scheduler_pb2.SubmitJobRequest(kind="echo", payload=bytes([half]) * 300_000) for _ in range(10)]
        reply = await client.stub.SubmitJobs(scheduler_pb2.SubmitJobsRequest(jobs=reqs), timeout=20)
        ids += [j.id for j in reply.jobs]
    await client.wait_results(ids, timeout=30)
    call = client.stub.WatchResults(scheduler_pb2.WatchResultsRequest(job_ids=ids, max_batch=1000), timeout=30)
    responses = [r async for r in call]  # 6 MB of outputs: more than one 4 MB message may carry
    assert len(responses) > 1 and all(r.ByteSize() < 4 << 20 for r in responses)
    assert sorted(e.job_id for r in responses for e in r.events) == sorted(ids)
    assert {len(e.output) for r in responses for e in r.events} == {300_000}


async def test_watch_replays_results_that_finished_before_it_subscribed(client: Client) -> None:
    ids = [(await client.submit("echo", {"n": n})).job.id for n in range(3)]
    await client.wait_results(ids)
    replayed = await client.wait_results(ids, timeout=5)  # all finished: replay, then the stream ends
    assert set(replayed) == set(ids)


async def test_watch_without_ids_streams_completions_matching_queue_and_kind(
    stack: Stack, client_for: Callable[[str], Client]
) -> None:
    _, address, metrics_port = start_gateway(stack)
    stack.start_worker("--queues", "default,other")
    client = client_for(address)
    call = client.stub.WatchResults(scheduler_pb2.WatchResultsRequest(queue="other", kinds=["echo"]), timeout=20)
    await wait_streams_open(metrics_port, 1)  # the stream registered before the jobs finish
    await client.submit("echo", {"skip": "wrong queue"})
    await client.submit("fail", queue="other")
    wanted = (await client.submit("echo", {"keep": True}, queue="other")).job.id
    first = await anext(aiter(call))
    call.cancel()
    assert first.event.job_id == wanted and first.event.queue == "other"


async def test_job_submitted_with_no_worker_runs_when_one_joins(
    stack: Stack, client_for: Callable[[str], Client]
) -> None:
    _, address = stack.start_gateway()
    client = client_for(address)
    job_id = (await client.submit("echo", {"waited": True})).job.id
    await asyncio.sleep(0.5)
    assert (await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=job_id))).job.state == S.JOB_STATE_QUEUED
    stack.start_worker()
    assert (await client.wait_results([job_id]))[job_id].state == S.JOB_STATE_SUCCEEDED


async def test_waiting_jobs_run_by_priority_then_submission_order(
    stack: Stack, client_for: Callable[[str], Client]
) -> None:
    _, address = stack.start_gateway()
    client = client_for(address)
    plan = [("low-1", 0), ("low-2", 0), ("high", 9), ("mid", 5), ("low-3", 0)]
    ids = {}
    for name, prio in plan:
        ids[(await client.submit("echo", {"name": name}, priority=prio)).job.id] = name
    worker = stack.start_worker("--concurrency", "1")
    await client.wait_results(list(ids))
    # The worker's log, not started_at: one after the other, jobs can start within the same millisecond.
    started = re.findall(r"job_id=([0-9a-f]{32}) kind=echo attempt=1 started", worker.log())
    assert [ids[j] for j in started] == ["high", "mid", "low-1", "low-2", "low-3"]


async def test_a_busy_worker_refills_its_slots_without_a_dispatch_or_a_start_call_per_job(
    stack: Stack, client_for: Callable[[str], Client], redis: Redis, keys: Keys
) -> None:
    """Each finish of a busy worker starts the next waiting job on it in the same script call: of 12
    jobs waiting for a one-slot worker, only the first comes as a dispatch message; every job runs
    once, in order, with its RUNNING event published."""
    _, address = stack.start_gateway()
    client = client_for(address)
    ids = [(await client.submit("echo", {"n": n})).job.id for n in range(12)]
    async with redis.pubsub() as ps:
        await ps.subscribe(keys.dispatch_channel("solo"), keys.results_channel())
        for _ in range(2):  # the confirmations
            assert (await ps.get_message(timeout=5) or {}).get("type") == "subscribe"
        worker = stack.start_worker("--concurrency", "1", worker_id="solo")
        events = await client.wait_results(ids)
        received = []
        while (msg := await ps.get_message(ignore_subscribe_messages=True, timeout=0.5)) is not None:
            received.append(msg)
    assert {e.state for e in events.values()} == {S.JOB_STATE_SUCCEEDED}
    assert {e.attempt for e in events.values()} == {1}
    dispatches = [m for m in received if m["channel"].decode() == keys.dispatch_channel("solo")]
    assert len(dispatches) == 1
    running = [
        e.job_id
        for m in received
        if m["channel"].decode() == keys.results_channel()
        for e in relay_pb2.JobEvents.FromString(m["data"]).events
        if e.state == S.JOB_STATE_RUNNING
    ]
    assert running == ids
    assert re.findall(r"job_id=([0-9a-f]{32}) kind=echo attempt=1 started", worker.log()) == ids


async def test_jobs_go_only_to_workers_serving_their_queue(stack: Stack, client_for: Callable[[str], Client]) -> None:
    _, address = stack.start_gateway()
    stack.start_worker("--queues", "alpha", worker_id="alpha-worker")
    stack.start_worker("--queues", "beta", worker_id="beta-worker")
    client = client_for(address)
    a = [(await client.submit("echo", queue="alpha")).job.id for _ in range(5)]
    b = [(await client.submit("echo", queue="beta")).job.id for _ in range(5)]
    events = await client.wait_results(a + b)
    assert {events[i].worker_id for i in a} == {"alpha-worker"}
    assert {events[i].worker_id for i in b} == {"beta-worker"}


async def test_placement_spreads_jobs_over_the_least_loaded_workers(
    stack: Stack, client_for: Callable[[str], Client]
) -> None:
    _, address = stack.start_gateway()
    stack.start_worker("--concurrency", "2", worker_id="w-one")
    stack.start_worker("--concurrency", "2", worker_id="w-two")
    client = client_for(address)
    await eventually(lambda: _live_workers(client, 2), what="two workers registered")
    reply = await client.stub.SubmitJobs(
        scheduler_pb2.SubmitJobsRequest(jobs=[request("sleep", {"seconds": 0.5}) for _ in range(4)]), timeout=10
    )
    events = await client.wait_results([j.id for j in reply.jobs])
    per_worker = sorted(e.worker_id for e in events.values())
    assert per_worker == ["w-one", "w-one", "w-two", "w-two"]


async def _live_workers(client: Client, n: int) -> bool:
    return len((await client.stub.ListWorkers(scheduler_pb2.ListWorkersRequest())).workers) == n


async def test_list_workers_shows_each_live_worker_with_its_slots(
    stack: Stack, client_for: Callable[[str], Client]
) -> None:
    _, address = stack.start_gateway()
    stack.start_worker("--concurrency", "3", "--queues", "q1,q2", worker_id="listed")
    client = client_for(address)
    await eventually(lambda: _live_workers(client, 1), what="worker registered")
    [w] = (await client.stub.ListWorkers(scheduler_pb2.ListWorkersRequest())).workers
    assert (w.id, list(w.queues), w.slots, w.busy) == ("listed", ["q1", "q2"], 3, 0)
    assert {"echo", "sleep", "fail"} <= set(w.kinds)


async def test_failing_handler_records_failed_with_the_exception_text(client: Client) -> None:
    job_id = (await client.submit("fail", {"message": "boom"}, max_attempts=1)).job.id
    event = (await client.wait_results([job_id]))[job_id]
    assert event.state == S.JOB_STATE_FAILED
    assert event.error.code == "HANDLER_ERROR" and "boom" in event.error.message


async def test_worker_stops_each_job_that_runs_past_its_own_timeout(client: Client) -> None:
    # Later jobs with earlier deadlines, and one that ends within its timeout: each deadline holds.
    jobs = {}
    for name, seconds, timeout_ms in (("long", 30, 1_500), ("short", 30, 300), ("in time", 0.2, 3_000)):
        timeout = Duration(seconds=timeout_ms // 1000, nanos=timeout_ms % 1000 * 1_000_000)
        jobs[name] = (await client.submit("sleep", {"seconds": seconds}, timeout=timeout, max_attempts=1)).job.id
    began = asyncio.get_running_loop().time()
    ended = {}
    call = client.stub.WatchResults(scheduler_pb2.WatchResultsRequest(job_ids=list(jobs.values())), timeout=15)
    async for resp in call:
        ended[resp.event.job_id] = (resp.event, asyncio.get_running_loop().time() - began)
    short, long, in_time = (ended[jobs[n]] for n in ("short", "long", "in time"))
    assert [e.error.code for e, _ in (short, long)] == ["TIMEOUT", "TIMEOUT"]
    assert short[0].error.message == "attempt 1 ran longer than 300 ms"
    assert short[1] < long[1] and long[1] >= 1.2  # none ended before its own deadline
    assert in_time[0].state == S.JOB_STATE_SUCCEEDED


async def test_cancelling_a_queued_job_removes_it_from_its_queue(
    stack: Stack, client_for: Callable[[str], Client], redis: Redis, keys: Keys
) -> None:
    _, address = stack.start_gateway()
    client = client_for(address)
    job_id = (await client.submit("echo")).job.id
    reply = await client.stub.CancelJob(scheduler_pb2.CancelJobRequest(id=job_id))
    assert reply.job.state == S.JOB_STATE_CANCELLED
    assert await redis.zcard(keys.pending("default", "echo")) == 0
    stack.start_worker()
    assert (await client.wait_results([job_id]))[job_id].state == S.JOB_STATE_CANCELLED


async def test_cancelling_a_running_job_stops_it(client: Client) -> None:
    job_id = (await client.submit("sleep", {"seconds": 60})).job.id

    async def running() -> bool:
        job = (await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=job_id))).job
        return job.state == S.JOB_STATE_RUNNING

    await eventually(running, what="job running")
    await client.stub.CancelJob(scheduler_pb2.CancelJobRequest(id=job_id))
    event = (await client.wait_results([job_id], timeout=10))[job_id]
    assert event.state == S.JOB_STATE_CANCELLED and event.error.code == "CANCELLED"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.stub.CancelJob(scheduler_pb2.CancelJobRequest(id=job_id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_idempotency_key_returns_the_original_job_for_the_same_request(client: Client) -> None:
    first = (await client.submit("echo", {"a": 1}, idempotency_key="order-17")).job
    again = (await client.submit("echo", {"a": 1}, idempotency_key="order-17")).job
    assert again.id == first.id
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.submit("echo", {"a": 2}, idempotency_key="order-17")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "idempotency_key" in (err.value.details() or "")


async def test_a_batch_reusing_an_idempotency_key_differently_stores_none_of_its_jobs(
    client: Client, redis: Redis, keys: Keys
) -> None:
    original = (await client.submit("echo", {"v": 1}, idempotency_key="pay-1")).job
    before = int(await redis.get(keys.seq()) or 0)
    batch = [request("echo", {"v": 9}, idempotency_key="fresh-1"), request("echo", {"v": 2}, idempotency_key="pay-1")]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.stub.SubmitJobs(scheduler_pb2.SubmitJobsRequest(jobs=batch), timeout=10)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and original.id in (err.value.details() or "")
    assert int(await redis.get(keys.seq()) or 0) == before  # not even the first job was stored
    same = [request("echo", {"v": 1}, idempotency_key="pay-1"), request("echo", {"v": 3})]
    reply = await client.stub.SubmitJobs(scheduler_pb2.SubmitJobsRequest(jobs=same), timeout=10)
    assert reply.jobs[0].id == original.id and reply.jobs[1].id != original.id


async def test_run_job_repeated_with_its_idempotency_key_follows_the_original_job(client: Client) -> None:
    req = scheduler_pb2.RunJobRequest(job=request("echo", {"once": True}, idempotency_key="run-1"))
    first = [r.event async for r in client.stub.RunJob(req, timeout=20)]
    again = [r.event async for r in client.stub.RunJob(req, timeout=20)]
    assert first[-1].state == S.JOB_STATE_SUCCEEDED
    assert [(e.job_id, e.state) for e in again] == [(first[-1].job_id, S.JOB_STATE_SUCCEEDED)]
    assert value(again[0].result) == {"once": True}


async def test_a_job_whose_outcome_event_was_lost_still_ends_its_streams(
    stack: Stack, client_for: Callable[[str], Client], redis: Redis, keys: Keys
) -> None:
    """Pub/sub loses a message now and then. A stream following a job that ended without its event
    reaching the gateway (here: the outcome written into the job's hash, nothing published) gets
    the stored outcome from a quiet re-read; streams of jobs that have not ended stay open."""
    _, address, metrics_port = start_gateway(stack, env={"JOBGATE_RECONCILE_MS": "200"})
    client = client_for(address, metrics_port)
    held = scheduler_pb2.SubmitJobsRequest(jobs=[request("nobody.runs.this") for _ in range(2)])
    ended, waiting = [j.id for j in (await client.stub.SubmitJobs(held, timeout=10)).jobs]
    lost = client.stub.WatchResults(scheduler_pb2.WatchResultsRequest(job_ids=[ended]), timeout=30)
    run_on = client.stub.WatchResults(scheduler_pb2.WatchResultsRequest(job_ids=[waiting]), timeout=30)
    got = asyncio.ensure_future(anext(aiter(lost)))
    still = asyncio.ensure_future(anext(aiter(run_on)))
    try:
        await wait_streams_open(metrics_port, 2)
        await asyncio.sleep(0.5)  # quiet re-reads have found nothing ended
        assert not got.done() and not still.done()
        await redis.hset(keys.job(ended), mapping={"state": S.JOB_STATE_CANCELLED, "err_code": "CANCELLED"})
        event = (await asyncio.wait_for(got, timeout=10)).event
        assert (event.job_id, event.state) == (ended, S.JOB_STATE_CANCELLED)
        await asyncio.sleep(1)
        assert not still.done()  # its job has not ended: its stream goes on
    finally:
        still.cancel()
        lost.cancel()
        run_on.cancel()


async def command_calls(redis: Redis, *names: str) -> int:
    """How many times Redis has run the commands ``names`` (lower case), from INFO commandstats."""
    stats = await redis.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k.removeprefix("cmdstat_") in names)


async def script_calls(redis: Redis) -> int:
    return await command_calls(redis, "evalsha", "eval")


async def test_a_thousand_quiet_streams_reread_their_jobs_in_few_calls_and_submits_go_on(
    stack: Stack, client_for: Callable[[str], Client], redis: Redis
) -> None:
    _, address, metrics_port = start_gateway(stack, env={"JOBGATE_RECONCILE_MS": "200"})
    client = client_for(address, metrics_port)
    stack.start_worker()
    held = scheduler_pb2.SubmitJobsRequest(jobs=[request("nobody.runs.this") for _ in range(1000)])
    ids = [j.id for j in (await client.stub.SubmitJobs(held, timeout=10)).jobs]
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(12)]

    async def follow(i: int, job_id: str) -> None:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channels[i % len(channels)])
        async for _ in stub.WatchResults(scheduler_pb2.WatchResultsRequest(job_ids=[job_id])):
            pass

    streams = [asyncio.create_task(follow(i, j)) for i, j in enumerate(ids)]
    try:
        await wait_streams_open(metrics_port, len(ids), timeout=60)
        before = await script_calls(redis)
        await asyncio.sleep(3)  # each stream re-reads its job about 3 times meanwhile (0.2, 0.6, 1.4 s...)
        calls = await script_calls(redis) - before
        # one call per stream re-read would be about 3,000; together they take a few dozen
        assert calls < 300, calls
        job_id = (await client.submit("echo", {"still": "served"})).job.id
        done = await client.wait_results([job_id], timeout=20)
        assert done[job_id].state == job_pb2.JOB_STATE_SUCCEEDED
    finally:
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
        for channel in channels:
            await channel.close()
