"""The Python client (jobgate_client) against real gateways, workers and Redis."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest
from google.protobuf import json_format, struct_pb2

from devtools.devstack import Stack
from jobgate_client import (
    Client,
    FailedPrecondition,
    InvalidArgument,
    JobState,
    NotFound,
    SyncClient,
    Unauthenticated,
    job_request,
)
from jobgate_client.models import to_python, to_value

from .helpers import start_gateway
from .processes import scrape


@pytest.fixture
async def jobs(stack: Stack) -> AsyncIterator[tuple[Client, int]]:
    """A gateway (serving metrics), a worker, and a Client of the gateway; and the metrics port."""
    _, address, port = start_gateway(stack)
    stack.start_worker("--concurrency", "4")
    async with Client(address) as client:
        yield client, port


def rpc_calls(port: int, method: str) -> float:
    return sum(
        v
        for (name, labels), v in scrape(port).items()
        if name == "jobgate_gateway_rpcs_total" and ("method", method) in labels
    )


async def test_the_client_speaks_in_python_values_enums_and_exceptions(jobs: tuple[Client, int]) -> None:
    client, _ = jobs
    job = await client.submit("echo", {"hello": ["world", 1, True, None]}, priority=5)
    assert job.state is JobState.QUEUED and job.args == {"hello": ["world", 1, True, None]} and job.priority == 5
    done = await client.wait([job.id])
    assert done[job.id].state is JobState.SUCCEEDED and done[job.id].result == {"hello": ["world", 1, True, None]}
    assert type(done[job.id].result["hello"][1]) is int  # a whole JSON number comes back an int
    got = await client.get(job.id)
    assert got.state is JobState.SUCCEEDED and str(got.state) == "SUCCEEDED" and got.finished_at is not None
    assert [a.state for a in got.attempts] == [JobState.SUCCEEDED] and got.idempotency_key.startswith("client-")

    events = [e async for e in client.run("fail", {"message": "no luck"}, max_attempts=1)]
    assert events[0].state is JobState.QUEUED and events[-1].state is JobState.FAILED
    assert events[-1].error is not None and events[-1].error.code == "HANDLER_ERROR"
    retried = await client.retry_job(events[-1].job_id)
    assert retried.state in (JobState.QUEUED, JobState.DISPATCHED, JobState.RUNNING, JobState.FAILED)

    with pytest.raises(InvalidArgument) as bad:
        await client.submit("has space")
    assert bad.value.details.startswith("kind:")
    with pytest.raises(NotFound):
        await client.get("0" * 32)
    with pytest.raises(FailedPrecondition):
        await client.cancel(job.id)  # it has finished

    assert await client.pause("held") is False and await client.pause("held") is True
    waiting = await client.submit("echo", queue="held")
    [stats] = await client.queue_stats(["held"])
    assert stats.paused and stats.waiting == 1 and stats.workers == 0
    page = await client.list_jobs("held", states=[JobState.QUEUED])
    assert [j.id for j in page.jobs] == [waiting.id]
    assert (await client.get(waiting.id)).waiting_reason.startswith("queue 'held' is paused")
    assert (await client.cancel(waiting.id)).state is JobState.CANCELLED
    assert [j.id async for j in client.iter_jobs("default", states=[JobState.SUCCEEDED])] == [job.id]
    assert [w.slots for w in await client.workers()] == [4]


async def test_concurrent_submits_go_out_together_and_each_gets_its_own_answer(jobs: tuple[Client, int]) -> None:
    client, port = jobs
    before = rpc_calls(port, "SubmitJob") + rpc_calls(port, "SubmitJobs")
    submitted = await asyncio.gather(*(client.submit("echo", {"i": i}) for i in range(300)))
    assert [j.args for j in submitted] == [{"i": i} for i in range(300)]
    calls = rpc_calls(port, "SubmitJob") + rpc_calls(port, "SubmitJobs") - before
    assert calls < 30, calls  # far fewer calls than jobs
    done = await client.wait([j.id for j in submitted])
    assert {e.state for e in done.values()} == {JobState.SUCCEEDED}

    mixed = await asyncio.gather(
        *(client.submit("echo" if i != 3 else "bad kind", {"i": i}) for i in range(8)), return_exceptions=True
    )
    assert isinstance(mixed[3], InvalidArgument) and mixed[3].details.startswith("kind:")
    assert all(not isinstance(m, Exception) and m.args == {"i": i} for i, m in enumerate(mixed) if i != 3)


async def test_submitted_jobs_come_back_with_their_inputs_and_a_finished_repeat_with_its_result(
    jobs: tuple[Client, int],
) -> None:
    """The client asks SubmitJobs for JOB_VIEW_BASIC (a large payload does not travel back) and
    gives each job the inputs it sent; a repeat of an idempotency key whose job has finished comes
    back whole, result included."""
    client, _ = jobs
    first = await client.submit_many([job_request("echo", {"n": 1}, payload=b"x" * 200_000, idempotency_key="k1")])
    assert [(j.args, len(j.payload), j.state) for j in first] == [({"n": 1}, 200_000, JobState.QUEUED)]
    together = await asyncio.gather(*(client.submit("echo", {"n": n}, payload=b"y" * n) for n in range(20)))
    assert [(j.args, j.payload) for j in together] == [({"n": n}, b"y" * n) for n in range(20)]
    await client.wait([first[0].id])
    again = await client.submit_many(
        [job_request("echo", {"n": 1}, payload=b"x" * 200_000, idempotency_key="k1"), job_request("echo", [2])]
    )
    assert again[0].id == first[0].id and again[0].state is JobState.SUCCEEDED and again[0].result == {"n": 1}
    assert again[0].payload == b"x" * 200_000 and again[1].args == [2] and again[1].id != first[0].id


async def test_run_and_watch_go_on_through_a_gateway_killed_mid_stream(stack: Stack) -> None:
    first, a = stack.start_gateway()
    _, b = stack.start_gateway()
    stack.start_worker("--concurrency", "8")
    async with Client([a, b]) as client:
        ids = [(await client.submit("sleep", {"seconds": 1.5})).id for _ in range(5)]
        watched: list[str] = []

        async def watch() -> None:
            async for event in client.watch(ids):
                watched.append(event.job_id)

        watching = asyncio.ensure_future(watch())
        events = []
        async for event in client.run("sleep", {"seconds": 2}):
            events.append(event)
            if event.state is JobState.RUNNING and first.alive():
                first.kill()  # both streams were on it
        await asyncio.wait_for(watching, timeout=30)
    assert sorted(watched) == sorted(ids)  # every outcome, once
    assert events[-1].state is JobState.SUCCEEDED and [e.state for e in events].count(JobState.SUCCEEDED) == 1
    assert not first.alive() and client.target == b


def test_the_sync_client_blocks_and_iterates(stack: Stack) -> None:
    _, address = stack.start_gateway()
    stack.start_worker()
    results: list[object] = []

    def use() -> None:  # from a plain thread, as code without an event loop would
        with SyncClient(address) as client:
            job = client.submit("echo", {"n": 1})
            results.append([e.state for e in client.run("echo", {"n": 2})][-1])
            results.append(client.wait([job.id])[job.id].result)
            jobs = client.submit_many([job_request("echo", {"n": n}) for n in range(3)])
            results.append(len(jobs))

    thread = threading.Thread(target=use)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive() and results == [JobState.SUCCEEDED, {"n": 1}, 3]


async def test_the_client_sends_its_token(stack: Stack) -> None:
    _, address = stack.start_gateway(env={"JOBGATE_AUTH_TOKENS": "admin s3cret-token-1234 *"})
    async with Client(address, token="s3cret-token-1234") as client:
        assert (await client.submit("echo")).state is JobState.QUEUED
    async with Client(address) as anonymous:
        with pytest.raises(Unauthenticated):
            await anonymous.submit("echo")


@pytest.mark.parametrize(
    "args",
    [None, True, 0, -1.5, 2**60, "é", [], {}, [1, "a", None, [{}]], {"a": {"b": [True, 2.5]}}, (1, 2), {1: 2}, {1, 2},
     2**1100, float("inf")],
)  # fmt: skip
def test_args_become_the_value_json_format_makes_of_them_and_come_back_as_json(args: object) -> None:
    """The client's own conversion of args (no json_format per field) builds what json_format would,
    or fails as it does; values come back as json.loads would give them (whole numbers as ints)."""
    expected, wanted_error = struct_pb2.Value(), None
    try:
        json_format.ParseDict(args, expected)
    except Exception as exc:  # noqa: BLE001 - the error the client must raise too
        wanted_error = type(exc)
    got = struct_pb2.Value()
    if wanted_error is not None:
        with pytest.raises(wanted_error):
            to_value(args, got)
        return
    to_value(args, got)
    assert got == expected
    plain = json_format.MessageToDict(expected) if expected.WhichOneof("kind") != "number_value" else None
    if plain is not None and not isinstance(args, tuple):
        assert to_python(got) == args
