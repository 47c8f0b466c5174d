"""Time and failure end to end: retries with backoff, failures for good, delayed jobs, and the
history of every attempt, against a real gateway, real workers and a real Redis."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from redis.asyncio import Redis

from devtools.devstack import Stack
from jobgate.v1 import job_pb2, scheduler_pb2
from protocol.connection import now_ms
from protocol.keys import Keys

from .helpers import Client, request, status_of, value

S = job_pb2
QUICK = job_pb2.RetryPolicy(initial_backoff=Duration(nanos=200_000_000), multiplier=2)


async def run(client: Client, req: scheduler_pb2.SubmitJobRequest, timeout: float = 30) -> list[job_pb2.JobEvent]:
    """Every event of one RunJob call, to its end."""
    call = client.stub.RunJob(scheduler_pb2.RunJobRequest(job=req), timeout=timeout)
    return [r.event async for r in call]


async def get(client: Client, job_id: str) -> job_pb2.Job:
    return (await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=job_id), timeout=5)).job


async def test_a_failing_job_is_retried_after_a_growing_backoff_until_its_attempts_are_spent(client: Client) -> None:
    events = await run(client, request("fail", {"message": "boom"}, max_attempts=3, retry=QUICK))
    states = [e.state for e in events]
    assert states[-1] == S.JOB_STATE_FAILED and events[-1].attempt == 3  # RunJob ends at the final outcome
    assert S.JOB_STATE_FAILED not in states[:-1]
    waits = [e for e in events if e.state == S.JOB_STATE_SCHEDULED]
    assert [(e.attempt, e.error.code) for e in waits] == [(1, "HANDLER_ERROR"), (2, "HANDLER_ERROR")]
    first, second = (e.due_at.ToMilliseconds() - e.time.ToMilliseconds() for e in waits)
    assert 100 <= first <= 200 and 200 <= second <= 400  # 200 ms, then 400 ms, less up to half
    requeued = [i for i, s in enumerate(states) if s == S.JOB_STATE_QUEUED]
    assert len(requeued) == 3  # submitted, then after each backoff

    job = await get(client, events[0].job_id)
    assert (job.state, job.attempt, job.error.code) == (S.JOB_STATE_FAILED, 3, "HANDLER_ERROR")
    assert [(a.attempt, a.state, a.error.code) for a in job.attempts] == [
        (n, S.JOB_STATE_FAILED, "HANDLER_ERROR") for n in (1, 2, 3)
    ]
    for a in job.attempts:
        assert a.worker_id and "boom" in a.error.message
        assert 0 < a.started_at.ToMilliseconds() <= a.finished_at.ToMilliseconds()


async def test_a_job_that_fails_then_succeeds_keeps_the_failed_attempt_in_its_history(client: Client) -> None:
    events = await run(client, request("flaky", {"succeed_at": 2}, retry=QUICK))
    assert (events[-1].state, events[-1].attempt, value(events[-1].result)) == (
        S.JOB_STATE_SUCCEEDED,
        2,
        {"attempt": 2},
    )
    job = await get(client, events[-1].job_id)
    assert [(a.attempt, a.state) for a in job.attempts] == [(1, S.JOB_STATE_FAILED), (2, S.JOB_STATE_SUCCEEDED)]
    assert not job.HasField("error") and not job.HasField("due_at")


async def test_a_handler_that_raises_fatal_fails_for_good_at_once(client: Client) -> None:
    events = await run(client, request("fail", {"fatal": True, "message": "bad input"}, max_attempts=5))
    assert [e.state for e in events if e.state == S.JOB_STATE_SCHEDULED] == []
    last = events[-1]
    assert (last.state, last.attempt, last.error.code, last.error.message) == (
        S.JOB_STATE_FAILED,
        1,
        "FATAL",
        "bad input",
    )


async def test_a_timeout_is_retried_like_a_failure(client: Client) -> None:
    req = request("sleep", {"seconds": 30}, timeout=Duration(nanos=200_000_000), max_attempts=2, retry=QUICK)
    events = await run(client, req)
    assert [e.error.code for e in events if e.state == S.JOB_STATE_SCHEDULED] == ["TIMEOUT"]
    assert (events[-1].state, events[-1].attempt, events[-1].error.code) == (S.JOB_STATE_FAILED, 2, "TIMEOUT")


async def test_a_delayed_job_waits_scheduled_and_runs_once_due(client: Client, redis: Redis, keys: Keys) -> None:
    before = now_ms()
    reply = await client.submit("echo", {"x": 1}, delay=Duration(seconds=1, nanos=200_000_000))
    job = reply.job
    assert job.state == S.JOB_STATE_SCHEDULED and job.due_at.ToMilliseconds() >= before + 1200
    assert (await get(client, job.id)).state == S.JOB_STATE_SCHEDULED
    assert await redis.zscore(keys.delayed(), job.id) == job.due_at.ToMilliseconds()
    event = (await client.wait_results([job.id], timeout=20))[job.id]
    assert event.state == S.JOB_STATE_SUCCEEDED
    stored = await get(client, job.id)
    assert stored.started_at.ToMilliseconds() >= job.due_at.ToMilliseconds()
    assert await redis.zscore(keys.delayed(), job.id) is None

    past = Timestamp()
    past.FromMilliseconds(now_ms() - 60_000)
    at_once = (await client.submit("echo", {"x": 2}, run_at=past)).job
    assert at_once.state == S.JOB_STATE_QUEUED and not at_once.HasField("due_at")
    assert (await client.wait_results([at_once.id], timeout=20))[at_once.id].state == S.JOB_STATE_SUCCEEDED


async def test_cancelling_a_delayed_job_ends_it_before_it_ever_runs(client: Client, redis: Redis, keys: Keys) -> None:
    job = (await client.submit("echo", {}, delay=Duration(seconds=60))).job
    reply = await client.stub.CancelJob(scheduler_pb2.CancelJobRequest(id=job.id), timeout=5)
    assert reply.job.state == S.JOB_STATE_CANCELLED
    assert await redis.zscore(keys.delayed(), job.id) is None
    assert (await get(client, job.id)).attempt == 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"run_at": Timestamp(seconds=now_ms() // 1000 + 10), "delay": Duration(seconds=1)},
            "run_at: give run_at or delay",
        ),
        ({"run_at": Timestamp(seconds=now_ms() // 1000 + 400 * 86400)}, "run_at: must be at most 365 days ahead"),
        ({"run_at": Timestamp(seconds=-5)}, "run_at: must be a time after 1970"),
        ({"delay": Duration(seconds=-1)}, "delay: must not be negative"),
        ({"delay": Duration(seconds=366 * 86400)}, "delay: must be at most 365 days"),
        (
            {"retry": job_pb2.RetryPolicy(initial_backoff=Duration(seconds=10), max_backoff=Duration(seconds=5))},
            "retry.max_backoff: must not be below initial_backoff",
        ),
        ({"retry": job_pb2.RetryPolicy(multiplier=0.5)}, "retry.multiplier: must be between 1 and 100"),
        ({"retry": job_pb2.RetryPolicy(initial_backoff=Duration(seconds=2 * 86400))}, "retry.initial_backoff"),
    ],
)
async def test_bad_time_fields_are_refused_naming_the_field_and_store_nothing(
    client: Client, redis: Redis, keys: Keys, fields: dict[str, Any], message: str
) -> None:
    before = await redis.get(keys.seq())
    code, details = await status_of(client.stub.SubmitJob(request("echo", **fields), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, details
    assert await redis.get(keys.seq()) == before


async def test_a_delayed_job_is_queued_by_whichever_gateway_is_alive(
    stack: Stack, client_for: Callable[[str], Client]
) -> None:
    accepting, address = stack.start_gateway()
    _, other = stack.start_gateway()
    stack.start_worker()
    job = (await client_for(address).submit("echo", {"y": 1}, delay=Duration(nanos=800_000_000))).job
    accepting.signal(signal.SIGKILL)
    survivor = client_for(other)
    event = (await survivor.wait_results([job.id], timeout=20))[job.id]
    assert event.state == S.JOB_STATE_SUCCEEDED


async def fail_now(client: Client, message: str, queue: str = "default") -> str:
    """Runs a job that fails for good at its first attempt; returns its id."""
    events = await run(client, request("fail", {"fatal": True, "message": message}, queue=queue))
    assert events[-1].state == S.JOB_STATE_FAILED
    return events[-1].job_id


@pytest.mark.gateway(worker=("--queues", "default,dl"))
async def test_failed_jobs_are_listed_newest_first_page_by_page_while_jobs_come_and_go(
    client: Client, redis: Redis, keys: Keys
) -> None:
    ids = [await fail_now(client, f"dead {i}", queue="dl") for i in range(5)]
    ok = await run(client, request("echo", {}, queue="dl"))
    assert ok[-1].state == S.JOB_STATE_SUCCEEDED  # succeeded jobs are no dead letters

    async def page(size: int, token: str = "") -> scheduler_pb2.ListFailedJobsResponse:
        req = scheduler_pb2.ListFailedJobsRequest(queue="dl", page_size=size, page_token=token)
        return await client.stub.ListFailedJobs(req, timeout=5)

    first = await page(2)
    assert [j.id for j in first.jobs] == ids[::-1][:2] and first.next_page_token
    assert first.jobs[0].error.message == "dead 4" and len(first.jobs[0].attempts) == 1
    newer = await fail_now(client, "after the first page", queue="dl")  # does not shift the pages that follow
    await client.stub.RetryJob(scheduler_pb2.RetryJobRequest(id=ids[2]), timeout=5)  # leaves the listing...
    second = await page(2, first.next_page_token)
    assert [j.id for j in second.jobs] == [ids[1], ids[0]] and not second.next_page_token
    assert (await client.wait_results([ids[2]], timeout=20))[ids[2]].state == S.JOB_STATE_FAILED
    everything = [j.id for j in (await page(0)).jobs]  # ...and comes back on top when it fails again
    assert everything == [ids[2], newer, ids[4], ids[3], ids[1], ids[0]]
    assert (await client.stub.ListFailedJobs(scheduler_pb2.ListFailedJobsRequest(queue="other"), timeout=5)).jobs == []

    # a dead letter is kept for dead_retention_s (7 days by default), a finished job for retention_s
    assert 86_400 < await redis.ttl(keys.job(ids[0])) <= 604_800
    assert 0 < await redis.ttl(keys.job(ok[-1].job_id)) <= 86_400


async def test_retrying_a_failed_job_runs_it_again_with_fresh_attempts_and_its_history_kept(
    client: Client, redis: Redis, keys: Keys
) -> None:
    events = await run(client, request("flaky", {"succeed_at": 3}, max_attempts=2, retry=QUICK))
    assert (events[-1].state, events[-1].attempt) == (S.JOB_STATE_FAILED, 2)
    jid = events[-1].job_id
    watch = client.stub.WatchResults(scheduler_pb2.WatchResultsRequest(job_ids=[jid]), timeout=5)
    assert [r.event.state async for r in watch] == [S.JOB_STATE_FAILED]  # finished: replayed at once

    retried = (await client.stub.RetryJob(scheduler_pb2.RetryJobRequest(id=jid), timeout=5)).job
    assert retried.state in (S.JOB_STATE_QUEUED, S.JOB_STATE_DISPATCHED, S.JOB_STATE_RUNNING, S.JOB_STATE_SUCCEEDED)
    assert await redis.ttl(keys.job(jid)) in (-1, *range(1, 86_401))  # no longer expiring as a dead letter
    event = (await client.wait_results([jid], timeout=20))[jid]
    assert (event.state, event.attempt, value(event.result)) == (S.JOB_STATE_SUCCEEDED, 3, {"attempt": 3})
    job = await get(client, jid)
    assert [(a.attempt, a.state) for a in job.attempts] == [
        (1, S.JOB_STATE_FAILED),
        (2, S.JOB_STATE_FAILED),
        (3, S.JOB_STATE_SUCCEEDED),
    ]
    assert not job.HasField("error") and job.finished_at.ToMilliseconds() >= job.started_at.ToMilliseconds()

    # a second retry of a job failing for good: its allowance (max_attempts 2) starts afresh each time
    again = await run(client, request("fail", {"message": "x"}, max_attempts=2, retry=QUICK))
    jid = again[-1].job_id
    await client.stub.RetryJob(scheduler_pb2.RetryJobRequest(id=jid), timeout=5)
    assert (await client.wait_results([jid], timeout=20))[jid].attempt == 4
    await client.stub.RetryJob(scheduler_pb2.RetryJobRequest(id=jid), timeout=5)
    final = (await client.wait_results([jid], timeout=20))[jid]
    assert (final.state, final.attempt) == (S.JOB_STATE_FAILED, 6)
    assert len((await get(client, jid)).attempts) == 6


async def test_retrying_a_cancelled_job_queues_it_again(client: Client) -> None:
    job = (await client.submit("echo", {"z": 1}, delay=Duration(seconds=60))).job
    await client.stub.CancelJob(scheduler_pb2.CancelJobRequest(id=job.id), timeout=5)
    await client.stub.RetryJob(scheduler_pb2.RetryJobRequest(id=job.id), timeout=5)
    event = (await client.wait_results([job.id], timeout=20))[job.id]
    assert (event.state, value(event.result)) == (S.JOB_STATE_SUCCEEDED, {"z": 1})


async def test_retrying_a_job_that_has_not_failed_is_refused_and_changes_nothing(
    client: Client, redis: Redis, keys: Keys
) -> None:
    waiting = (await client.submit("echo", {}, delay=Duration(seconds=60))).job
    done = (await run(client, request("echo", {})))[-1].job_id
    for jid, state in ((waiting.id, "SCHEDULED"), (done, "SUCCEEDED")):
        before = await redis.hgetall(keys.job(jid))
        code, details = await status_of(client.stub.RetryJob(scheduler_pb2.RetryJobRequest(id=jid), timeout=5))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and state in details, details
        assert await redis.hgetall(keys.job(jid)) == before
    code, _ = await status_of(client.stub.RetryJob(scheduler_pb2.RetryJobRequest(id="0" * 32), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND
    for req, message in (
        (scheduler_pb2.ListFailedJobsRequest(page_size=1001), "page_size"),
        (scheduler_pb2.ListFailedJobsRequest(page_token="nonsense"), "page_token"),
        (scheduler_pb2.ListFailedJobsRequest(queue="bad queue"), "queue"),
    ):
        code, details = await status_of(client.stub.ListFailedJobs(req, timeout=5))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, details


@pytest.mark.gateway(
    env={"JOBGATE_QUEUE_SETTINGS": "strict max_attempts=1 dead_retention_s=90000; patient max_attempts=4"},
    worker=("--queues", "default,strict,patient", "--concurrency", "4"),
)
async def test_queue_settings_give_each_queue_its_own_defaults(client: Client, redis: Redis, keys: Keys) -> None:
    strict = await run(client, request("fail", {"message": "once"}, queue="strict", retry=QUICK))
    assert (strict[-1].state, strict[-1].attempt) == (S.JOB_STATE_FAILED, 1)
    assert 86_400 < await redis.ttl(keys.job(strict[-1].job_id)) <= 90_000
    patient = await run(client, request("fail", {"message": "often"}, queue="patient", retry=QUICK))
    assert patient[-1].attempt == 4
    default = await run(client, request("fail", {"message": "thrice"}, retry=QUICK))
    assert default[-1].attempt == 3
    told = await run(client, request("fail", {"message": "told"}, queue="strict", max_attempts=2, retry=QUICK))
    assert told[-1].attempt == 2  # the request's own value wins


async def test_progress_reaches_runjob_watchers_and_getjob_at_a_bounded_rate(client: Client) -> None:
    # 20,000 reports in about 1.5 s: the worker writes the latest every progress_interval_ms (500 ms)
    events = await run(client, request("count", {"steps": 20_000, "seconds": 1.5}))
    assert events[-1].state == S.JOB_STATE_SUCCEEDED
    reports = [e for e in events if e.HasField("progress")]
    assert all(e.state == S.JOB_STATE_RUNNING for e in reports)
    assert 1 <= len(reports) <= 6, len(reports)  # about 1.5 s / 0.5 s, not 20,000
    fractions = [e.progress.fraction for e in reports]
    assert fractions == sorted(fractions) and all(0 < f <= 1 for f in fractions)
    assert reports[0].progress.message.startswith("step ") and reports[0].progress.time.seconds > 0
    job = await get(client, events[-1].job_id)
    assert job.progress == reports[-1].progress  # the latest report stays with the finished job


async def test_watch_results_streams_progress_only_when_asked(client: Client) -> None:
    job = (await client.submit("count", {"steps": 40, "seconds": 1.2})).job
    with_progress = client.stub.WatchResults(
        scheduler_pb2.WatchResultsRequest(job_ids=[job.id], include_progress=True), timeout=20
    )
    without = client.stub.WatchResults(scheduler_pb2.WatchResultsRequest(job_ids=[job.id]), timeout=20)
    seen = [r.event async for r in with_progress]
    assert [e.state for e in seen][-1] == S.JOB_STATE_SUCCEEDED and len(seen) >= 2
    assert all(e.HasField("progress") for e in seen[:-1])
    assert [r.event.state async for r in without] == [S.JOB_STATE_SUCCEEDED]


async def test_a_job_waiting_for_its_next_attempt_has_no_progress_left_from_the_failed_one(client: Client) -> None:
    req = request(
        "count",
        {"steps": 10, "seconds": 1.2, "fail": True},
        max_attempts=2,
        retry=job_pb2.RetryPolicy(initial_backoff=Duration(seconds=3)),
    )
    call = client.stub.RunJob(scheduler_pb2.RunJobRequest(job=req), timeout=30)
    seen = []
    async for r in call:
        seen.append(r.event)
        if r.event.state == S.JOB_STATE_SCHEDULED:
            job = await get(client, r.event.job_id)
            assert job.state == S.JOB_STATE_SCHEDULED and not job.HasField("progress")
    assert any(e.HasField("progress") and e.attempt == 1 for e in seen)
    assert any(e.HasField("progress") and e.attempt == 2 for e in seen)
    assert seen[-1].state == S.JOB_STATE_FAILED
