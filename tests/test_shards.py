"""A namespace spread over several shards (``redis_shards``), against one real Redis: each queue's
keys, jobs and worker registrations under its shard's hash tag, job ids that name their shard, and a
worker serving queues of several shards that never offers more slots than it has."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from devtools.devstack import Stack
from jobgate.v1 import job_pb2, scheduler_pb2
from protocol.keys import Keys
from worker.config import WorkerSettings

from .helpers import FAST, Client, eventually, request, running_stack, start_gateway

S = job_pb2
SHARDS = 4
ROOT = Path(__file__).resolve().parent.parent


def spread(keys: Keys, n: int) -> list[str]:
    """``n`` queue names that fall in ``n`` different shards."""
    found: dict[int, str] = {}
    for i in range(1000):
        name = f"q{i}"
        found.setdefault(keys.queue_shard(name), name)
        if len(found) == n:
            return [found[s] for s in sorted(found)]
    raise AssertionError(f"no {n} queues on {n} shards")


@pytest.fixture
def keys(namespace: str) -> Keys:
    return Keys(namespace, SHARDS)


@pytest.fixture
def sharded(request: pytest.FixtureRequest, redis_url: str, namespace: str) -> Iterator[Stack]:
    with running_stack(request, redis_url, namespace, {**FAST, "JOBGATE_REDIS_SHARDS": str(SHARDS)}) as s:
        yield s


def test_keys_of_a_queue_and_of_its_jobs_share_the_queue_shard_tag() -> None:
    keys = Keys("ns", SHARDS)
    assert [k.prefix for k in keys.all_shards()] == ["{ns}:", "{ns:1}:", "{ns:2}:", "{ns:3}:"]
    for queue in spread(keys, SHARDS):
        shard = keys.of_queue(queue)
        for _ in range(50):
            job_id = keys.job_id_for(os.urandom(16).hex(), queue)
            assert len(job_id) == 32 and keys.job_shard(job_id) == keys.queue_shard(queue)
            assert keys.job(job_id).startswith(shard.prefix)
        assert keys.pending(queue, "echo").startswith(shard.prefix)
        assert keys.queue_workers(queue).startswith(shard.prefix)
    single = Keys("ns")
    assert single.prefix == "{ns}:" and single.job_id_for("ab" * 16, "any") == "ab" * 16  # the layout of one shard
    for bad in (0, 1025):
        with pytest.raises(ValueError, match="redis_shards"):
            Keys("ns", bad)


async def test_a_sharded_namespace_runs_and_cancels_jobs_of_queues_on_every_shard(
    sharded: Stack, keys: Keys, redis: Redis, client_for: Callable[..., Client]
) -> None:
    queues = spread(keys, SHARDS)
    idle = next(q for q in (f"idle{i}" for i in range(100)) if keys.queue_shard(q) != 0)  # no worker serves it
    sharded.start_worker(env={"JOBGATE_QUEUES": ",".join(queues), "JOBGATE_CONCURRENCY": "8"})
    client = client_for(start_gateway(sharded)[1])
    jobs = [request("echo", {"i": i}, queue=queues[i % SHARDS]) for i in range(40)]
    reply = await client.stub.SubmitJobs(scheduler_pb2.SubmitJobsRequest(jobs=jobs), timeout=10)  # spans 4 shards
    ids = [j.id for j in reply.jobs]
    events = await client.wait_results(ids)
    assert {e.state for e in events.values()} == {S.JOB_STATE_SUCCEEDED}
    for i, job_id in enumerate(ids):
        assert keys.job_shard(job_id) == keys.queue_shard(queues[i % SHARDS])
        assert await redis.exists(keys.of_queue(queues[i % SHARDS]).job(job_id)) == 1
        job = await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=job_id), timeout=5)
        assert (job.job.spec.queue, job.job.state) == (queues[i % SHARDS], S.JOB_STATE_SUCCEEDED)

    [worker] = (await client.stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=5)).workers
    assert (worker.slots, sorted(worker.queues)) == (8, sorted(queues))  # one worker, its slots split

    waiting = await client.submit("echo", queue=idle)
    cancelled = await client.stub.CancelJob(scheduler_pb2.CancelJobRequest(id=waiting.job.id), timeout=5)
    assert cancelled.job.state == S.JOB_STATE_CANCELLED
    assert await redis.hget(keys.of_queue(idle).job(waiting.job.id), "state") == str(S.JOB_STATE_CANCELLED).encode()


async def test_a_worker_serving_queues_of_several_shards_never_has_more_jobs_booked_than_slots(
    sharded: Stack, keys: Keys, redis: Redis, client_for: Callable[..., Client]
) -> None:
    """Each shard's registration offers a share of the worker's slots: across shards, Redis never
    books more jobs on it than it has slots, however deep the backlog of each queue."""
    queues = spread(keys, 3)
    slots = 4
    worker = sharded.start_worker(env={"JOBGATE_QUEUES": ",".join(queues), "JOBGATE_CONCURRENCY": str(slots)})
    client = client_for(start_gateway(sharded)[1])
    await eventually(lambda: registered_everywhere(redis, keys, worker.worker_id, queues), what="registrations")
    jobs = [request("sleep", {"seconds": 0.05}, queue=queues[i % 3]) for i in range(90)]
    reply = await client.stub.SubmitJobs(scheduler_pb2.SubmitJobsRequest(jobs=jobs), timeout=10)
    results = asyncio.create_task(client.wait_results([j.id for j in reply.jobs], timeout=60))
    booked: list[int] = []
    while not results.done():
        counts = await asyncio.gather(*(booked_on(redis, keys.of_queue(q), worker.worker_id) for q in queues))
        booked.append(sum(counts))
        await asyncio.sleep(0.005)  # sampling, not waiting for anything
    events = await results
    assert {e.state for e in events.values()} == {S.JOB_STATE_SUCCEEDED}
    assert max(booked) <= slots, max(booked)
    assert max(booked) >= 2  # the sampling saw the worker busy on more than one shard's share


async def registered_everywhere(redis: Redis, keys: Keys, worker_id: str, queues: list[str]) -> bool:
    found = [await redis.hget(keys.of_queue(q).worker(worker_id), "slots") for q in queues]
    return all(found)


async def booked_on(redis: Redis, shard: Keys, worker_id: str) -> int:
    """Jobs Redis books on the worker's registration in one shard (its jobs set)."""
    return int(await redis.scard(shard.worker_jobs(worker_id)))


@pytest.mark.parametrize("module", ["gateway", "worker"])
def test_a_shard_count_that_cannot_work_stops_the_process_with_a_clear_error(module: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("JOBGATE_")}
    env = {**clean, "JOBGATE_REDIS_SHARDS": "0"}
    result = subprocess.run(
        [sys.executable, "-m", module], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and "redis_shards must be between 1 and 1024" in result.stderr, result.stderr


def test_a_worker_needs_a_slot_for_each_shard_its_queues_fall_in() -> None:
    queues = spread(Keys("jobgate", SHARDS), 3)
    with pytest.raises(ValueError, match="concurrency must be at least 3"):
        WorkerSettings(queues=",".join(queues), concurrency=2, redis_shards=SHARDS).validate()
