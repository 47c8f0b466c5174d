"""Flow control end to end: pausing and resuming queues, against real gateways, real workers and a
real Redis."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import pytest
from google.protobuf.duration_pb2 import Duration
from redis.asyncio import Redis

from devtools.devstack import Stack
from jobgate.v1 import job_pb2, scheduler_pb2
from protocol.codec import TERMINAL
from protocol.keys import Keys

from .helpers import Client, eventually, request, status_of, value

S = job_pb2


async def states(client: Client, ids: list[str]) -> list[int]:
    return [(await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=j), timeout=5)).job.state for j in ids]


async def test_a_paused_queue_keeps_its_jobs_waiting_across_gateway_restarts_until_resumed(
    stack: Stack, client_for: Callable[[str], Client]
) -> None:
    gateway, address = stack.start_gateway()
    stack.start_worker("--queues", "default,held")
    client = client_for(address)
    reply = await client.stub.PauseQueue(scheduler_pb2.PauseQueueRequest(queue="held"), timeout=5)
    assert not reply.already
    again = await client.stub.PauseQueue(scheduler_pb2.PauseQueueRequest(queue="held"), timeout=5)
    assert again.already
    held = [(await client.submit("echo", {"i": i}, queue="held")).job.id for i in range(5)]
    other = (await client.submit("echo", {"free": True})).job.id
    assert (await client.wait_results([other], timeout=20))[other].state == S.JOB_STATE_SUCCEEDED
    await asyncio.sleep(1.0)  # placement passes and heartbeats go by
    assert await states(client, held) == [S.JOB_STATE_QUEUED] * 5

    gateway.terminate(timeout_s=15)  # the pause is in Redis, not in a gateway
    _, address = stack.start_gateway()
    client = client_for(address)
    await asyncio.sleep(1.0)
    assert await states(client, held) == [S.JOB_STATE_QUEUED] * 5

    resumed = await client.stub.ResumeQueue(scheduler_pb2.ResumeQueueRequest(queue="held"), timeout=5)
    assert not resumed.already
    done = await client.wait_results(held, timeout=20)
    assert {e.state for e in done.values()} == {S.JOB_STATE_SUCCEEDED}
    assert (await client.stub.ResumeQueue(scheduler_pb2.ResumeQueueRequest(queue="held"), timeout=5)).already


@pytest.mark.gateway(worker=("--concurrency", "1"))
async def test_pausing_a_busy_queue_lets_the_running_job_finish_and_starts_no_other(client: Client) -> None:
    ids = [(await client.submit("sleep", {"seconds": 0.8})).job.id for _ in range(3)]

    async def first_running() -> bool:
        return (await states(client, ids))[0] == S.JOB_STATE_RUNNING

    await eventually(first_running, timeout=20, what="the first job running")
    await client.stub.PauseQueue(scheduler_pb2.PauseQueueRequest(), timeout=5)  # the default queue
    first = (await client.wait_results(ids[:1], timeout=20))[ids[0]]
    assert first.state == S.JOB_STATE_SUCCEEDED
    await asyncio.sleep(1.0)  # the worker's finish would have refilled its slot with the next job
    assert await states(client, ids[1:]) == [S.JOB_STATE_QUEUED] * 2
    await client.stub.ResumeQueue(scheduler_pb2.ResumeQueueRequest(), timeout=5)
    rest = await client.wait_results(ids[1:], timeout=20)
    assert {e.state for e in rest.values()} == {S.JOB_STATE_SUCCEEDED}


async def test_pausing_a_malformed_queue_is_refused(client: Client) -> None:
    code, details = await status_of(
        client.stub.PauseQueue(scheduler_pb2.PauseQueueRequest(queue="no such:queue"), timeout=5)
    )
    assert code.name == "INVALID_ARGUMENT" and details.startswith("queue:"), details


async def test_a_waiting_job_says_why_and_a_kind_no_worker_handles_is_logged(
    stack: Stack, client_for: Callable[[str], Client]
) -> None:
    gateway, address = stack.start_gateway()
    client = client_for(address)

    async def reason(job_id: str) -> str:
        return (await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=job_id), timeout=5)).job.waiting_reason

    typo = (await client.submit("ehco", {"hi": 1})).job.id
    assert await reason(typo) == "no live worker serves queue 'default'"
    stack.start_worker()

    async def told() -> bool:
        return "has a handler for kind 'ehco' (they handle: count, echo, fail, flaky, gather, sleep)" in await reason(
            typo
        )

    await eventually(told, timeout=20, what="the reason naming the kind")
    await eventually(
        lambda: "jobs of kind 'ehco' wait in queue 'default'" in gateway.log(), timeout=20, what="a log line"
    )
    await client.stub.PauseQueue(scheduler_pb2.PauseQueueRequest(), timeout=5)
    assert await reason(typo) == "queue 'default' is paused (ResumeQueue resumes it)"
    later = (await client.submit("echo", {}, delay=Duration(seconds=60))).job.id
    assert (await reason(later)).startswith("scheduled: due at ")
    await client.stub.ResumeQueue(scheduler_pb2.ResumeQueueRequest(), timeout=5)
    done = (await client.submit("echo", {})).job.id
    await client.wait_results([done], timeout=20)
    assert await reason(done) == ""


@pytest.mark.gateway(worker=("--queues", "default,other"))
async def test_a_unique_key_refuses_a_second_job_until_the_first_ends(client: Client, redis: Redis, keys: Keys) -> None:
    first = (await client.submit("sleep", {"seconds": 1}, unique_key="nightly")).job.id
    code, details = await status_of(client.stub.SubmitJob(request("echo", unique_key="nightly"), timeout=5))
    assert code.name == "ALREADY_EXISTS" and details.startswith("unique_key:") and first in details, details
    elsewhere = (await client.submit("echo", {}, unique_key="nightly", queue="other")).job.id  # keys are per queue
    batch = scheduler_pb2.SubmitJobsRequest(jobs=[request("echo", unique_key="b"), request("echo", unique_key="b")])
    before = await redis.get(keys.seq())
    code, details = await status_of(client.stub.SubmitJobs(batch, timeout=5))
    assert code.name == "ALREADY_EXISTS" and details.startswith("jobs[1].unique_key:"), details
    assert await redis.get(keys.seq()) == before  # none of the batch was stored
    done = await client.wait_results([first, elsewhere], timeout=20)
    assert {e.state for e in done.values()} == {S.JOB_STATE_SUCCEEDED}
    again = (await client.submit("echo", {}, unique_key="nightly")).job.id  # free once the first ended
    assert (await client.wait_results([again], timeout=20))[again].state == S.JOB_STATE_SUCCEEDED

    # a cancelled job lets its key go; retrying it takes the key back, if nobody holds it meanwhile
    waiting = (await client.submit("echo", {}, unique_key="k2", delay=Duration(seconds=60))).job.id
    await client.stub.CancelJob(scheduler_pb2.CancelJobRequest(id=waiting), timeout=5)
    holder = (await client.submit("sleep", {"seconds": 1}, unique_key="k2")).job.id
    code, details = await status_of(client.stub.RetryJob(scheduler_pb2.RetryJobRequest(id=waiting), timeout=5))
    assert code.name == "ALREADY_EXISTS" and holder in details, details
    assert (await states(client, [waiting])) == [S.JOB_STATE_CANCELLED]  # the refused retry changed nothing
    await client.wait_results([holder], timeout=20)
    await client.stub.RetryJob(scheduler_pb2.RetryJobRequest(id=waiting), timeout=5)
    assert (await client.wait_results([waiting], timeout=20))[waiting].state == S.JOB_STATE_SUCCEEDED
    code, details = await status_of(client.stub.SubmitJob(request("echo", unique_key="x" * 257), timeout=5))
    assert code.name == "INVALID_ARGUMENT" and details.startswith("unique_key:"), details


async def test_jobs_requiring_labels_run_only_on_workers_that_have_them_and_never_block_the_others(
    stack: Stack, client_for: Callable[[str], Client]
) -> None:
    _, address = stack.start_gateway()
    client = client_for(address)
    gpu = stack.start_worker("--labels", "gpu=true,region=eu", "--concurrency", "2")
    plain = stack.start_worker("--concurrency", "2")
    listed = await eventually(lambda: _workers(client, 2), timeout=20, what="both workers registered")
    assert {w.id: dict(w.labels) for w in listed} == {
        gpu.worker_id: {"gpu": "true", "region": "eu"},
        plain.worker_id: {},
    }

    needs = [(await client.submit("echo", {"i": i}, labels={"gpu": "true"})).job.id for i in range(6)]
    stuck = (await client.submit("echo", {}, labels={"gpu": "true", "region": "us"})).job.id  # nobody has both
    free = [(await client.submit("echo", {"j": i})).job.id for i in range(6)]
    done = await client.wait_results(needs + free, timeout=20)
    assert {done[j].worker_id for j in needs} == {gpu.worker_id}
    assert {e.state for e in done.values()} == {S.JOB_STATE_SUCCEEDED}
    job = (await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=stuck), timeout=5)).job
    assert job.state == S.JOB_STATE_QUEUED and dict(job.spec.labels) == {"gpu": "true", "region": "us"}
    assert job.waiting_reason == (
        "no live worker of queue 'default' that runs kind 'echo' has the labels gpu=true,region=us"
    )
    stack.start_worker("--labels", "region=us,gpu=true")  # one arrives that has them
    assert (await client.wait_results([stuck], timeout=20))[stuck].state == S.JOB_STATE_SUCCEEDED

    for labels, message in (({"bad name": "x"}, "labels: name"), ({"a": "x y"}, "labels: value")):
        code, details = await status_of(client.stub.SubmitJob(request("echo", labels=labels), timeout=5))
        assert code.name == "INVALID_ARGUMENT" and details.startswith(message), details
    many = {f"l{i}": "1" for i in range(17)}
    code, details = await status_of(client.stub.SubmitJob(request("echo", labels=many), timeout=5))
    assert code.name == "INVALID_ARGUMENT" and "at most 16" in details, details


async def _workers(client: Client, n: int) -> list[scheduler_pb2.WorkerInfo] | None:
    workers = list((await client.stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=5)).workers)
    return workers if len(workers) >= n else None


async def test_a_batch_counts_how_its_jobs_end_and_submits_its_callback_exactly_once(
    stack: Stack, client_for: Callable[[str], Client], redis: Redis, keys: Keys
) -> None:
    _, first = stack.start_gateway()
    _, second = stack.start_gateway()  # both look for ended batches: the callback is still one job
    stack.start_worker("--concurrency", "4")
    client = client_for(first)
    jobs = [request("echo", {"n": n}) for n in range(3)]
    jobs += [request("fail", {"fatal": True}), request("sleep", {"seconds": 0.5})]
    callback = request("echo", {"report": "nightly"})
    reply = await client.stub.SubmitJobs(
        scheduler_pb2.SubmitJobsRequest(jobs=jobs, batch=scheduler_pb2.BatchOptions(callback=callback)), timeout=5
    )
    bid = reply.batch_id
    assert len(bid) == 32 and {j.batch_id for j in reply.jobs} == {bid}
    ids = [j.id for j in reply.jobs]
    watch = client_for(second).stub.WatchResults(scheduler_pb2.WatchResultsRequest(batch_id=bid), timeout=30)
    ended = {r.event.job_id: r.event.state async for r in watch}  # ends once every job has
    assert set(ended) == set(ids)

    async def called_back() -> scheduler_pb2.Batch | None:
        batch = (await client.stub.GetBatch(scheduler_pb2.GetBatchRequest(id=bid), timeout=5)).batch
        return batch if batch.callback_job_id else None

    batch = await eventually(called_back, timeout=20, what="the callback submitted")
    assert (batch.total, batch.pending, batch.succeeded, batch.failed, batch.cancelled) == (5, 0, 4, 1, 0)
    assert batch.finished_at.ToMilliseconds() >= batch.created_at.ToMilliseconds() > 0
    cb = batch.callback_job_id
    assert (await client.wait_results([cb], timeout=20))[cb].state == S.JOB_STATE_SUCCEEDED
    stored = (await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=cb), timeout=5)).job
    assert stored.spec.idempotency_key == f"batch:{bid}" and stored.spec.args == callback.args
    await asyncio.sleep(1.0)  # more ticks of both gateways: still one callback
    callbacks = 0
    async for key in redis.scan_iter(match=f"{keys.prefix}job:*", count=1000):
        job = (await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=key.decode().rsplit(":", 1)[1]))).job
        callbacks += job.spec.idempotency_key == f"batch:{bid}"
    assert callbacks == 1
    again = (await client.stub.GetBatch(scheduler_pb2.GetBatchRequest(id=bid), timeout=5)).batch
    assert again.callback_job_id == cb


async def test_bad_batches_are_refused(client: Client, redis: Redis, keys: Keys) -> None:
    late = scheduler_pb2.BatchOptions(callback=request("echo", delay=Duration(seconds=5)))
    before = await redis.get(keys.seq())
    code, details = await status_of(
        client.stub.SubmitJobs(scheduler_pb2.SubmitJobsRequest(jobs=[request("echo")], batch=late), timeout=5)
    )
    assert code.name == "INVALID_ARGUMENT" and details.startswith("batch.callback.delay:"), details
    bad_kind = scheduler_pb2.BatchOptions(callback=request(""))
    code, details = await status_of(
        client.stub.SubmitJobs(scheduler_pb2.SubmitJobsRequest(jobs=[request("echo")], batch=bad_kind), timeout=5)
    )
    assert code.name == "INVALID_ARGUMENT" and details.startswith("batch.callback.kind:"), details
    assert await redis.get(keys.seq()) == before
    code, _ = await status_of(client.stub.GetBatch(scheduler_pb2.GetBatchRequest(id="0" * 32), timeout=5))
    assert code.name == "NOT_FOUND"
    code, details = await status_of(client.stub.GetBatch(scheduler_pb2.GetBatchRequest(id="nope"), timeout=5))
    assert code.name == "INVALID_ARGUMENT", details
    watch = scheduler_pb2.WatchResultsRequest(batch_id="0" * 32, job_ids=["1" * 32])
    code, details = await status_of(client.stub.WatchResults(watch, timeout=5))
    assert code.name == "INVALID_ARGUMENT" and details.startswith("batch_id:"), details


PLACED = """
local n = 0
for _, key in ipairs(KEYS) do
  local state = redis.call('HGET', key, 'state')
  if state == '2' or state == '3' then n = n + 1 end
end
return n
"""


async def _placed_now(redis: Redis, keys: Keys, ids: list[str]) -> int:
    """How many of the jobs ``ids`` are DISPATCHED or RUNNING, read in one atomic step."""
    return int(await redis.eval(PLACED, len(ids), *(keys.job(j) for j in ids)))


async def test_a_queue_limit_bounds_its_running_jobs_across_workers_and_gateways(
    stack: Stack, client_for: Callable[[str], Client], redis: Redis, keys: Keys
) -> None:
    gateways = [stack.start_gateway()[1] for _ in range(2)]
    for _ in range(2):
        stack.start_worker("--queues", "capped", "--concurrency", "4")
    client = client_for(gateways[0])
    limits = scheduler_pb2.QueueLimits(max_running=3)
    reply = await client.stub.SetQueueLimits(scheduler_pb2.SetQueueLimitsRequest(queue="capped", limits=limits))
    assert reply.limits.max_running == 3 and not reply.limits.HasField("rate")
    ids = []
    for i in range(16):  # through both gateways
        ids.append((await client_for(gateways[i % 2]).submit("sleep", {"seconds": 0.3}, queue="capped")).job.id)
    peak, samples = 0, 0
    while samples < 400:
        peak = max(peak, await _placed_now(redis, keys, ids), await redis.scard(keys.running("capped")))
        samples += 1
        if samples % 20 == 0 and all(s in TERMINAL for s in await states(client, ids)):
            break
        await asyncio.sleep(0.02)
    assert peak == 3, peak  # never more, and the limit was reached
    done = await client.wait_results(ids, timeout=30)
    assert {e.state for e in done.values()} == {S.JOB_STATE_SUCCEEDED}
    assert await redis.scard(keys.running("capped")) == 0

    # raising the limit lets waiting jobs go at once; removing it (unset) too
    cleared = await client.stub.SetQueueLimits(scheduler_pb2.SetQueueLimitsRequest(queue="capped"), timeout=5)
    assert not cleared.limits.HasField("max_running")


async def test_a_rate_limit_spaces_starts_without_failing_any_job(
    stack: Stack, client_for: Callable[[str], Client]
) -> None:
    _, address = stack.start_gateway()
    stack.start_worker("--queues", "paced", "--concurrency", "8")
    client = client_for(address)
    rate = scheduler_pb2.RateLimit(count=4, period=Duration(seconds=1))
    limits = scheduler_pb2.QueueLimits(rate=rate)
    await client.stub.SetQueueLimits(scheduler_pb2.SetQueueLimitsRequest(queue="paced", limits=limits), timeout=5)
    ids = [(await client.submit("echo", {"i": i}, queue="paced")).job.id for i in range(12)]
    done = await client.wait_results(ids, timeout=30)
    assert {e.state for e in done.values()} == {S.JOB_STATE_SUCCEEDED}
    jobs = [(await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=j), timeout=5)).job for j in ids]
    starts = sorted(j.started_at.ToMilliseconds() for j in jobs)
    for i, t in enumerate(starts):  # a burst of 4, then 4 per second: start i no earlier than (i - 4) / 4 s
        assert t - starts[0] >= (i - 4) * 250 - 50, (i, [s - starts[0] for s in starts])


async def test_bad_queue_limits_are_refused_and_change_nothing(client: Client, redis: Redis, keys: Keys) -> None:
    for limits, field in (
        (scheduler_pb2.QueueLimits(max_running=0), "limits.max_running"),
        (scheduler_pb2.QueueLimits(max_running=2_000_000), "limits.max_running"),
        (
            scheduler_pb2.QueueLimits(rate=scheduler_pb2.RateLimit(count=0, period=Duration(seconds=1))),
            "limits.rate.count",
        ),
        (scheduler_pb2.QueueLimits(rate=scheduler_pb2.RateLimit(count=5)), "limits.rate.period"),
        (scheduler_pb2.QueueLimits(max_running_per_key=0), "limits.max_running_per_key"),
        (
            scheduler_pb2.QueueLimits(rate_per_key=scheduler_pb2.RateLimit(count=0, period=Duration(seconds=1))),
            "limits.rate_per_key.count",
        ),
        (scheduler_pb2.QueueLimits(rate_per_key=scheduler_pb2.RateLimit(count=5)), "limits.rate_per_key.period"),
        (
            scheduler_pb2.QueueLimits(rate=scheduler_pb2.RateLimit(count=5, period=Duration(seconds=2 * 86400))),
            "limits.rate.period",
        ),
    ):
        req = scheduler_pb2.SetQueueLimitsRequest(queue="q", limits=limits)
        code, details = await status_of(client.stub.SetQueueLimits(req, timeout=5))
        assert code.name == "INVALID_ARGUMENT" and details.startswith(field + ":"), details
    assert not await redis.exists(keys.queue_settings("q"))


PLACED_BY_KEY = """
local n = {}
for i, key in ipairs(KEYS) do
  local state = redis.call('HGET', key, 'state')
  if state == '2' or state == '3' then n[tonumber(ARGV[i])] = (n[tonumber(ARGV[i])] or 0) + 1 end
end
local out = {}
for i = 1, tonumber(ARGV[#KEYS + 1]) do out[i] = n[i] or 0 end
return out
"""


async def _submit_keyed(client: Client, key: str, n: int, seconds: float, queue: str) -> list[str]:
    jobs = [request("sleep", {"seconds": seconds}, queue=queue, concurrency_key=key) for _ in range(n)]
    reply = await client.stub.SubmitJobs(scheduler_pb2.SubmitJobsRequest(jobs=jobs), timeout=10)
    return [j.id for j in reply.jobs]


async def test_a_key_limit_bounds_each_keys_running_jobs_across_workers_and_gateways(
    stack: Stack, client_for: Callable[[str], Client], redis: Redis, keys: Keys
) -> None:
    gateways = [stack.start_gateway()[1] for _ in range(2)]
    for _ in range(2):
        stack.start_worker("--queues", "tenants", "--concurrency", "4")
    client = client_for(gateways[0])
    limits = scheduler_pb2.QueueLimits(max_running_per_key=2)
    reply = await client.stub.SetQueueLimits(scheduler_pb2.SetQueueLimitsRequest(queue="tenants", limits=limits))
    assert reply.limits.max_running_per_key == 2 and not reply.limits.HasField("max_running")
    by_key = [
        await _submit_keyed(client_for(gateways[i % 2]), f"customer-{i}@example.com", 8, 0.2, "tenants")
        for i in range(3)
    ]
    ids = [j for group in by_key for j in group]
    owner = [str(i + 1) for i, group in enumerate(by_key) for _ in group]
    waiting = (await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=by_key[0][-1]), timeout=5)).job
    assert waiting.state == S.JOB_STATE_QUEUED and "customer-0@example.com" in waiting.waiting_reason
    peaks = [0, 0, 0]
    for sample in range(500):
        now = await redis.eval(PLACED_BY_KEY, len(ids), *(keys.job(j) for j in ids), *owner, 3)
        peaks = [max(p, int(n)) for p, n in zip(peaks, now, strict=True)]
        if sample % 20 == 19 and all(s in TERMINAL for s in await states(client, ids)):
            break
        await asyncio.sleep(0.01)
    assert peaks == [2, 2, 2], peaks  # never more per key, and each key reached its limit
    done = await client.wait_results(ids, timeout=30)
    assert {e.state for e in done.values()} == {S.JOB_STATE_SUCCEEDED}
    left = [k async for k in redis.scan_iter(match=keys.prefix + "ckey*")]
    assert left == []  # an idle key leaves nothing behind


@pytest.mark.gateway(worker=("--concurrency", "1"))
async def test_keys_take_turns_so_a_large_backlog_does_not_starve_a_small_key(
    client: Client, redis: Redis, keys: Keys
) -> None:
    big = await _submit_keyed(client, "big", 20, 0.05, "default")
    small = await _submit_keyed(client, "small", 3, 0.05, "default")
    plain = (await client.submit("sleep", {"seconds": 0.05})).job.id
    done = await client.wait_results([*big, *small, plain], timeout=30)
    assert {e.state for e in done.values()} == {S.JOB_STATE_SUCCEEDED}
    leases = {j: int(await redis.hget(keys.job(j), "lease")) for j in [*big, *small, plain]}
    order = sorted(leases, key=leases.__getitem__)  # the order of placement
    assert order.index(big[0]) < order.index(big[1])  # a key's own jobs keep their order
    # the small key's jobs and the plain job start every other placement or so, not after the 20 big ones
    assert [order.index(j) for j in small] <= [3, 5, 7], [order.index(j) for j in small]
    assert order.index(plain) <= 6, order.index(plain)


async def test_a_key_rate_limit_spaces_that_keys_starts_and_not_the_others(
    stack: Stack, client_for: Callable[[str], Client], redis: Redis, keys: Keys
) -> None:
    _, address = stack.start_gateway()
    stack.start_worker("--queues", "paced", "--concurrency", "8")
    client = client_for(address)
    rate = scheduler_pb2.RateLimit(count=2, period=Duration(seconds=1))
    limits = scheduler_pb2.QueueLimits(rate_per_key=rate)
    await client.stub.SetQueueLimits(scheduler_pb2.SetQueueLimitsRequest(queue="paced", limits=limits), timeout=5)
    fast = await _submit_keyed(client, "x", 6, 0, "paced")
    other = await _submit_keyed(client, "y", 2, 0, "paced")

    async def a_head_scheduled() -> str:
        for j in fast:
            job = (await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=j), timeout=5)).job
            if job.state == S.JOB_STATE_SCHEDULED:
                return job.waiting_reason
        return ""

    reason = await eventually(a_head_scheduled, timeout=10, what="a job of key x waiting for a start")
    assert "rate_per_key" in reason and "'x'" in reason, reason
    done = await client.wait_results([*fast, *other], timeout=30)
    assert {e.state for e in done.values()} == {S.JOB_STATE_SUCCEEDED}
    jobs = {j: (await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=j), timeout=5)).job for j in [*fast, *other]}
    starts = sorted(jobs[j].started_at.ToMilliseconds() for j in fast)
    for i, t in enumerate(starts):  # a burst of 2, then 2 per second: start i no earlier than (i - 2) / 2 s
        assert t - starts[0] >= (i - 2) * 500 - 50, (i, [s - starts[0] for s in starts])
    assert starts[-1] - starts[0] >= 1900
    assert max(jobs[j].started_at.ToMilliseconds() for j in other) - starts[0] < 900  # y has its own bucket


@pytest.mark.gateway(worker=("--queues", "paced", "--concurrency", "4"))
async def test_a_keyed_retry_that_comes_due_while_its_key_has_no_start_left_waits_for_one(
    client: Client, redis: Redis, keys: Keys
) -> None:
    rate = scheduler_pb2.RateLimit(count=1, period=Duration(seconds=2))
    limits = scheduler_pb2.QueueLimits(rate_per_key=rate)
    await client.stub.SetQueueLimits(scheduler_pb2.SetQueueLimitsRequest(queue="paced", limits=limits), timeout=5)
    retry = job_pb2.RetryPolicy(initial_backoff=Duration(nanos=100_000_000))
    first = (await client.submit("fail", queue="paced", concurrency_key="k", max_attempts=2, retry=retry)).job.id

    async def waits_for_a_start() -> bool:  # its retry came due with the key's one start spent
        job = (await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=first), timeout=5)).job
        return len(job.attempts) == 1 and job.state == S.JOB_STATE_SCHEDULED and "rate_per_key" in job.waiting_reason

    await eventually(waits_for_a_start, timeout=10, what="the retry waiting for the key's next start")
    second = (await client.submit("echo", queue="paced", concurrency_key="k")).job.id
    done = await client.wait_results([first, second], timeout=30)  # the key is never stuck
    assert (done[first].state, done[first].attempt, done[second].state) == (
        S.JOB_STATE_FAILED,
        2,
        S.JOB_STATE_SUCCEEDED,
    )
    jobs = {j: (await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=j), timeout=5)).job for j in (first, second)}
    starts = sorted(
        [a.started_at.ToMilliseconds() for a in jobs[first].attempts] + [jobs[second].started_at.ToMilliseconds()]
    )
    assert all(b - a >= 1900 for a, b in itertools.pairwise(starts)), starts  # one start per 2 s
    stats = (await client.stub.GetQueueStats(scheduler_pb2.GetQueueStatsRequest(queues=["paced"]), timeout=5)).queues
    assert (stats[0].scheduled, stats[0].waiting) == (0, 0)


@pytest.mark.gateway(worker=("--concurrency", "1"))
async def test_cancelling_a_keyed_job_in_line_or_at_its_head_lets_the_key_go_on(
    client: Client, redis: Redis, keys: Keys
) -> None:
    limits = scheduler_pb2.QueueLimits(max_running_per_key=1)
    await client.stub.SetQueueLimits(scheduler_pb2.SetQueueLimitsRequest(limits=limits), timeout=5)
    ids = await _submit_keyed(client, "k", 4, 0.3, "default")
    await eventually(lambda: _placed_now(redis, keys, ids[:1]), timeout=10, what="the first job placed")
    for j in ids[1:3]:  # the second and third wait in the key's line
        await client.stub.CancelJob(scheduler_pb2.CancelJobRequest(id=j), timeout=5)
    done = await client.wait_results(ids, timeout=30)
    assert [done[j].state for j in ids] == [
        S.JOB_STATE_SUCCEEDED,
        S.JOB_STATE_CANCELLED,
        S.JOB_STATE_CANCELLED,
        S.JOB_STATE_SUCCEEDED,
    ]
    assert not await redis.exists(keys.concurrency_key("default", "k"), keys.concurrency_line("default", "k"))


@pytest.mark.gateway(worker=("--concurrency", "4"))
async def test_a_job_runs_once_its_dependencies_succeed_and_reads_their_results(client: Client) -> None:
    slow = (await client.submit("sleep", {"seconds": 0.6})).job.id
    quick = (await client.submit("echo", {"part": 1})).job.id
    joined = (await client.submit("gather", depends_on=[slow, quick])).job
    assert joined.state == S.JOB_STATE_BLOCKED and list(joined.spec.depends_on) == [slow, quick]
    reason = (await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=joined.id), timeout=5)).job.waiting_reason
    assert reason.startswith("waiting for ") and "of the 2 job(s) it depends on" in reason
    run = client.stub.WatchResults(scheduler_pb2.WatchResultsRequest(job_ids=[joined.id]), timeout=20)
    [event] = [r.event async for r in run]
    assert event.state == S.JOB_STATE_SUCCEEDED
    assert value(event.result) == {"dependencies": {slow: {"slept": 0.6}, quick: {"part": 1}}}
    job = (await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=joined.id), timeout=5)).job
    parents = [(await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=j), timeout=5)).job for j in (slow, quick)]
    first_done = max(p.finished_at.ToMilliseconds() for p in parents)

    assert job.started_at.ToMilliseconds() >= first_done
    after = (await client.submit("gather", depends_on=[slow])).job  # its dependency has succeeded already
    assert after.state == S.JOB_STATE_QUEUED
    assert (await client.wait_results([after.id], timeout=20))[after.id].state == S.JOB_STATE_SUCCEEDED


async def test_a_failed_dependency_fails_the_jobs_down_the_chain(client: Client) -> None:
    doomed = (await client.submit("sleep", {"seconds": 0.5}, max_attempts=1)).job.id
    child = (await client.submit("echo", {}, depends_on=[doomed])).job.id
    grandchild = (await client.submit("echo", {}, depends_on=[child])).job.id
    waiting = (await client.submit("echo", {}, depends_on=[grandchild])).job.id
    await client.stub.CancelJob(scheduler_pb2.CancelJobRequest(id=waiting), timeout=5)  # a BLOCKED job cancels
    await client.stub.CancelJob(scheduler_pb2.CancelJobRequest(id=doomed), timeout=5)
    ended = await client.wait_results([doomed, child, grandchild, waiting], timeout=20)
    assert ended[waiting].state == S.JOB_STATE_CANCELLED
    for jid in (child, grandchild):
        assert (ended[jid].state, ended[jid].error.code) == (S.JOB_STATE_FAILED, "DEPENDENCY_FAILED"), ended[jid]
    assert doomed in ended[child].error.message and child in ended[grandchild].error.message
    late = (await client.submit("echo", {}, depends_on=[child])).job  # on a job that failed already
    assert (late.state, late.error.code) == (S.JOB_STATE_FAILED, "DEPENDENCY_FAILED")


async def test_bad_dependencies_are_refused_and_store_nothing(client: Client, redis: Redis, keys: Keys) -> None:
    known = (await client.submit("echo", {})).job.id
    before = await redis.get(keys.seq())
    for deps, message in (
        (["0" * 32], "depends_on: no job"),
        ([known, known], "depends_on: a job appears twice"),
        (["nope"], "depends_on[0]:"),
        ([f"{i:032x}" for i in range(101)], "depends_on: at most 100"),
    ):
        code, details = await status_of(client.stub.SubmitJob(request("echo", depends_on=deps), timeout=5))
        assert code.name == "INVALID_ARGUMENT" and details.startswith(message), details
    assert await redis.get(keys.seq()) == before


@pytest.mark.gateway(worker=None)
async def test_listing_jobs_goes_newest_first_filters_and_keeps_its_place_while_jobs_change(client: Client) -> None:
    def listing(**fields: object) -> scheduler_pb2.ListJobsRequest:
        return scheduler_pb2.ListJobsRequest(queue="listed", **fields)  # type: ignore[arg-type]

    async def everything(**fields: object) -> list[job_pb2.Job]:
        out: list[job_pb2.Job] = []
        token = ""
        for _ in range(50):
            page = await client.stub.ListJobs(listing(page_token=token, **fields), timeout=5)
            out += page.jobs
            token = page.next_page_token
            if not token:
                return out
        raise AssertionError("the listing did not end")

    echo = [(await client.submit("echo", {"i": i}, queue="listed")).job.id for i in range(15)]
    other = [(await client.submit("other", {"i": i}, queue="listed")).job.id for i in range(10)]
    later = [(await client.submit("echo", queue="listed", delay=Duration(seconds=3600))).job.id for _ in range(3)]
    submitted = [*echo, *other, *later]
    assert [j.id for j in await everything(page_size=7)] == submitted[::-1]  # newest first, each once
    assert [j.id for j in await everything(kind="other")] == other[::-1]
    scheduled = await everything(states=[S.JOB_STATE_SCHEDULED])
    assert [j.id for j in scheduled] == later[::-1] and scheduled[0].spec.kind == "echo"
    assert await everything(states=[S.JOB_STATE_RUNNING, S.JOB_STATE_SUCCEEDED]) == []

    first = await client.stub.ListJobs(listing(page_size=5), timeout=5)
    assert [j.id for j in first.jobs] == submitted[::-1][:5] and first.next_page_token
    newer = [(await client.submit("echo", queue="listed")).job.id for _ in range(3)]
    for j in submitted[::-1][5:7]:  # jobs of the next page change state meanwhile
        await client.stub.CancelJob(scheduler_pb2.CancelJobRequest(id=j), timeout=5)
    second = await client.stub.ListJobs(listing(page_size=5, page_token=first.next_page_token), timeout=5)
    assert [j.id for j in second.jobs] == submitted[::-1][5:10]  # on after the last shown; no new ones
    assert [j.state for j in second.jobs[:2]] == [S.JOB_STATE_CANCELLED] * 2
    assert [j.id for j in (await client.stub.ListJobs(listing(page_size=3), timeout=5)).jobs] == newer[::-1]

    for req, field in (
        (listing(page_size=1001), "page_size"),
        (listing(page_token="nonsense"), "page_token"),
        (listing(states=[99]), "states[0]"),
        (listing(kind="bad kind"), "kind"),
        (scheduler_pb2.ListJobsRequest(queue="bad queue"), "queue"),
    ):
        code, details = await status_of(client.stub.ListJobs(req, timeout=5))
        assert code.name == "INVALID_ARGUMENT" and details.startswith(field + ":"), details


@pytest.mark.gateway(worker=("--queues", "counted", "--concurrency", "3"))
async def test_queue_stats_count_every_state_and_the_ends_of_recent_minutes(client: Client) -> None:
    async def stats() -> scheduler_pb2.QueueStats:
        reply = await client.stub.GetQueueStats(scheduler_pb2.GetQueueStatsRequest(queues=["counted"]), timeout=5)
        [one] = reply.queues
        return one

    ok = [(await client.submit("echo", {"i": i}, queue="counted")).job.id for i in range(5)]
    bad = [(await client.submit("fail", queue="counted", max_attempts=1)).job.id for _ in range(2)]
    await client.wait_results([*ok, *bad], timeout=30)
    s = await stats()
    assert (s.succeeded, s.failed, s.cancelled, s.dead_letters) == (5, 2, 0, 2)
    assert sum(s.ended_by_minute) == 7 and len(s.ended_by_minute) == 60
    assert s.ended_per_minute_15m == pytest.approx(7 / 15)
    assert (s.waiting, s.scheduled, s.running, s.blocked, s.paused) == (0, 0, 0, 0, False)
    assert (s.workers, s.slots) == (1, 3) and s.window.seconds == 86_400
    assert not s.HasField("oldest_waiting_age")

    await client.stub.PauseQueue(scheduler_pb2.PauseQueueRequest(queue="counted"), timeout=5)
    limits = scheduler_pb2.QueueLimits(max_running_per_key=1)
    await client.stub.SetQueueLimits(scheduler_pb2.SetQueueLimitsRequest(queue="counted", limits=limits), timeout=5)
    held = [(await client.submit("echo", queue="counted")).job.id for _ in range(2)]
    keyed = [(await client.submit("echo", queue="counted", concurrency_key="k")).job.id for _ in range(3)]
    later = [(await client.submit("echo", queue="counted", delay=Duration(seconds=3600))).job.id for _ in range(2)]
    blocked = (await client.submit("echo", queue="counted", depends_on=held[:1])).job.id
    await asyncio.sleep(0.3)
    s = await stats()
    assert (s.waiting, s.scheduled, s.blocked, s.running, s.paused) == (5, 2, 1, 0, True)
    assert s.oldest_waiting_age.ToMilliseconds() >= 300 and s.limits.max_running_per_key == 1
    for j in [later[0], keyed[1], blocked]:
        await client.stub.CancelJob(scheduler_pb2.CancelJobRequest(id=j), timeout=5)
    s = await stats()
    assert (s.waiting, s.scheduled, s.blocked, s.cancelled) == (4, 1, 0, 3)

    await client.stub.ResumeQueue(scheduler_pb2.ResumeQueueRequest(queue="counted"), timeout=5)
    await client.wait_results([*held, keyed[0], keyed[2]], timeout=30)
    s = await stats()
    assert (s.waiting, s.scheduled, s.succeeded) == (0, 1, 9)
    every = await client.stub.GetQueueStats(scheduler_pb2.GetQueueStatsRequest(), timeout=5)
    assert "counted" in [q.queue for q in every.queues]
    code, details = await status_of(
        client.stub.GetQueueStats(scheduler_pb2.GetQueueStatsRequest(queues=["no such:queue"]), timeout=5)
    )
    assert code.name == "INVALID_ARGUMENT" and details.startswith("queues[0]:"), details
