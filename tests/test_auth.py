"""Bearer-token authentication and per-queue authorisation, against real gateway processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis

from devtools.devstack import Stack
from gateway.healthcheck import health_status
from jobgate.v1 import job_pb2, scheduler_pb2

from .helpers import Client, code_of, eventually, request
from .processes import logged

ADMIN = "adm1n-7c0f2b9e4d51a8e3"
BILLING = "b1ll-93e7a1c4f8d20b6a5"
TOKENS = f"admin {ADMIN} *; billing {BILLING} invoices,refunds"


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def stored_keys(redis: Redis, namespace: str) -> list[bytes]:
    return sorted([k async for k in redis.scan_iter(match=f"{{{namespace}}}:*")])


async def test_calls_without_a_valid_token_are_refused_and_store_nothing(
    stack: Stack, client_for: Callable[[str], Client], redis: Redis, namespace: str
) -> None:
    gateway, address = stack.start_gateway(env={"JOBGATE_AUTH_TOKENS": TOKENS})
    stub = client_for(address).stub
    before = await stored_keys(redis, namespace)
    some_id = "0" * 32
    for metadata in ([], bearer("not-a-known-token-at-all"), [("authorization", f"Basic {ADMIN}")], bearer("")):
        calls = [
            stub.SubmitJob(request("echo"), metadata=metadata, timeout=5),
            stub.SubmitJobs(scheduler_pb2.SubmitJobsRequest(jobs=[request("echo")]), metadata=metadata, timeout=5),
            stub.RunJob(scheduler_pb2.RunJobRequest(job=request("echo")), metadata=metadata, timeout=5),
            stub.WatchResults(scheduler_pb2.WatchResultsRequest(), metadata=metadata, timeout=5),
            stub.GetJob(scheduler_pb2.GetJobRequest(id=some_id), metadata=metadata, timeout=5),
            stub.CancelJob(scheduler_pb2.CancelJobRequest(id=some_id), metadata=metadata, timeout=5),
            stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), metadata=metadata, timeout=5),
        ]
        assert [await code_of(c) for c in calls] == [grpc.StatusCode.UNAUTHENTICATED] * len(calls)
    assert await stored_keys(redis, namespace) == before
    # Health checks stay open for orchestrators; watching health (a stream) needs a token.
    assert health_status(address) == 1  # SERVING
    health = health_pb2_grpc.HealthStub(client_for(address).channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert await code_of(watch) == grpc.StatusCode.UNAUTHENTICATED
    authed = health.Watch(health_pb2.HealthCheckRequest(service=""), metadata=bearer(ADMIN), timeout=5)
    assert (await authed.read()).status == health_pb2.HealthCheckResponse.SERVING
    authed.cancel()
    reply = await stub.SubmitJob(request("echo"), metadata=bearer(ADMIN), timeout=5)
    assert reply.job.id
    # The gateway never writes a token to its log, not even in its settings line.
    log = gateway.log()
    assert "admin" in log and ADMIN not in log and BILLING not in log


async def test_a_token_limited_to_queues_cannot_touch_other_queues(
    stack: Stack, client_for: Callable[[str], Client], redis: Redis, namespace: str
) -> None:
    _, address = stack.start_gateway(env={"JOBGATE_AUTH_TOKENS": TOKENS})
    stack.start_worker("--queues", "invoices,payroll", worker_id="both")
    stack.start_worker("--queues", "payroll", worker_id="payroll-only")
    stub = client_for(address).stub
    admin, billing = bearer(ADMIN), bearer(BILLING)

    async def listed(metadata: list[tuple[str, str]]) -> list[str]:
        return [w.id for w in (await stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), metadata=metadata)).workers]

    assert await eventually(lambda: _eq(listed(admin), ["both", "payroll-only"]), what="both workers live")
    assert await listed(billing) == ["both"]  # only workers serving its queues
    [both] = (await stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), metadata=billing)).workers
    assert list(both.queues) == ["invoices"]  # and only its own queues' names

    payroll = (await stub.SubmitJob(request("sleep", {"seconds": 30}, queue="payroll"), metadata=admin)).job.id

    async def running() -> bool:
        job = (await stub.GetJob(scheduler_pb2.GetJobRequest(id=payroll), metadata=admin)).job
        return job.state == job_pb2.JOB_STATE_RUNNING

    await eventually(running, what="the payroll job running")
    before = await stored_keys(redis, namespace)
    denied = [
        stub.SubmitJob(request("echo", queue="payroll"), metadata=billing, timeout=5),
        stub.SubmitJob(request("echo"), metadata=billing, timeout=5),  # the default queue is a queue too
        stub.SubmitJobs(
            scheduler_pb2.SubmitJobsRequest(jobs=[request("echo", queue="invoices"), request("echo", queue="payroll")]),
            metadata=billing,
            timeout=5,
        ),
        stub.RunJob(scheduler_pb2.RunJobRequest(job=request("echo", queue="payroll")), metadata=billing, timeout=5),
        stub.GetJob(scheduler_pb2.GetJobRequest(id=payroll), metadata=billing, timeout=5),
        stub.CancelJob(scheduler_pb2.CancelJobRequest(id=payroll), metadata=billing, timeout=5),
        stub.WatchResults(scheduler_pb2.WatchResultsRequest(queue="payroll"), metadata=billing, timeout=5),
        stub.WatchResults(scheduler_pb2.WatchResultsRequest(job_ids=[payroll]), metadata=billing, timeout=5),
        stub.ListJobs(scheduler_pb2.ListJobsRequest(queue="payroll"), metadata=billing, timeout=5),
        stub.GetQueueStats(scheduler_pb2.GetQueueStatsRequest(queues=["invoices", "payroll"]), metadata=billing),
    ]
    assert [await code_of(c) for c in denied] == [grpc.StatusCode.PERMISSION_DENIED] * len(denied)
    # nothing stored (the gateway's own passes may meanwhile forget a set emptied before: the queues
    # that hold waiting jobs, once the payroll job has left its queue)
    assert set(await stored_keys(redis, namespace)) <= set(before)
    assert await running()  # nothing cancelled
    every = await stub.GetQueueStats(scheduler_pb2.GetQueueStatsRequest(), metadata=billing, timeout=5)
    assert [q.queue for q in every.queues] == []  # payroll is known, and not its to see
    listed = await stub.ListJobs(scheduler_pb2.ListJobsRequest(queue="payroll"), metadata=admin, timeout=5)
    assert [j.id for j in listed.jobs] == [payroll]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SubmitJobs(
            scheduler_pb2.SubmitJobsRequest(jobs=[request("echo", queue="invoices"), request("echo", queue="payroll")]),
            metadata=billing,
            timeout=5,
        )
    assert (err.value.details() or "").startswith("jobs[1].queue:") and BILLING not in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetJob(scheduler_pb2.GetJobRequest(id=payroll), metadata=billing, timeout=5)
    assert (err.value.details() or "").startswith("id:") and "payroll" not in (err.value.details() or "")

    # An unfiltered watch by the limited token sees its own queues' outcomes only.
    watch = stub.WatchResults(scheduler_pb2.WatchResultsRequest(), metadata=billing, timeout=60)
    seen: asyncio.Queue[str] = asyncio.Queue()

    async def reader() -> None:
        async for resp in watch:
            seen.put_nowait(resp.event.job_id)

    reading = asyncio.create_task(reader())
    probes: set[str] = set()

    async def watching() -> bool:  # open once it carries a job of its queue; probe until it does
        probes.add((await stub.SubmitJob(request("echo", queue="invoices"), metadata=billing)).job.id)
        try:
            return await asyncio.wait_for(seen.get(), timeout=1) in probes
        except TimeoutError:
            return False

    assert await eventually(watching, what="the watch stream open")
    await _results(client_for(address), sorted(probes))  # every probe is over
    other = (await stub.SubmitJob(request("echo", {"n": 1}, queue="payroll"), metadata=admin)).job.id
    done = await _results(client_for(address), [other])  # the other queue's job is over first
    assert done[other].state == job_pb2.JOB_STATE_SUCCEEDED
    own = (await stub.SubmitJob(request("echo", {"n": 2}, queue="invoices"), metadata=billing)).job.id
    while (job_id := await asyncio.wait_for(seen.get(), timeout=10)) != own:
        assert job_id in probes, f"the stream carried {job_id}, not of its queue"
    watch.cancel()
    await asyncio.gather(reading, return_exceptions=True)

    # Idempotency keys are per queue: the same key in another queue names another job, and says
    # nothing about the first.
    key = "order-17"
    mine = (await stub.SubmitJob(request("echo", queue="invoices", idempotency_key=key), metadata=billing)).job
    theirs = (await stub.SubmitJob(request("echo", queue="payroll", idempotency_key=key), metadata=admin)).job
    assert mine.id != theirs.id


async def _eq(awaitable: object, expected: object) -> bool:
    return bool(await awaitable == expected)  # type: ignore[misc]


async def _results(client: Client, ids: list[str]) -> dict[str, job_pb2.JobEvent]:
    events = {}
    call = client.stub.WatchResults(scheduler_pb2.WatchResultsRequest(job_ids=ids), metadata=bearer(ADMIN), timeout=30)
    async for resp in call:
        events[resp.event.job_id] = resp.event
    return events


async def test_tokens_from_a_file_and_the_environment_both_work(
    stack: Stack, client_for: Callable[[str], Client], tmp_path: Path
) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(
        f"# operators\nops  {'f' * 40}  *\n\nreports {'r' * 24} reports  # read-only dashboards\n"
        "hashed  s3cr3t#with;marks-0042\n"  # '#' and ';' inside a token in a file are part of it
    )
    _, address = stack.start_gateway(
        env={"JOBGATE_AUTH_TOKENS_FILE": str(token_file), "JOBGATE_AUTH_TOKENS": f"ci {'c' * 20}"}
    )
    stub = client_for(address).stub
    tokens = (("f" * 40, "default"), ("r" * 24, "reports"), ("c" * 20, "anything"), ("s3cr3t#with;marks-0042", "x"))
    for token, queue in tokens:
        assert (await stub.SubmitJob(request("echo", queue=queue), metadata=bearer(token), timeout=5)).job.id
    assert await code_of(stub.SubmitJob(request("echo"), metadata=bearer("r" * 24), timeout=5)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ("short tooshort", "at least 16 characters"),
        (f"a {'x' * 20}; a {'y' * 20}", "a name of its own"),
        (f"a {'x' * 20}; b {'x' * 20}", "the same token appears twice"),
        (f"a {'x' * 20} bad*queue", "bad queue names"),
        (f"a {'x' * 20} q extra", "expected 'name token [queues]'"),
        (f"{'x' * 20} name", "at least 16 characters"),  # columns swapped: the token is never shown
    ],
)
def test_the_gateway_refuses_to_start_with_bad_token_settings(tokens: str, message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway"],
        env={**os.environ, "JOBGATE_AUTH_TOKENS": tokens, "JOBGATE_LISTEN": "127.0.0.1:1"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0 and message in result.stderr
    assert "x" * 20 not in result.stderr and "tooshort" not in result.stderr


async def test_sighup_reloads_the_token_file_and_a_bad_file_changes_nothing(
    stack: Stack, client_for: Callable[[str], Client], tmp_path: Path
) -> None:
    old, new = "o" * 24, "n" * 24
    token_file = tmp_path / "tokens"
    token_file.write_text(f"app {old}\n")
    gateway, address = stack.start_gateway(env={"JOBGATE_AUTH_TOKENS_FILE": str(token_file)})
    stub = client_for(address).stub

    async def status(token: str) -> grpc.StatusCode:
        return await code_of(stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), metadata=bearer(token), timeout=5))

    assert (await status(old), await status(new)) == (grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED)
    token_file.write_text(f"app {new}\n")  # rotated
    gateway.signal(signal.SIGHUP)

    async def rotated() -> bool:
        return await status(new) == grpc.StatusCode.OK

    await eventually(rotated, what="the new token accepted")
    assert await status(old) == grpc.StatusCode.UNAUTHENTICATED
    token_file.write_text("app short\n")  # a bad entry: the tokens in force stay
    gateway.signal(signal.SIGHUP)
    await eventually(lambda: logged(gateway, "tokens not reloaded"), what="the bad file refused")
    assert await status(new) == grpc.StatusCode.OK
    assert gateway.alive() and new not in gateway.log() and old not in gateway.log()
