"""A primary lost and its replica promoted: what ``redis_wait_replicas`` keeps, against real
redis-server processes (a primary, a replica, and a Sentinel that promotes it)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.asyncio.sentinel import MasterNotFoundError

from devtools.devstack import Stack
from devtools.servers import RedisProcess, SentinelProcess, free_port, wait_for
from gateway.acl import setuser
from gateway.validation import Limits, prepare
from jobgate.v1 import job_pb2
from protocol.calls import Durability
from protocol.connection import redis_client
from protocol.errors import NotReplicated
from protocol.gateway_calls import GatewayCalls
from protocol.keys import Keys
from protocol.worker_calls import Outcome, Registration, Start, WorkerCalls

from .chaos import Checker, checking
from .helpers import FAST, call_failed, eventually, request
from .test_chaos import accepted_again, under_load

pytestmark = pytest.mark.slow

S = job_pb2
LIMITS = Limits(max_payload_bytes=1 << 20, default_timeout_ms=60_000, max_batch=100, max_watch_ids=100)
KEYS = Keys("failover")


class Pair:
    """A primary and its replica, both real redis-server processes."""

    def __init__(self) -> None:
        self.primary = RedisProcess().start()
        self.replica = RedisProcess(args=("--replicaof", "127.0.0.1", str(self.primary.port))).start()

    async def attached(self) -> None:
        """Waits until the replica follows the primary, in sync."""
        async with Redis(port=self.replica.port) as r:
            await r.execute_command("REPLICAOF", "127.0.0.1", self.primary.port)
        wait_for(lambda: self._link_up(), 10, "replication link")

    def _link_up(self) -> bool:
        return _link_up(self.replica.port)

    async def detach(self) -> None:
        """The replica stops following the primary (it follows a port nothing listens on): what a
        replica lagging behind, or cut off, looks like to the writes the primary takes now."""
        async with Redis(port=self.replica.port) as r:
            await r.execute_command("REPLICAOF", "127.0.0.1", free_port())

    async def fail_over(self) -> Redis:
        """The primary dies; its replica is promoted (as Sentinel would) and returned as a client."""
        self.primary.kill()
        promoted = Redis(port=self.replica.port)
        await promoted.execute_command("REPLICAOF", "NO", "ONE")
        return promoted

    def stop(self) -> None:
        self.replica.stop()
        self.primary.stop()


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.stop()


@pytest.fixture
async def primary(pair: Pair) -> AsyncIterator[Redis]:
    client = redis_client(pair.primary.url, 5)
    yield client
    await client.aclose()


def gateway_calls(redis: Redis, durability: Durability) -> GatewayCalls:
    return GatewayCalls(redis, KEYS, idempotency_ttl_s=600, place_most=0, durability=durability)


async def test_without_waiting_an_acknowledged_submit_can_die_with_its_primary(pair: Pair, primary: Redis) -> None:
    await pair.attached()
    await pair.detach()
    [job], _ = await gateway_calls(primary, Durability()).submit([prepare(request("echo"), LIMITS)])
    promoted = await pair.fail_over()
    async with promoted:
        assert await promoted.exists(KEYS.job(job.id)) == 0  # acknowledged, then lost with the primary


async def test_waiting_for_a_replica_acknowledges_only_submits_the_promoted_replica_holds(
    pair: Pair, primary: Redis
) -> None:
    await pair.attached()
    calls = gateway_calls(primary, Durability(replicas=1, timeout_ms=300))
    await pair.detach()
    with pytest.raises(NotReplicated, match="1 replica"):
        await calls.submit([prepare(request("echo", args={"n": 1}), LIMITS)])  # stored, not acknowledged
    await pair.attached()
    large = b"P" * 6000  # a spec over 4 KiB: written beside the submit call, WAIT after the transaction
    [job], _ = await calls.submit([prepare(request("echo", args={"n": 2}, payload=large), LIMITS)])
    promoted = await pair.fail_over()
    async with promoted:
        stored = await gateway_calls(promoted, Durability()).get(job.id)
    assert stored.state == S.JOB_STATE_QUEUED and stored.spec.args.struct_value.fields["n"].number_value == 2
    assert stored.spec.payload == large


async def test_waiting_for_a_replica_records_an_outcome_only_once_the_replica_holds_it(
    pair: Pair, primary: Redis
) -> None:
    await pair.attached()
    gateway = gateway_calls(primary, Durability())
    worker = WorkerCalls(primary, KEYS, Durability(replicas=1, timeout_ms=300))
    async with primary.pubsub() as ps:  # someone hears the dispatch, so the placement stands
        await ps.subscribe(KEYS.dispatch_channel("w1"))
        await worker.heartbeat(Registration("w1", "i1", 60_000, 1, ["default"], [], off=False))
        [job], _ = await gateway.submit([prepare(request("echo"), LIMITS)])
        [p] = (await gateway.schedule("default", ack_timeout_ms=60_000, most=1)).placements
    assert await worker.start_many("w1", "i1", [Start(job.id, p.lease, b"")]) == [1]
    done = b"d" * 6000  # an output over 4 KiB: kept apart, WAIT after the transaction
    outcome = Outcome(job.id, p.lease, S.JOB_STATE_SUCCEEDED, b"", done, "", "", b"")
    await pair.detach()
    with pytest.raises(NotReplicated):
        await worker.finish_many("w1", "i1", [outcome], take=())
    await pair.attached()
    finished = await worker.finish_many("w1", "i1", [outcome], take=())  # the worker's retry
    assert finished.codes == [2]  # recorded by the first call; now the replica has it too
    promoted = await pair.fail_over()
    async with promoted:
        stored = await gateway_calls(promoted, Durability()).get(job.id)
    assert (stored.state, stored.output) == (S.JOB_STATE_SUCCEEDED, done)


@pytest.fixture
async def sentinel_checker(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[tuple[Checker, Sentineled]]:
    """A primary with two replicas and a Sentinel, and a stack that finds the primary through it,
    with every submit, outcome and heartbeat confirmed by both replicas: Sentinel promotes the
    replica with the highest replication offset it has seen, which can be a second old, so only a
    write every replica holds is sure to be on the one it promotes."""
    servers = Sentineled()
    env = {**FAST, "JOBGATE_REDIS_WAIT_REPLICAS": "2", "JOBGATE_REDIS_WAIT_TIMEOUT_MS": "1000"}
    stack = Stack(servers.sentinel.url(), namespace, env=env)
    admin = redis_client(servers.sentinel.url(), 15)  # follows the primary through the Sentinel
    try:
        async with checking(stack, admin, failed=lambda: call_failed(request)) as c:
            yield c, servers
    finally:
        if call_failed(request):  # how many failovers the sentinel made, and when
            print("===== sentinel\n" + "\n".join(servers.sentinel.log().splitlines()[-60:]))
        servers.stop()


QUICK_SYNC = ("--repl-diskless-sync-delay", "0")  # a replica's first sync starts at once, not 5 s later


class Sentineled:
    """A primary, two replicas following it, and a Sentinel watching them."""

    def __init__(self) -> None:
        self.primary = RedisProcess(args=QUICK_SYNC).start()
        self.replicas: list[RedisProcess] = []
        for _ in range(2):
            self.add_replica(self.primary.port)
        # 3 s: a freshly promoted primary that is slow to answer on a loaded machine is not taken
        # for dead (a second failover would leave the test's new replica following the old one)
        self.sentinel = SentinelProcess(self.primary.port, down_after_ms=3000).start()

    def add_replica(self, port: int) -> None:
        """Starts a replica of the server on ``port`` and waits until it is in sync."""
        replica = RedisProcess(args=(*QUICK_SYNC, "--replicaof", "127.0.0.1", str(port))).start()
        self.replicas.append(replica)
        wait_for(lambda: _link_up(replica.port), 10, "replication link")

    def give_primary_two_replicas(self, timeout_s: float = 60) -> None:
        """Adds a replica to whichever server the Sentinel names primary, until that primary has two
        replicas in sync (should the Sentinel fail over again meanwhile, to the new one)."""
        deadline = time.monotonic() + timeout_s
        served: set[int] = set()
        while time.monotonic() < deadline:
            found = self.sentinel.primary()
            if found is not None:
                port = found[1]
                if port not in served:
                    self.add_replica(port)
                    served.add(port)
                with SyncRedis(port=port) as r:
                    info = r.info("replication")
                if info.get("role") == "master" and int(info.get("connected_slaves", 0)) >= 2:
                    return
            time.sleep(0.2)
        log = self.sentinel.log()[-3000:]
        raise AssertionError(f"the primary did not get two replicas in {timeout_s:.0f}s:\n{log}")

    def stop(self) -> None:
        self.sentinel.stop()
        for server in (*self.replicas, self.primary):
            server.stop()


def _link_up(port: int) -> bool:
    with SyncRedis(port=port) as r:
        return bool(r.info("replication").get("master_link_status") == "up")


async def test_a_sentinel_failover_under_load_loses_nothing_acknowledged_and_records_one_outcome_per_job(
    sentinel_checker: tuple[Checker, Sentineled],
) -> None:
    """The primary is SIGKILLed under load; the Sentinel promotes a replica. Gateways and workers
    find the new primary by themselves; submits answer UNAVAILABLE meanwhile; every acknowledged
    job runs to its one outcome."""
    checker, servers = sentinel_checker
    flow = await under_load(checker, complete=False)  # pub/sub loses what is published while the primary is away
    old = servers.primary.port
    servers.primary.kill()
    await eventually(lambda: promoted(servers, old), timeout=30, what="a replica promoted by the Sentinel")
    # The new primary has one replica left: writes wait in vain for a second one (UNAVAILABLE)
    # until an operator gives it one.
    await asyncio.to_thread(servers.give_primary_two_replicas)
    await accepted_again(checker, 100)
    await flow.finish(checker)
    await checker.verify_succeeded(flow.gw)
    assert len(checker.cluster.live()) == 3  # no gateway or worker restarted


async def promoted(servers: Sentineled, old_port: int) -> bool:
    primary = await asyncio.to_thread(servers.sentinel.primary)
    return primary is not None and primary[1] != old_port


async def test_the_sentinel_user_gateway_acl_prints_is_enough_to_find_the_primary(pair: Pair, namespace: str) -> None:
    sentinel = SentinelProcess(pair.primary.port).start()
    try:
        async with Redis(port=sentinel.port) as admin:
            command = setuser(namespace, "jg", "s3cret-sentinel", sentinel=True).split()
            await admin.execute_command(*command)
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/{sentinel.service}/0?sentinel_username=jg&sentinel_password=s3cret-sentinel"
        client = redis_client(url, 5)
        try:
            await client.set(KEYS.seq(), 1)  # reached the primary the sentinel named
        finally:
            await client.aclose()
        async with Redis(port=pair.primary.port) as direct:
            assert await direct.get(KEYS.seq()) == b"1"
        wrong = redis_client(url.replace("s3cret-sentinel", "wrong"), 5)
        try:
            with pytest.raises(MasterNotFoundError):
                await wrong.ping()
        finally:
            await wrong.aclose()
    finally:
        sentinel.stop()
