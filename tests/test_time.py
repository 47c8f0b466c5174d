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
