"""The local Redis Cluster harness (``devtools.devstack.ClusterProcess``) against real redis-server
processes: hash slots, writes on every primary, a primary killed and replaced, and a slot moved."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from devtools.servers import ClusterProcess, command

pytestmark = pytest.mark.slow


def cluster_client(cluster: ClusterProcess) -> RedisCluster:
    nodes = [ClusterNode("127.0.0.1", p) for p in cluster.live_ports()]
    return RedisCluster(startup_nodes=nodes, decode_responses=True)


def key_on(cluster: ClusterProcess, port: int, prefix: str) -> str:
    """A key whose slot the primary on ``port`` serves now."""
    return next(k for i in itertools.count() if cluster.primary_for_slot(cluster.slot(k := f"{prefix}-{i}")) == port)


def test_slot_agrees_with_cluster_keyslot(cluster: ClusterProcess) -> None:
    keys = ["", "foo", "123456789", "{jobgate}:queues", "{jobgate}:job:42", "{}x", "a{}{b}", "a{{b}}c", "x{", "jöb"]
    port = cluster.ports[0]
    assert {k: cluster.slot(k) for k in keys} == {k: command(port, "CLUSTER", "KEYSLOT", k) for k in keys}
    assert cluster.slot("123456789") == 0x31C3  # the CRC16/XMODEM check value
    assert cluster.slot("{jobgate}:queues") == cluster.slot("{jobgate}:job:42") == cluster.slot("jobgate")
    assert cluster.url == "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in cluster.seeds) + "/0"


async def test_keys_on_every_primary_read_back_through_the_cluster_client(cluster: ClusterProcess) -> None:
    primaries = cluster.primaries()
    assert len(primaries) == 3 and all(len(cluster.replicas_of(p)) == 1 for p in primaries)
    keys = {key_on(cluster, p, "spread"): str(p) for p in primaries}
    async with cluster_client(cluster) as rc:
        for k, v in keys.items():
            await rc.set(k, v)
        assert {k: await rc.get(k) for k in keys} == keys
    for k, p in keys.items():  # each key is where its slot says, not merely somewhere
        assert command(int(p), "GET", k) == p


async def test_a_killed_primary_is_replaced_by_its_replica_and_rejoins_as_its_replica(
    cluster: ClusterProcess,
) -> None:
    old = cluster.primaries()[0]
    [replica] = cluster.replicas_of(old)
    tag = key_on(cluster, old, "survivor")
    keys = {f"{{{tag}}}:{i}": str(i) for i in range(3)}  # one slot, the old primary's
    async with Redis(port=old, decode_responses=True) as r:
        for k, v in keys.items():
            await r.set(k, v)
        assert await r.execute_command("WAIT", 1, 1000) == 1

    cluster.kill(old)
    new = cluster.wait_failover(old, timeout_s=20)

    assert new == replica and old not in cluster.primaries() and new in cluster.primaries()
    async with Redis(port=new, decode_responses=True) as r:
        assert {k: await r.get(k) for k in keys} == keys
    async with cluster_client(cluster) as rc:
        assert {k: await rc.get(k) for k in keys} == keys

    cluster.restart(old, timeout_s=20)
    assert cluster.replicas_of(new) == [old]
    assert old not in cluster.primaries()


async def test_a_slot_moved_under_load_keeps_its_keys_and_the_client_follows_moved(
    cluster: ClusterProcess,
) -> None:
    tag = "{reshard}"
    slot = cluster.slot(tag)
    source = cluster.primary_for_slot(slot)
    target = next(p for p in cluster.primaries() if p != source)
    async with cluster_client(cluster) as rc, cluster_client(cluster) as stale:
        for i in range(300):  # a few MIGRATE batches' worth
            await rc.set(f"{tag}:before:{i}", i)
        assert await stale.get(f"{tag}:before:0") == "0"  # it learns the old owner, then sits out the move
        written: list[int] = []
        stop = asyncio.Event()

        async def load() -> None:
            for i in itertools.count():
                if stop.is_set():
                    return
                await rc.set(f"{tag}:during:{i}", i)
                await rc.incr(f"{tag}:before:{i % 300}", 1000)
                written.append(i)

        loader = asyncio.create_task(load())
        try:
            await asyncio.to_thread(cluster.reshard, slot, target, 30)
        finally:
            stop.set()
            await loader

        assert cluster.primary_for_slot(slot) == target
        assert written, "no writes while the slot moved"
        assert stale.get_node_from_key(tag).port == source  # so its next read is answered MOVED
        before = [int(await stale.get(f"{tag}:before:{i}")) for i in range(300)]
        assert stale.get_node_from_key(tag).port == target
        during = [await stale.get(f"{tag}:during:{i}") for i in written]
    assert before == [i + 1000 * len(range(i, len(written), 300)) for i in range(300)]
    assert during == [str(i) for i in written]
    assert command(source, "CLUSTER", "COUNTKEYSINSLOT", str(slot)) == 0
    assert command(target, "CLUSTER", "COUNTKEYSINSLOT", str(slot)) == 300 + len(written)
