"""Load under faults: hundreds of jobs in flight while a worker, a gateway, Redis or a client fails,
then the checker of ``tests/chaos.py``: nothing lost, one outcome per job, nothing invented, and
memory, asyncio tasks and Redis subscriptions back to their baseline. Real processes, real Redis."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from redis.asyncio import Redis

from devtools.devstack import Stack
from devtools.servers import RedisProcess
from jobgate.v1 import job_pb2, scheduler_pb2, scheduler_pb2_grpc

from .chaos import Checker, Cluster, Node, Stream, checking
from .helpers import FAST, call_failed, eventually
from .processes import logged

pytestmark = pytest.mark.slow
S = job_pb2
# Room for a burst of completions on the checker's unfiltered streams (RESOURCE_EXHAUSTED is tested
# on its own, with a slow watcher).
ROOMY = {"JOBGATE_STREAM_BUFFER": "20000"}


@pytest.fixture
async def checker(stack: Stack, redis: Redis) -> AsyncIterator[Checker]:
    c = Checker(Cluster(stack), redis)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def private_checker(
    request: pytest.FixtureRequest, private_redis: RedisProcess, namespace: str
) -> AsyncIterator[Checker]:
    stack = Stack(private_redis.url, namespace, env=FAST)
    admin = Redis.from_url(private_redis.url, socket_timeout=15)
    async with checking(stack, admin, failed=lambda: call_failed(request)) as c:
        yield c


# --- helpers ------------------------------------------------------------------------------------


async def warm_up(checker: Checker, gw: Node, jobs: int = 200) -> None:
    """Once every worker has registered, runs a first load to completion, then takes the baseline
    (no stream open)."""
    await eventually(lambda: workers_listed(checker, gw), what="every worker registered")
    for start in range(0, jobs, 1000):
        batch = [checker.job("echo", {"warm": True}) for _ in range(min(1000, jobs - start))]
        assert isinstance(await checker.submit(gw, batch, timeout=30), list)
    await checker.wait_streams(60)
    await checker.take_baseline()


async def load(
    checker: Checker,
    gateways: list[Node],
    batches: int,
    make: Callable[[], scheduler_pb2.SubmitJobRequest],
    *,
    size: int = 50,
    pace_s: float = 0.05,
) -> None:
    """Submits ``batches`` batches of ``size``, each followed by a job_ids stream; a batch that fails
    goes to the next gateway."""
    turn = 0
    for _ in range(batches):
        for _ in range(len(gateways)):
            gw = gateways[turn % len(gateways)]
            if gw.alive() and isinstance(await checker.submit(gw, [make() for _ in range(size)]), list):
                break
            turn += 1
        await asyncio.sleep(pace_s)  # pacing the load, not waiting for anything


async def workers_listed(checker: Checker, gw: Node) -> bool:
    reply = await checker.stub(gw).ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=5)
    return {w.id for w in reply.workers} == {w.worker_id for w in checker.cluster.workers if w.alive()}


async def running_on(node: Node, least: int) -> bool:
    return (await node.metrics()).get("jobgate_worker_jobs_running", 0) >= least


def sleep_job(checker: Checker, seconds: float, **fields: object) -> Callable[[], scheduler_pb2.SubmitJobRequest]:
    return lambda: checker.job("sleep", {"seconds": seconds}, **fields)


def assert_run_streams_end_terminal(checker: Checker) -> None:
    for s in checker.streams:
        if s.kind == "run":
            assert s.error is None and s.states, f"{s.name}: {s.error}"
            assert s.states[-1] in (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED)
            assert all(st not in (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED) for st in s.states[:-1])


# --- workers ------------------------------------------------------------------------------------


async def test_a_worker_killed_under_load_loses_no_job_and_records_none_twice(checker: Checker) -> None:
    cluster = checker.cluster
    gw = cluster.gateway(env=ROOMY)
    victim = cluster.worker("--concurrency", "40")
    for _ in range(2):
        cluster.worker("--concurrency", "40")
    await warm_up(checker, gw)
    checker.watch_all(gw)
    loader = asyncio.create_task(load(checker, [gw], 12, sleep_job(checker, 0.3)))
    for _ in range(20):
        checker.run_job(gw, checker.job("sleep", {"seconds": 0.5}))
    await eventually(lambda: running_on(victim, 20), what="jobs running on the victim")
    victim.service.kill()
    await asyncio.wait_for(loader, 60)
    await checker.wait_streams(60)
    report = await checker.verify_succeeded(gw)
    retried = [e for e in report.outcomes.values() if e.attempt >= 2]
    assert retried, "some jobs were running on the victim when it was killed"
    assert all(e.worker_id != victim.worker_id for e in retried)
    assert_run_streams_end_terminal(checker)
    await checker.check_leaks()


async def test_retries_and_delayed_jobs_with_a_worker_and_a_gateway_killed_end_once_each(checker: Checker) -> None:
    """Failing jobs retried after their backoff, delayed jobs waiting for their time, while a worker
    is SIGKILLed under load and the gateway that accepted the delayed jobs is SIGKILLed before they
    are due: each job ends once, as its kind says, with a history that adds up."""
    cluster = checker.cluster
    accepting, gw = cluster.gateway(env=ROOMY), cluster.gateway(env=ROOMY)
    victim = cluster.worker("--concurrency", "30")
    for _ in range(2):
        cluster.worker("--concurrency", "30")
    await warm_up(checker, gw)
    checker.watch_all(gw)
    quick = job_pb2.RetryPolicy(initial_backoff=Duration(nanos=200_000_000), multiplier=2)
    delayed = [checker.job("echo", {"delayed": True}, delay=Duration(seconds=3)) for _ in range(300)]
    waiting = await checker.submit(accepting, delayed, watch=False)
    assert isinstance(waiting, list)
    checker.follow(gw, waiting, name="delayed")  # on the gateway that stays
    checker.unwatched = [j for j in checker.unwatched if j not in set(waiting)]
    mixes = [
        lambda: checker.job("flaky", {"succeed_at": 2}, retry=quick),
        lambda: checker.job("fail", {"message": "always"}, max_attempts=2, retry=quick),
        sleep_job(checker, 0.3),
    ]
    loaders = [asyncio.create_task(load(checker, [gw], 8, make, size=30)) for make in mixes]
    await eventually(lambda: running_on(victim, 10), what="jobs running on the victim")
    victim.service.kill()
    accepting.service.kill()
    await asyncio.wait_for(asyncio.gather(*loaders), 90)
    await checker.wait_streams(90)
    report = await checker.verify(gw)
    report.assert_ok()
    assert not await checker.histories(gw, report.outcomes)
    by_kind: dict[str, set[tuple[int, str]]] = {}
    stub = checker.stub(gw)
    for job_id, event in report.outcomes.items():
        job = (await stub.GetJob(scheduler_pb2.GetJobRequest(id=job_id), timeout=10)).job
        code = event.error.code if event.state == S.JOB_STATE_FAILED else ""
        by_kind.setdefault(job.spec.kind, set()).add((event.state, code))
        if job.spec.HasField("delay"):
            # due 3 s after the gateway read its clock, a moment before the script stored created_at
            assert job.started_at.ToMilliseconds() >= job.created_at.ToMilliseconds() + 3000 - 100, job_id
    assert by_kind["flaky"] <= {(S.JOB_STATE_SUCCEEDED, ""), (S.JOB_STATE_FAILED, "WORKER_LOST")}
    assert (S.JOB_STATE_SUCCEEDED, "") in by_kind["flaky"]
    assert by_kind["fail"] <= {(S.JOB_STATE_FAILED, "HANDLER_ERROR"), (S.JOB_STATE_FAILED, "WORKER_LOST")}
    assert by_kind["echo"] == {(S.JOB_STATE_SUCCEEDED, "")}  # the delayed ones, queued by the survivor


async def test_a_worker_stopped_under_load_finishes_short_jobs_and_hands_long_ones_back(checker: Checker) -> None:
    cluster = checker.cluster
    gw = cluster.gateway(env=ROOMY)
    leaving = cluster.worker("--concurrency", "60", env={"JOBGATE_GRACE_S": "1.5"})
    await warm_up(checker, gw)
    checker.watch_all(gw)
    short, long = sleep_job(checker, 0.3), sleep_job(checker, 4)
    # 50 long jobs hold most of its 60 slots; short ones keep the other 10 busy.
    await load(checker, [gw], 2, long, size=15, pace_s=0)
    for _ in range(20):
        checker.run_job(gw, long())
    loader = asyncio.create_task(load(checker, [gw], 10, short, size=40, pace_s=0.1))
    await eventually(lambda: running_on(leaving, 58), what="the leaving worker's slots all busy")
    staying = [cluster.worker("--concurrency", "60") for _ in range(2)]
    assert await asyncio.to_thread(leaving.service.terminate, 30) == 0
    await asyncio.wait_for(loader, 60)
    await checker.wait_streams(60)
    report = await checker.verify_succeeded(gw)
    log = leaving.service.log()
    drained = log[log.index("draining") :]
    handed = set(re.findall(r"job_id=([0-9a-f]{32}) handed back", drained))
    finished = set(re.findall(r"job_id=([0-9a-f]{32}) finished", drained))
    assert handed and finished, "long jobs handed back, short ones finished during the grace period"
    # Handed back, not reaped: the interrupted runs gave their attempt back, and others ran them.
    assert {report.outcomes[j].attempt for j in handed} == {1}
    assert {report.outcomes[j].worker_id for j in handed} <= {w.worker_id for w in staying}
    assert_run_streams_end_terminal(checker)
    await checker.check_leaks()


async def test_a_worker_paused_past_its_lease_has_its_late_outcomes_refused(checker: Checker) -> None:
    cluster = checker.cluster
    gw = cluster.gateway(env=ROOMY)
    frozen = cluster.worker("--concurrency", "40")
    for _ in range(2):
        cluster.worker("--concurrency", "40")
    await warm_up(checker, gw)
    checker.watch_all(gw)
    loader = asyncio.create_task(load(checker, [gw], 12, sleep_job(checker, 0.5)))
    await eventually(lambda: running_on(frozen, 20), what="jobs running on the worker to pause")
    frozen.service.signal(signal.SIGSTOP)
    try:
        held = {m.decode() for m in await checker.redis.smembers(checker.keys.worker_jobs(frozen.worker_id))}
        assert held
        # its registration expires, and its jobs are placed on the others and finished there
        await eventually(lambda: all_terminal(checker, held), timeout=60, what="the paused worker's jobs finished")
    finally:
        resumed_at = time.time()
        frozen.service.signal(signal.SIGCONT)
    # On waking it either tries to record its late outcomes (refused: stale lease) or first learns
    # from its heartbeat that it was evicted and abandons them; then it takes jobs again.
    await eventually(
        lambda: logged(frozen.service, "outcome discarded", "abandoning"), what="late outcomes refused or abandoned"
    )
    await asyncio.wait_for(loader, 60)
    await checker.submit(gw, [checker.job("sleep", {"seconds": 0.1}) for _ in range(100)])
    await checker.wait_streams(60)
    report = await checker.verify_succeeded(gw)
    late = finished_since(frozen, resumed_at) & held
    assert not late, f"outcomes of superseded attempts accepted after the pause: {sorted(late)[:5]}"
    before = finished_since(frozen, 0) & held  # recorded in the instant before the pause
    assert all(report.outcomes[j].worker_id != frozen.worker_id for j in held - before)
    await checker.check_leaks()


async def all_terminal(checker: Checker, job_ids: set[str]) -> bool:
    pipe = checker.redis.pipeline(transaction=False)
    for j in job_ids:
        pipe.hget(checker.keys.job(j), "state")
    return all(int(s or 0) in (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED) for s in await pipe.execute())


def finished_since(node: Node, since: float) -> set[str]:
    """Jobs the node logged as finished at or after ``since`` (epoch seconds, to the log's millisecond)."""
    out = set()
    for m in re.finditer(r"^(\S+ \S+),(\d{3}) .*job_id=([0-9a-f]{32}) finished", node.service.log(), re.M):
        stamp = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
        if stamp >= since - 0.001:
            out.add(m.group(3))
    return out


async def test_ten_thousand_jobs_queued_with_no_worker_all_run_once_workers_start(checker: Checker) -> None:
    cluster = checker.cluster
    gw = cluster.gateway(env=ROOMY)
    await checker.submit(gw, [checker.job("echo", {"warm": True})])
    first = cluster.worker("--concurrency", "64")
    await checker.wait_streams(30)
    await checker.take_baseline()
    await asyncio.to_thread(first.service.terminate)
    await eventually(lambda: no_workers(checker, gw), what="the warm-up worker gone")
    checker.watch_all(gw)
    for _ in range(10):
        await checker.submit(gw, [checker.job("echo", {"n": i}) for i in range(1000)], timeout=30)
    assert len(checker.acked) == 10_001
    workers = [cluster.worker("--concurrency", "64") for _ in range(3)]
    await checker.wait_streams(120)
    report = await checker.verify_succeeded(gw)
    finished = checker.finished_lines()
    assert all(len(finished[j]) == 1 for j in checker.acked), "each job recorded by exactly one finish"
    assert {e.worker_id for e in report.outcomes.values()} - {first.worker_id} <= {w.worker_id for w in workers}
    await checker.check_leaks()


async def no_workers(checker: Checker, gw: Node) -> bool:
    reply = await checker.stub(gw).ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=5)
    return not reply.workers


# --- Redis --------------------------------------------------------------------------------------


class Calls:
    """SubmitJob calls of the submit loops, with when they began and ended (monotonic seconds)."""

    def __init__(self) -> None:
        self.log: list[tuple[float, float, str, grpc.StatusCode]] = []  # began, ended, tag, status

    def within(self, start: float, end: float) -> list[tuple[float, float, str, grpc.StatusCode]]:
        """Calls that began after ``start`` and ended before ``end``."""
        return [c for c in self.log if c[0] > start and c[1] < end]


async def submit_loop(
    checker: Checker, gw: Node, stop: asyncio.Event, calls: Calls, *, deadline_s: float = 5, seconds: float = 0.2
) -> None:
    """One SubmitJob after another until ``stop``; job_ids streams opened every 25 acknowledgements."""
    while not stop.is_set():
        req = checker.job("sleep", {"seconds": seconds})
        began = time.monotonic()
        result = await checker.submit(gw, [req], timeout=deadline_s, watch=False)
        status = grpc.StatusCode.OK if isinstance(result, list) else result
        calls.log.append((began, time.monotonic(), checker.tag(req), status))
        if len(checker.unwatched) >= 25:
            checker.follow(gw)
        if status != grpc.StatusCode.OK:
            await asyncio.sleep(0.05)  # a client's back-off


async def finish_load(checker: Checker, gw: Node, stop: asyncio.Event, loops: list[asyncio.Task[None]]) -> None:
    """Stops the submit loops, follows what they left unwatched, and resumes broken streams on ``gw``."""
    stop.set()
    await asyncio.wait_for(asyncio.gather(*loops), 30)
    checker.follow(gw)
    await checker.wait_streams(90)
    if checker.broken():
        await checker.resume(gw, 90)


@dataclass
class Load:
    """Jobs flowing through one gateway: its submit loops, and what they did."""

    gw: Node
    stop: asyncio.Event
    calls: Calls
    loops: list[asyncio.Task[None]]

    async def finish(self, checker: Checker) -> None:
        await finish_load(checker, self.gw, self.stop, self.loops)


async def under_load(checker: Checker, *, complete: bool, job_s: float = 0.5, deadline_s: float = 5) -> Load:
    """A gateway and two workers (40 slots each), warmed up; an unfiltered stream on the gateway
    (``complete``: it must miss nothing); four SubmitJob loops and batches of ``job_s`` sleep jobs,
    until hundreds of jobs are acknowledged."""
    gw = checker.cluster.gateway(env=ROOMY)
    for _ in range(2):
        checker.cluster.worker("--concurrency", "40")
    await warm_up(checker, gw)
    checker.watch_all(gw, complete=complete)
    stop, calls = asyncio.Event(), Calls()
    loops = [asyncio.create_task(submit_loop(checker, gw, stop, calls, deadline_s=deadline_s)) for _ in range(4)]
    await load(checker, [gw], 6, sleep_job(checker, job_s))
    await eventually(lambda: acked_at_least(checker, 400), what="hundreds of jobs acknowledged")
    return Load(gw, stop, calls, loops)


async def test_redis_restarted_under_load_answers_unavailable_and_keeps_everything_acknowledged(
    private_checker: Checker, private_redis: RedisProcess
) -> None:
    checker = private_checker
    flow = await under_load(checker, complete=False)  # pub/sub loses what is published while Redis is away
    gw, stop, calls, loops = flow.gw, flow.stop, flow.calls, flow.loops
    killed = time.monotonic()
    private_redis.kill()
    await eventually(lambda: failed_since(calls, killed, 20), what="submits failing during the outage")
    restarted = time.monotonic()
    private_redis.start()
    await accepted_again(checker, 100)
    await finish_load(checker, gw, stop, loops)
    await checker.verify_succeeded(gw)
    during = calls.within(killed, restarted)
    assert during and {c[3] for c in during} == {grpc.StatusCode.UNAVAILABLE}, Counter(c[3] for c in during)
    stored = set(checker.unacked_outcomes.values()) & {c[2] for c in during}
    assert not stored, f"submits answered UNAVAILABLE during the outage stored jobs: {sorted(stored)[:5]}"
    await checker.check_leaks()


async def accepted_again(checker: Checker, more: int = 50) -> None:
    acked = len(checker.acked)
    await eventually(lambda: acked_at_least(checker, acked + more), what="submits accepted again")


async def acked_at_least(checker: Checker, n: int) -> bool:
    return len(checker.acked) >= n


async def failed_since(calls: Calls, since: float, n: int) -> bool:
    """At least ``n`` calls that ended after ``since`` failed."""
    return sum(1 for c in calls.log if c[1] > since and c[3] != grpc.StatusCode.OK) >= n


async def test_redis_paused_under_load_gives_deadline_or_unavailable_and_keeps_everything_acknowledged(
    private_checker: Checker, private_redis: RedisProcess
) -> None:
    checker = private_checker
    flow = await under_load(checker, complete=False, deadline_s=1)
    gw, stop, calls, loops = flow.gw, flow.stop, flow.calls, flow.loops
    admin = checker.redis
    began = time.monotonic()
    await admin.execute_command("CLIENT", "PAUSE", 1500, "ALL")
    await eventually(lambda: failed_since(calls, began, 4), what="submits failing during CLIENT PAUSE")
    await accepted_again(checker)
    sleeper = Redis.from_url(private_redis.url, socket_timeout=15)
    try:
        slept = time.monotonic()
        await sleeper.execute_command("DEBUG", "SLEEP", 2)  # blocks the server, not this event loop
    finally:
        await sleeper.aclose()
    await eventually(lambda: failed_since(calls, slept, 4), what="submits failing during DEBUG SLEEP")
    await accepted_again(checker)
    await finish_load(checker, gw, stop, loops)
    await checker.verify_succeeded(gw)
    statuses = Counter(c[3] for c in calls.log)
    assert set(statuses) <= {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE}, (
        statuses
    )
    await checker.check_leaks()


# --- gateways and clients -----------------------------------------------------------------------


async def test_a_gateway_killed_mid_stream_loses_no_outcome_for_a_client_that_resumes_elsewhere(
    checker: Checker,
) -> None:
    cluster = checker.cluster
    doomed, other = cluster.gateway(env=ROOMY), cluster.gateway(env=ROOMY)
    for _ in range(3):
        cluster.worker("--concurrency", "40")
    await warm_up(checker, other)
    checker.watch_all(doomed, complete=False)
    checker.watch_all(other)  # its subscription is untouched: it sees every outcome
    loader = asyncio.create_task(load(checker, [doomed, other], 12, sleep_job(checker, 0.3)))
    for _ in range(20):
        checker.run_job(doomed, checker.job("sleep", {"seconds": 0.5}))
    await eventually(lambda: received_at_least(checker, 150), what="outcomes streaming from the doomed gateway")
    doomed.service.kill()
    await asyncio.wait_for(loader, 60)
    await checker.wait_streams(60)
    assert checker.broken(), "the streams of the killed gateway were cut"
    await checker.resume(other, 60)
    await checker.verify_succeeded(other)
    await checker.check_leaks()


async def received_at_least(checker: Checker, n: int) -> bool:
    return len(checker.received()) >= n


async def test_a_gateway_stopped_under_load_turns_not_serving_ends_its_streams_and_others_carry_on(
    checker: Checker,
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    cluster = checker.cluster
    leaving, other = cluster.gateway(env={**ROOMY, "JOBGATE_GRACE_S": "3"}), cluster.gateway(env=ROOMY)
    for _ in range(3):
        cluster.worker("--concurrency", "40")
    await warm_up(checker, other)
    checker.watch_all(leaving, complete=False)
    checker.watch_all(other)
    loader = asyncio.create_task(load(checker, [leaving, other], 12, sleep_job(checker, 0.5)))
    for _ in range(20):
        checker.run_job(leaving, checker.job("sleep", {"seconds": 3}))
    await eventually(lambda: received_at_least(checker, 100), what="outcomes streaming from the leaving gateway")
    async with grpc.aio.insecure_channel(leaving.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        seen = [(await anext(aiter(health))).status]
        leaving.service.signal(signal.SIGTERM)
        async for reply in health:
            seen.append(reply.status)
            if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
    assert seen[0] == health_pb2.HealthCheckResponse.SERVING and seen[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
    assert await asyncio.to_thread(leaving.service.proc.wait, 30) == 0
    assert "stopped" in leaving.service.log()
    await asyncio.wait_for(loader, 60)
    await checker.wait_streams(60)
    # Streams end as soon as the gateway starts stopping, with UNAVAILABLE: resume elsewhere. Under
    # load some RunJob streams reach the client as CANCELLED instead, although their handler ended
    # with UNAVAILABLE (gRPC's server shutdown; see the README): both mean "resume elsewhere".
    ended = Counter((s.kind, s.error) for s in checker.streams if s.name.endswith(f"@{leaving.name}"))
    assert {e for _, e in ended} <= {None, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, ended
    assert {e for k, e in ended if k != "run"} <= {None, grpc.StatusCode.UNAVAILABLE}, ended
    assert ("run", grpc.StatusCode.UNAVAILABLE) in ended, ended
    assert all(s.ended for s in checker.streams if s.name.endswith(f"@{leaving.name}"))
    await checker.resume(other, 60)
    await checker.verify_succeeded(other)
    await checker.check_leaks()


async def streams_open(gw: Node) -> float:
    return (await gw.metrics()).get("jobgate_gateway_streams_open", 0)


async def test_clients_that_go_away_mid_stream_leave_no_stream_or_task_behind(checker: Checker) -> None:
    cluster = checker.cluster
    gw = cluster.gateway(env=ROOMY)
    for _ in range(2):
        cluster.worker("--concurrency", "50")
    await warm_up(checker, gw)
    checker.watch_all(gw)
    await load(checker, [gw], 8, sleep_job(checker, 3), pace_s=0)  # 400 jobs of 3 s on 100 slots
    own = len([s for s in checker.streams if not s.ended])
    ids = list(checker.acked)[-200:]  # none of these starts within 6 s: their streams stay open
    cancelled, closed = grpc.aio.insecure_channel(gw.address), grpc.aio.insecure_channel(gw.address)
    try:
        doomed = []
        for channel in (cancelled, closed):
            doomed += checker.follow(gw, ids, name="doomed", chunk=4, channel=channel)
            doomed += [checker.watch_all(gw, complete=False, channel=channel) for _ in range(20)]
            doomed += [checker.run_job(gw, checker.job("sleep", {"seconds": 1}), channel=channel) for _ in range(50)]
        await eventually(lambda: opened_at_least(gw, own + len(doomed)), what="every stream open on the gateway")
        for s in doomed[: len(doomed) // 2]:  # the calls of one channel cancelled one by one
            checker.cancel(s)
        await closed.close()  # the other channel closed with its calls still open
        await eventually(lambda: ended(doomed), what="the client side of every doomed stream ended")
    finally:
        await cancelled.close()
        await closed.close()
    await eventually(lambda: opened_at_most(gw, own), what="the gateway's doomed streams released")
    await checker.wait_streams(60)
    await checker.resume(gw, 60)  # the RunJob-submitted jobs are followed on a stream of their own
    await checker.verify_succeeded(gw)
    await checker.check_leaks()


async def opened_at_least(gw: Node, n: int) -> bool:
    return await streams_open(gw) >= n


async def opened_at_most(gw: Node, n: int) -> bool:
    return await streams_open(gw) <= n


async def ended(streams: list[Stream]) -> bool:
    return all(s.ended for s in streams)


async def test_a_slow_watcher_and_dropped_pubsub_connections_leave_fast_watchers_complete(
    checker: Checker, redis: Redis
) -> None:
    cluster = checker.cluster
    # The buffer holds a burst for fast watchers (completions come in batches); the slow stream is
    # cut off for falling behind, or ended by the dropped subscription, whichever comes first.
    gw = cluster.gateway(env={"JOBGATE_STREAM_BUFFER": "3000"})
    workers = [cluster.worker("--concurrency", "32") for _ in range(2)]
    await warm_up(checker, gw)
    # No BDP probing: the HTTP/2 window stays small, so an unread stream backs up into the gateway.
    slow_channel = grpc.aio.insecure_channel(gw.address, options=[("grpc.http2.bdp_probe", 0)])
    try:
        slow = scheduler_pb2_grpc.SchedulerServiceStub(slow_channel).WatchResults(
            scheduler_pb2.WatchResultsRequest(), timeout=120
        )
        await eventually(lambda: opened_at_least(gw, 1), what="the slow stream open")
        big = {"pad": "x" * 2000}
        for i in range(8):
            await checker.submit(gw, [checker.job("echo", big) for _ in range(150)], timeout=20)
            if i in (2, 5):
                await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await checker.wait_streams(90)
        assert not checker.broken(), [(s.name, s.error) for s in checker.broken()]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in slow:
                pass
        # Cut off for falling behind, or (when the cut came first) told that events were missed.
        assert err.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
    finally:
        await slow_channel.close()
    await checker.verify_succeeded(gw)
    assert "re-established" in gw.service.log() or "subscription lost" in gw.service.log()
    assert all("re-established" in w.service.log() or "subscription lost" in w.service.log() for w in workers)
    await checker.check_leaks()


# --- a job that kills its worker ----------------------------------------------------------------


async def test_a_poison_job_fails_with_worker_lost_after_its_attempts_and_the_rest_succeed(
    checker: Checker,
) -> None:
    cluster = checker.cluster
    gw = cluster.gateway(env=ROOMY)
    app = ("--app", "tests.apps:chaos", "--concurrency", "20")
    for _ in range(3):
        cluster.worker(*app)
    await warm_up(checker, gw)
    checker.watch_all(gw)
    stop = asyncio.Event()
    supervisor = asyncio.create_task(supervise(cluster, app, 3, stop))
    try:
        normal = sleep_job(checker, 0.2, max_attempts=10)  # may share a worker with a poison job
        await load(checker, [gw], 3, normal)
        poison = await checker.submit(gw, [checker.job("poison", max_attempts=3) for _ in range(3)])
        assert isinstance(poison, list)
        await load(checker, [gw], 6, normal)
        await checker.wait_streams(90)
    finally:
        stop.set()
        await asyncio.wait_for(supervisor, 30)
    report = await checker.verify(gw)
    report.assert_ok()
    for job_id in poison:
        e = report.outcomes[job_id]
        assert (e.state, e.error.code, e.attempt) == (S.JOB_STATE_FAILED, "WORKER_LOST", 3), e
    assert all(e.state == S.JOB_STATE_SUCCEEDED for j, e in report.outcomes.items() if j not in poison)
    starts = checker.started_lines()
    counts = {p: {k: n for k, n in starts.items() if k[0] == p} for p in poison}
    # Never more than max_attempts starts. (A start can be recorded without its log line: two poison
    # jobs on one worker both start, and the first kills the process before the second logs.)
    assert all(1 <= sum(c.values()) <= 3 for c in counts.values()), counts
    assert sum(not w.alive() for w in cluster.workers) >= 3  # poison jobs killed their workers
    await checker.check_leaks()


async def supervise(cluster: Cluster, args: tuple[str, ...], size: int, stop: asyncio.Event) -> None:
    """Keeps ``size`` workers running: starts a new one for each that died."""
    while not stop.is_set():
        for _ in range(size - sum(w.alive() for w in cluster.workers)):
            cluster.worker(*args)
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.2)
        except TimeoutError:
            pass


# --- a short soak -------------------------------------------------------------------------------


async def test_twenty_thousand_jobs_leave_memory_and_tasks_where_warm_up_left_them(checker: Checker) -> None:
    """``make soak`` runs longer; this keeps the suite honest about leaks that show within minutes."""
    cluster = checker.cluster
    gw = cluster.gateway(env=ROOMY)
    for _ in range(2):
        cluster.worker("--concurrency", "64")
    await warm_up(checker, gw, 2000)
    checker.watch_all(gw)
    for _ in range(20):
        sent = len(checker.acked)
        await eventually(
            lambda sent=sent: received_at_least(checker, sent - 3000), timeout=60, what="at most 4,000 in flight"
        )
        await checker.submit(gw, [checker.job("echo", {"n": i}) for i in range(1000)], timeout=30)
    await checker.wait_streams(120)
    report = await checker.verify(gw)
    report.assert_ok()
    assert len(report.outcomes) == 22_000
    await checker.check_leaks(rss_slack_mb=30)
