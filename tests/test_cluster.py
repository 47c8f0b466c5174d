"""jobgate on a Redis Cluster of real processes (3 primaries, 3 replicas): namespaces on every shard
run the end-to-end contract, and a primary killed or a slot moved under load loses nothing
acknowledged (the checker of ``tests/chaos.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from redis import Redis as SyncRedis

from devtools.devstack import Stack
from devtools.servers import ClusterProcess
from gateway.acl import setuser
from gateway.validation import Limits, prepare
from jobgate.v1 import job_pb2, scheduler_pb2
from protocol.connection import redis_client
from protocol.gateway_calls import GatewayCalls
from protocol.keys import Keys

from .chaos import Checker, checking
from .helpers import FAST, Client, call_failed, request
from .test_chaos import accepted_again, under_load

pytestmark = pytest.mark.slow
S = job_pb2
PASSWORD = "cluster-secret-1"
LIMITS = Limits(max_payload_bytes=1 << 20, default_timeout_ms=60_000, max_batch=100, max_watch_ids=100)
DURABLE = {**FAST, "JOBGATE_REDIS_WAIT_REPLICAS": "1", "JOBGATE_REDIS_WAIT_TIMEOUT_MS": "1000"}


def namespace_on(cluster: ClusterProcess, primary: int, taken: set[str]) -> str:
    """A namespace whose keys the primary on port ``primary`` serves."""
    for n in range(100_000):
        name = f"c{n}"
        if name not in taken and cluster.primary_for_slot(cluster.slot(Keys(name).queues())) == primary:
            taken.add(name)
            return name
    raise AssertionError(f"no namespace lands on {primary}")


async def test_namespaces_on_every_shard_run_jobs_end_to_end(
    cluster: ClusterProcess, client_for: Callable[..., Client]
) -> None:
    taken: set[str] = set()
    stacks = []
    try:
        for primary in cluster.primaries():
            namespace = namespace_on(cluster, primary, taken)
            # The least user `python -m gateway.acl --cluster` prints, on every node.
            for port in cluster.ports:
                with SyncRedis(port=port) as node:
                    node.execute_command(*setuser(namespace, namespace, PASSWORD, cluster=True).split())
            url = cluster.url.replace("redis+cluster://", f"redis+cluster://{namespace}:{PASSWORD}@")
            stack = Stack(url, namespace, env=DURABLE)
            stacks.append((primary, stack))
            stack.start_worker()
        for primary, stack in stacks:
            client = client_for(stack.start_gateway()[1])
            jobs = [request("echo", {"i": i}) for i in range(50)]
            # large ones too: their specs and outputs are read with plain HGETs, not through scripts
            jobs += [request("echo", payload=bytes([i]) * 10_000) for i in range(5)]
            reply = await client.stub.SubmitJobs(scheduler_pb2.SubmitJobsRequest(jobs=jobs), timeout=10)
            ids = [j.id for j in reply.jobs]
            events = await client.wait_results(ids)
            assert {i: e.state for i, e in events.items()} == dict.fromkeys(ids, S.JOB_STATE_SUCCEEDED)
            assert [events[i].output for i in ids[50:]] == [bytes([i]) * 10_000 for i in range(5)]
            run = scheduler_pb2.RunJobRequest(job=request("echo"))
            states = [r.event.state async for r in client.stub.RunJob(run, timeout=10)]
            assert states[0] == S.JOB_STATE_QUEUED and states[-1] == S.JOB_STATE_SUCCEEDED
            with SyncRedis(port=primary) as node:  # the namespace's jobs live on its shard
                assert node.exists(*(Keys(stack.namespace).job(i) for i in ids)) == len(ids)
        for port in cluster.ports:  # nothing the scripts or the clients sent was denied
            with SyncRedis(port=port) as node:
                assert node.acl_log() == [], port
    finally:
        for _, stack in stacks:
            stack.stop()


async def test_a_large_spec_goes_beside_its_submit_in_a_cluster_transaction_even_after_the_nodes_forgot_the_scripts(
    cluster: ClusterProcess,
) -> None:
    """Without redis_wait_replicas, a cluster's submit of a spec over 4 KiB is the cluster client's
    own MULTI/EXEC; NOSCRIPT inside it (a restarted or promoted node has no scripts) loads the
    script and sends the transaction again."""
    client = redis_client(cluster.url, 10)
    keys = Keys("apart")
    try:
        for port in cluster.ports:
            with SyncRedis(port=port) as node:
                node.script_flush()
        calls = GatewayCalls(client, keys, idempotency_ttl_s=60, place_most=0)
        assert calls.writes_apart
        prepared = prepare(request("echo", payload=b"P" * 6000), LIMITS)
        [job], _ = await calls.submit([prepared])
        assert await client.hget(keys.job(job.id), "spec") == prepared.spec_bytes
        assert (await calls.get(job.id)).state == S.JOB_STATE_QUEUED
    finally:
        await client.aclose()


SHARDS = 6


async def test_one_namespace_spreads_its_queues_over_every_primary_with_redis_shards(
    cluster: ClusterProcess, client_for: Callable[..., Client]
) -> None:
    """With redis_shards, the queues of one namespace live on different nodes, each with its shard
    channels; one worker serves a queue on each, and the ACL user of ``python -m gateway.acl
    --cluster`` covers every shard. Without redis_wait_replicas, large specs and outputs are
    written beside their script calls in the cluster client's own transactions, on each node."""
    namespace, queues = spread_namespace(cluster)
    for port in cluster.ports:
        with SyncRedis(port=port) as node:
            node.execute_command(*setuser(namespace, namespace, PASSWORD, cluster=True).split())
    url = cluster.url.replace("redis+cluster://", f"redis+cluster://{namespace}:{PASSWORD}@")
    stack = Stack(url, namespace, env={**FAST, "JOBGATE_REDIS_SHARDS": str(SHARDS)})
    keys = Keys(namespace, SHARDS)
    try:
        stack.start_worker(env={"JOBGATE_QUEUES": ",".join(queues.values()), "JOBGATE_CONCURRENCY": "9"})
        client = client_for(stack.start_gateway()[1])
        jobs = [request("echo", {"i": i}, queue=q) for i in range(20) for q in queues.values()]
        large = [request("echo", payload=bytes([i]) * 10_000, queue=q) for i, q in enumerate(queues.values())]
        reply = await client.stub.SubmitJobs(scheduler_pb2.SubmitJobsRequest(jobs=jobs + large), timeout=10)
        ids = [j.id for j in reply.jobs]
        events = await client.wait_results(ids)
        assert {i: e.state for i, e in events.items()} == dict.fromkeys(ids, S.JOB_STATE_SUCCEEDED)
        large_ids = ids[len(jobs) :]
        assert [events[i].output for i in large_ids] == [bytes([i]) * 10_000 for i in range(len(large))]
        for primary, queue in queues.items():  # each queue's jobs on the node serving its shard
            with SyncRedis(port=primary) as node:
                mine = [j.id for j in reply.jobs if j.spec.queue == queue]
                assert node.exists(*(keys.job(i) for i in mine)) == len(mine), (primary, queue)
                [kept] = [i for i in large_ids if i in mine]  # its output in a key of its own there
                assert node.hget(keys.job(kept), "big_output") == b"1" and node.exists(keys.job_apart(kept, "output"))
        for port in cluster.ports:  # nothing the scripts or the clients sent was denied
            with SyncRedis(port=port) as node:
                assert node.acl_log() == [], port
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()


def spread_namespace(cluster: ClusterProcess) -> tuple[str, dict[int, str]]:
    """A namespace whose shards cover every primary, and a queue for each primary (by port)."""
    for n in range(1000):
        keys = Keys(f"s{n}", SHARDS)
        owners = {s: cluster.primary_for_slot(cluster.slot(keys.at(s).queues())) for s in range(SHARDS)}
        if set(owners.values()) == set(cluster.primaries()):
            queues: dict[int, str] = {}
            for i in range(10_000):
                queues.setdefault(owners[keys.queue_shard(f"q{i}")], f"q{i}")
                if len(queues) == len(cluster.primaries()):
                    return keys.namespace, queues
    raise AssertionError("no namespace spreads over every primary")


@pytest.fixture
async def cluster_checker(
    request: pytest.FixtureRequest, cluster: ClusterProcess, namespace: str
) -> AsyncIterator[Checker]:
    stack = Stack(cluster.url, namespace, env=DURABLE)
    admin = redis_client(cluster.url, 15)
    async with checking(stack, admin, failed=lambda: call_failed(request)) as c:
        yield c


@pytest.fixture
async def spread_checker(request: pytest.FixtureRequest, cluster: ClusterProcess) -> AsyncIterator[Checker]:
    """A stack whose namespace spreads its queues over every primary (redis_shards), its workers
    serving them all and the checker's jobs going to each in turn."""
    namespace, queues = spread_namespace(cluster)
    env = {**DURABLE, "JOBGATE_REDIS_SHARDS": str(SHARDS), "JOBGATE_QUEUES": ",".join(queues.values())}
    stack = Stack(cluster.url, namespace, env=env)
    admin = redis_client(cluster.url, 15)
    async with checking(stack, admin, failed=lambda: call_failed(request)) as c:
        yield c


async def test_a_primary_killed_under_load_with_queues_on_every_primary_loses_nothing_acknowledged(
    cluster: ClusterProcess, spread_checker: Checker
) -> None:
    """Jobs flow on a queue of each primary; one primary is SIGKILLed and its replica promoted: every
    acknowledged job, on every shard, runs to its one outcome."""
    checker = spread_checker
    flow = await under_load(checker, complete=False)
    victim = cluster.primary_for_slot(cluster.slot(checker.keys.of_queue(checker.queues[0]).queues()))
    cluster.kill(victim)
    await asyncio.to_thread(cluster.wait_failover, victim)
    await asyncio.to_thread(cluster.restart, victim)  # a replica again, so that writes are confirmed
    await accepted_again(checker, 100)
    await flow.finish(checker)
    await checker.verify_succeeded(flow.gw)
    assert len(checker.cluster.live()) == 3  # no gateway or worker restarted


async def test_a_primary_killed_under_load_loses_nothing_acknowledged_and_records_one_outcome_per_job(
    cluster: ClusterProcess, cluster_checker: Checker, namespace: str
) -> None:
    checker = cluster_checker
    flow = await under_load(checker, complete=False)  # pub/sub loses what is published while the shard is away
    victim = cluster.primary_for_slot(cluster.slot(Keys(namespace).queues()))
    cluster.kill(victim)
    await asyncio.to_thread(cluster.wait_failover, victim)
    # The promoted replica has no replica of its own until the old primary comes back as one:
    # meanwhile every submit waits for a replica in vain and answers UNAVAILABLE.
    await asyncio.to_thread(cluster.restart, victim)
    await accepted_again(checker, 100)
    await flow.finish(checker)
    await checker.verify_succeeded(flow.gw)
    assert len(checker.cluster.live()) == 3  # no gateway or worker restarted


async def test_a_slot_moved_to_another_primary_under_load_loses_nothing_acknowledged(
    cluster: ClusterProcess, cluster_checker: Checker, namespace: str
) -> None:
    checker = cluster_checker
    # The shard channels move with the slot: what is published before they are subscribed again on the
    # new node is missed, and the streams that cannot re-read it say so (UNAVAILABLE); jobs lose nothing.
    flow = await under_load(checker, complete=False, job_s=0.2)
    slot = cluster.slot(Keys(namespace).queues())
    source = cluster.primary_for_slot(slot)
    target = next(p for p in cluster.primaries() if p != source)
    await asyncio.to_thread(cluster.reshard, slot, target)
    assert cluster.primary_for_slot(slot) == target
    await accepted_again(checker, 100)
    await flow.finish(checker)
    await checker.verify_succeeded(flow.gw)
