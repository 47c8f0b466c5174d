"""``python -m bench.cluster``: the same batched load on one Redis and on a local Redis Cluster.

Starts a private redis-server, runs the benchmark's batched jobgate load on it (one gateway, two
workers, as ``bench.profile batched``), then does the same on a local cluster of 3 primaries and 3
replicas (``devtools.devstack.ClusterProcess``) twice: with the namespace on one of its nodes, then
with ``redis_shards`` spreading its queues over every primary (the jobs going to 30 queues in
turn). For each it reports jobs/s, the CPU each process used per job (from /proc), and, for the
cluster, how the work spread over its nodes: the commands each node ran (``INFO commandstats``)
and its CPU per job.
docs/SCALING.md turns these figures into a capacity model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench.profile import cpu_s
from bench.systems.jobgate import ENV, Jobgate
from devtools.servers import ClusterProcess, RedisProcess, command
from protocol.keys import Keys

SHARDS = 12  # spread: 4 per primary
QUEUES = 30  # the spread load's queues, jobs going to each in turn


def commands(port: int) -> int:
    """Commands a Redis node has run since it started (the sum of ``INFO commandstats``)."""
    text = command(port, "INFO", "commandstats")
    assert isinstance(text, str)
    total = 0
    for line in text.splitlines():
        if line.startswith("cmdstat_"):
            total += int(line.split("calls=", 1)[1].split(",", 1)[0])
    return total


def measure(
    url: str, redis_pids: dict[str, int], ports: dict[str, int], jobs: int, workers: int, shards: int = 1
) -> None:
    system = Jobgate(url)
    env = dict(ENV)
    if shards > 1:  # QUEUES queues over the shards, every worker serving them all
        system.queues = [f"q{i}" for i in range(QUEUES)]
        env |= {"JOBGATE_REDIS_SHARDS": str(shards), "JOBGATE_QUEUES": ",".join(system.queues)}
    try:
        system.start(workers, env)
        assert system.stack
        pids = {"gateway": system.gateway_pid, "client": os.getpid()}
        pids |= {f"worker {i + 1}": w.pid for i, w in enumerate(system.stack.workers)}
        pids |= redis_pids
        before = {name: cpu_s(pid) for name, pid in pids.items()}
        calls_before = {name: commands(port) for name, port in ports.items()}
        began = time.perf_counter()
        rate = system.batched(jobs)
        elapsed = time.perf_counter() - began
        used = {name: cpu_s(pid) - before[name] for name, pid in pids.items()}
        calls = {name: commands(port) - calls_before[name] for name, port in ports.items()}
    finally:
        system.stop()
    print(f"  {jobs:,} jobs in {elapsed:.1f} s: {rate:,.0f} jobs/s")
    print(f"  {'process':<28} {'CPU µs per job':>15} {'commands per job':>17}")
    for name, seconds in used.items():
        per_job = f"{calls[name] / jobs:17.2f}" if name in calls else ""
        print(f"  {name:<28} {seconds / jobs * 1e6:15.0f} {per_job}")
    redis_total = sum(used[name] for name in redis_pids)
    print(f"  {'Redis, all nodes':<28} {redis_total / jobs * 1e6:15.0f} {sum(calls.values()) / jobs:17.2f}")
    print(f"  {'all':<28} {sum(used.values()) / jobs * 1e6:15.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs per measurement (default 20,000)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    args = parser.parse_args()

    single = RedisProcess().start()
    try:
        print("one Redis:")
        measure(single.url, {"redis": single.pid}, {"redis": single.port}, args.jobs, args.workers)
    finally:
        single.stop()

    cluster = ClusterProcess().start()
    try:
        home = cluster.primary_for_slot(cluster.slot("{bench}:queues"))
        names = {}
        for port in cluster.ports:
            role = "primary" if port in cluster.primaries() else "replica"
            names[port] = f"{role} :{port}" + (" (namespace)" if port == home else "")
        pids = {names[p]: cluster.procs[p].pid for p in cluster.ports}
        print("\na local Redis Cluster (3 primaries, 3 replicas), the namespace on one shard:")
        measure(cluster.url, pids, {names[p]: p for p in cluster.ports}, args.jobs, args.workers)
        keys = Keys("bench", SHARDS)
        spread = {
            p: sum(cluster.primary_for_slot(cluster.slot(k.queues())) == p for k in keys.all_shards())
            for p in cluster.primaries()
        }
        names = {}
        for port in cluster.ports:
            role = "primary" if port in cluster.primaries() else "replica"
            names[port] = f"{role} :{port}" + (f" ({spread[port]} shards)" if port in spread else "")
        pids = {names[p]: cluster.procs[p].pid for p in cluster.ports}
        used = len({keys.queue_shard(f"q{i}") for i in range(QUEUES)})
        print(f"\nthe same cluster, redis_shards={SHARDS}: {QUEUES} queues on {used} shards, jobs to each in turn:")
        measure(cluster.url, pids, {names[p]: p for p in cluster.ports}, args.jobs, args.workers, SHARDS)
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
