"""When a gateway's scheduler runs a placement pass (gateway/scheduler.py): which events ask for one,
and that a running scheduler acts on them between its ticks, against a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from gateway.scheduler import Scheduler
from gateway.validation import Limits, prepare
from jobgate.v1 import job_pb2
from protocol.gateway_calls import GatewayCalls
from protocol.keys import Keys
from protocol.replies import Placed, Placement
from protocol.worker_calls import WorkerCalls

from .helpers import eventually, registration, request

S = job_pb2
LIMITS = Limits(max_payload_bytes=1 << 20, default_timeout_ms=60_000, max_batch=100, max_watch_ids=100)
PLACE_MOST = 2  # per pass and queue
TICK_S = 600  # no periodic pass within a test: every pass here was asked for


@pytest.fixture
def scheduler(redis: Redis, keys: Keys) -> Scheduler:
    store = GatewayCalls(redis, keys, idempotency_ttl_s=600, place_most=PLACE_MOST)
    return Scheduler(store, tick_s=TICK_S)


def asked(s: Scheduler) -> set[str]:
    """The queues a pass has been asked for and not run yet (none unless the scheduler was woken)."""
    return set(s._dirty) if s._wake.is_set() else set()


def placed(queue: str, *, n: int = 0, lost: int = 0, waiting: bool = True) -> Placed:
    """What a placing script reports for ``queue``: ``n`` placements, ``lost`` of them reaching nobody."""
    ps = [Placement(f"{i:032x}", "w1", i + 1, 1, i >= lost) for i in range(n)]
    return Placed(ps, {queue} if waiting else set(), {queue})


def test_a_kick_asks_for_a_pass_on_a_valid_queue_name_only(scheduler: Scheduler) -> None:
    for bad in ("", "has space", "{tag}*", "q" * 65, "default\n"):
        scheduler.kick(bad)
    assert asked(scheduler) == set()
    scheduler.kick("billing")
    assert asked(scheduler) == {"billing"}


def test_a_freed_slot_asks_for_a_pass_only_where_jobs_are_known_to_wait(scheduler: Scheduler) -> None:
    scheduler.slot_freed("default")
    assert asked(scheduler) == set()  # nothing known to wait there
    scheduler.record(placed("default", n=1))  # a pass that left jobs waiting
    assert asked(scheduler) == set()  # under its limit, nothing lost: no more to do for now
    scheduler.slot_freed("other")
    assert asked(scheduler) == set()
    scheduler.slot_freed("default")
    assert asked(scheduler) == {"default"}


def test_a_pass_that_emptied_its_queue_stops_freed_slots_asking_for_more(scheduler: Scheduler) -> None:
    scheduler.record(placed("default", n=1))
    scheduler.record(placed("default", n=1, waiting=False))
    scheduler.slot_freed("default")
    assert asked(scheduler) == set()


def test_a_pass_that_stopped_at_its_limit_asks_for_another(scheduler: Scheduler) -> None:
    scheduler.record(placed("default", n=PLACE_MOST - 1))
    assert asked(scheduler) == set()
    scheduler.record(placed("default", n=PLACE_MOST))
    assert asked(scheduler) == {"default"}


def test_a_pass_that_lost_a_dispatch_asks_for_another_while_jobs_wait(scheduler: Scheduler) -> None:
    scheduler.record(placed("default", n=1, lost=1, waiting=False))  # the queue is empty after all
    assert asked(scheduler) == set()
    scheduler.record(placed("default", n=1, lost=1))
    assert asked(scheduler) == {"default"}
    assert scheduler.metrics.registry.get_sample_value("jobgate_gateway_dispatches_lost_total") == 2


# --- a running scheduler, against a real Redis ----------------------------------------------------


@contextlib.asynccontextmanager
async def running_scheduler(scheduler: Scheduler, redis: Redis, keys: Keys) -> AsyncIterator[None]:
    """The scheduler's loop, with a subscriber on worker w1's channel so that placements reach it."""
    stop = asyncio.Event()
    async with redis.pubsub() as ps:
        await ps.subscribe(keys.dispatch_channel("w1"))
        task = asyncio.create_task(scheduler.run(stop))
        scheduler.kick_all()  # the first pass, as the hub asks for once it has subscribed
        try:
            yield
        finally:
            stop.set()
            scheduler.kick_all()  # wakes the loop to see the stop
            await asyncio.wait_for(task, 10)


async def submit_waiting(redis: Redis, keys: Keys, queue: str) -> str:
    """Stores a job that waits: this store places nothing at submit, and no worker is registered."""
    store = GatewayCalls(redis, keys, idempotency_ttl_s=600, place_most=0)
    [job], _ = await store.submit([prepare(request("echo", queue=queue), LIMITS)])
    return job.id


def counted_waiting(s: Scheduler, queue: str) -> float | None:
    return s.metrics.registry.get_sample_value("jobgate_queue_jobs_waiting", {"queue": queue})


async def dispatched(redis: Redis, keys: Keys, *job_ids: str) -> bool:
    states = [int(await redis.hget(keys.job(j), "state") or 0) for j in job_ids]
    return states == [S.JOB_STATE_DISPATCHED] * len(job_ids)


async def test_jobs_the_census_counts_waiting_make_a_freed_slot_ask_for_a_pass(
    scheduler: Scheduler, redis: Redis, keys: Keys
) -> None:
    """The census (run on each tick, and when workers come or go) is how a gateway learns of jobs
    that other gateways stored."""
    await submit_waiting(redis, keys, "default")
    await scheduler._census(["default", "empty"])
    assert (counted_waiting(scheduler, "default"), counted_waiting(scheduler, "empty")) == (1, 0)
    scheduler.slot_freed("empty")
    assert asked(scheduler) == set()
    scheduler.slot_freed("default")
    assert asked(scheduler) == {"default"}


async def test_a_slot_freed_where_the_census_found_waiting_jobs_runs_a_pass_between_ticks(
    scheduler: Scheduler, redis: Redis, keys: Keys
) -> None:
    job_id = await submit_waiting(redis, keys, "default")
    async with running_scheduler(scheduler, redis, keys):
        await eventually(lambda: counted_waiting(scheduler, "default") == 1, timeout=5, what="the first census")
        await WorkerCalls(redis, keys).heartbeat(registration("w1"))  # a free slot, and no pass asked for
        scheduler.slot_freed("default")
        await eventually(lambda: dispatched(redis, keys, job_id), timeout=5, what="the waiting job placed")


async def test_a_worker_joining_runs_a_pass_on_every_queue(scheduler: Scheduler, redis: Redis, keys: Keys) -> None:
    jobs = {q: await submit_waiting(redis, keys, q) for q in ("a", "b")}
    async with running_scheduler(scheduler, redis, keys):
        await eventually(
            lambda: counted_waiting(scheduler, "a") == counted_waiting(scheduler, "b") == 1,
            timeout=5,
            what="the first census",
        )
        await WorkerCalls(redis, keys).heartbeat(registration("w1", queues=["a", "b"]))
        scheduler.kick_all()
        await eventually(lambda: dispatched(redis, keys, *jobs.values()), timeout=5, what="both queues' jobs placed")
