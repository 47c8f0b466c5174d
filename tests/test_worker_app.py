"""The Python worker runtime with a user application loaded by ``--app module:attr``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from google.protobuf.duration_pb2 import Duration

from devtools.devstack import Stack
from jobgate.v1 import job_pb2, scheduler_pb2

from .helpers import Client, eventually, value

S = job_pb2


# The `client` fixture's worker runs the application of tests/apps.py.
pytestmark = pytest.mark.gateway(worker=("--app", "tests.apps:app", "--concurrency", "2"))


async def test_user_handlers_run_plain_functions_in_threads_and_coroutines_on_the_loop(client: Client) -> None:
    add = (await client.submit("add", {"numbers": [1, 2, 3.5]})).job.id
    shout = (await client.submit("shout", {"text": "hi"})).job.id
    rev = (await client.submit("reverse-bytes", payload=b"abc")).job.id
    events = await client.wait_results([add, shout, rev])
    assert value(events[add].result)["sum"] == 6.5
    assert value(events[add].result)["thread"].startswith("jobgate-handler")
    assert value(events[shout].result) == "HI (attempt 1, queue default)"
    assert events[rev].output == b"cba"


async def test_a_result_that_is_not_json_fails_with_a_clear_error(client: Client) -> None:
    job_id = (await client.submit("not-json")).job.id
    event = (await client.wait_results([job_id]))[job_id]
    assert event.state == S.JOB_STATE_FAILED and "not JSON-compatible" in event.error.message


async def test_a_handlers_exception_is_logged_with_its_traceback_job_kind_and_attempt(
    client: Client, stack: Stack
) -> None:
    job_id = (await client.submit("lookup", {"key": "missing-key"}, max_attempts=1)).job.id
    event = (await client.wait_results([job_id]))[job_id]
    assert event.error.code == "HANDLER_ERROR" and event.error.message == "KeyError: 'missing-key'"
    [worker] = stack.workers
    lines = await eventually(lambda: [ln for ln in worker.log().splitlines() if job_id in ln and "raised" in ln])
    assert "WARNING" in lines[0] and "kind=lookup attempt=1 handler raised KeyError: 'missing-key'" in lines[0]
    after = worker.log().split(lines[0], 1)[1]
    assert after.lstrip().startswith("Traceback (most recent call last):") and "in lookup" in after, after[:2000]


async def test_a_handlers_own_timeout_error_is_a_handler_error_not_the_jobs_timeout(client: Client) -> None:
    job_id = (await client.submit("own-timeout", max_attempts=1)).job.id
    event = (await client.wait_results([job_id]))[job_id]
    assert event.state == S.JOB_STATE_FAILED
    assert (event.error.code, event.error.message) == ("HANDLER_ERROR", "TimeoutError: upstream took too long")


async def test_kinds_the_app_does_not_register_wait_for_a_worker_that_does(client: Client, stack: Stack) -> None:
    job_id = (await client.submit("echo", {"waits": True})).job.id
    stack.start_worker()  # the default app, with the built-in echo
    event = (await client.wait_results([job_id]))[job_id]
    assert event.state == S.JOB_STATE_SUCCEEDED and value(event.result) == {"waits": True}


def test_worker_refuses_an_app_that_is_not_a_worker(stack: Stack) -> None:
    bad = stack.start_worker("--app", "tests.apps:add")
    assert bad.proc.wait(20) != 0
    assert "is not a worker.Worker" in bad.log()


async def test_a_thread_still_running_after_its_timeout_keeps_its_slot_until_it_returns(
    stack: Stack, client_for: Callable[[str], Client]
) -> None:
    _, address = stack.start_gateway()
    stack.start_worker("--app", "tests.apps:app", "--concurrency", "1", worker_id="single")
    client = client_for(address)
    blocked = (await client.submit("block", {"seconds": 2}, timeout=Duration(nanos=200_000_000))).job.id
    assert (await client.wait_results([blocked]))[blocked].error.code == "TIMEOUT"

    async def no_free_slot() -> bool:
        workers = (await client.stub.ListWorkers(scheduler_pb2.ListWorkersRequest())).workers
        return [w.slots for w in workers] == [0]

    await eventually(no_free_slot, what="the stuck thread's slot reported taken")
    after = (await client.submit("add", {"numbers": [1]})).job.id
    assert (await client.wait_results([after]))[after].state == S.JOB_STATE_SUCCEEDED
    jobs = {j: (await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=j))).job for j in (blocked, after)}
    assert jobs[after].started_at.ToMilliseconds() >= jobs[blocked].started_at.ToMilliseconds() + 2000
