"""``python -m bench.processes``: one gateway of 1, then 2 processes on one address (``processes``).

The same loads as the benchmark (two workers of 64 slots, the built-in ``echo`` handler, one asyncio
client) with the client's calls spread over 8 connections, so that the kernel spreads them over the
gateway's processes: batched (``SubmitJobs`` of 1,000) and one job per call (``SubmitJob`` from 32
concurrent submitters). For each it prints jobs/s and the CPU each kind of process used per job
(from /proc; the gateway's is the sum of its processes), in interleaved rounds; then 2 processes
with one client connection, all calls on one process: what the other used ("idle") is what a
gateway process costs as such (its results subscription, its loops). docs/SCALING.md reads the
figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import grpc

from bench.profile import cpu_s
from bench.systems.base import chunks
from bench.systems.jobgate import BASIC, ENV, Jobgate, echo
from devtools.servers import RedisProcess
from jobgate.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.processes import children_of

CONNECTIONS = 8
SUBMITTERS = 32


class Spread(Jobgate):
    """The benchmark's jobgate, its submits spread over CONNECTIONS connections."""

    def __init__(self, redis_url: str, processes: int, connections: int = CONNECTIONS) -> None:
        super().__init__(redis_url)
        self.processes = processes
        self.connections = connections
        self.stubs: list[scheduler_pb2_grpc.SchedulerServiceStub] = []
        self.channels: list[grpc.aio.Channel] = []

    def start(self, workers: int, env: dict[str, str] | None = None) -> None:
        super().start(workers, {**ENV, "JOBGATE_PROCESSES": str(self.processes), **(env or {})})

        async def open_all() -> None:
            for _ in range(self.connections):  # a subchannel of its own each: a connection of its own
                channel = grpc.aio.insecure_channel(self.address, options=[("grpc.use_local_subchannel_pool", 1)])
                self.channels.append(channel)
                self.stubs.append(scheduler_pb2_grpc.SchedulerServiceStub(channel))

        self._run(open_all())

    def stop(self) -> None:
        if self.runner:
            for channel in self.channels:
                self.runner.run(channel.close())
        super().stop()

    def _stub(self) -> scheduler_pb2_grpc.SchedulerServiceStub:
        """The measuring stream and probes go over the first of the spread connections: with one
        connection, every call of the run is on one process and the other serves none."""
        return self.stubs[0] if self.stubs else super()._stub()

    def gateway_pids(self) -> list[int]:
        return sorted(children_of(self.gateway_pid)) if self.processes > 1 else [self.gateway_pid]

    def batched_spread(self, n: int) -> float:
        async def submit() -> None:
            await asyncio.gather(
                *(
                    self.stubs[c % self.connections].SubmitJobs(
                        scheduler_pb2.SubmitJobsRequest(jobs=[echo(i) for i in part], view=BASIC), timeout=60
                    )
                    for c, part in enumerate(chunks(n, 0))
                )
            )

        return self._run(self._throughput(n, submit))

    def unary_spread(self, n: int) -> float:
        async def one(first: int) -> None:
            stub = self.stubs[first % self.connections]
            for i in range(first, n, SUBMITTERS):
                await stub.SubmitJob(echo(i), timeout=30)

        async def submit() -> None:
            await asyncio.gather(*(one(c) for c in range(SUBMITTERS)))

        return self._run(self._throughput(n, submit))


def measure(
    url: str, redis_pid: int, processes: int, shape: str, jobs: int, connections: int = CONNECTIONS
) -> dict[str, float]:
    """jobs/s and CPU µs per job of each kind of process; with one connection, ``idle µs/job`` is
    what the gateway process that served no call used: the cost of a process as such."""
    system = Spread(url, processes, connections)
    try:
        system.start(2)
        assert system.stack
        groups = {
            "gateway": system.gateway_pids(),
            "workers": [w.pid for w in system.stack.workers],
            "redis": [redis_pid],
            "client": [os.getpid()],
        }
        each = {p: cpu_s(p) for p in groups["gateway"]}
        before = {g: sum(cpu_s(p) for p in pids) for g, pids in groups.items()}
        rate = system.batched_spread(jobs) if shape == "batched" else system.unary_spread(jobs)
        used = {g: sum(cpu_s(p) for p in pids) - before[g] for g, pids in groups.items()}
        each = {p: cpu_s(p) - t for p, t in each.items()}
    finally:
        system.stop()
    out = {"jobs/s": rate}
    out |= {f"{g} µs/job": seconds / jobs * 1e6 for g, seconds in used.items()}
    out["idle µs/job"] = min(each.values()) / jobs * 1e6 if len(each) > 1 else 0.0
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.processes", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--batched-jobs", type=int, default=20_000, help="jobs per batched run (default 20,000)")
    parser.add_argument("--unary-jobs", type=int, default=4_000, help="jobs per one-per-call run (default 4,000)")
    args = parser.parse_args()
    redis = RedisProcess().start()
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        for _ in range(args.rounds):
            for shape, jobs in (("batched", args.batched_jobs), ("unary", args.unary_jobs)):
                for processes, connections in ((1, CONNECTIONS), (2, CONNECTIONS), (2, 1)):
                    began = time.monotonic()
                    got = measure(redis.url, redis.pid, processes, shape, jobs, connections)
                    results.setdefault((shape, f"{processes} ({connections} conn.)"), []).append(got)
                    took = time.monotonic() - began
                    label = f"{shape:<8} processes={processes} connections={connections}"
                    print(f"{label}: {got['jobs/s']:8,.0f} jobs/s ({took:.0f} s)")
    finally:
        redis.stop()
    print(f"\nmedians of {args.rounds} rounds; CPU per job of each kind of process (µs):")
    columns = ["jobs/s", "gateway µs/job", "idle µs/job", "workers µs/job", "redis µs/job", "client µs/job"]
    print(f"| shape | processes (client connections) | {' | '.join(columns)} |")
    print(f"|---|---:|{'---:|' * len(columns)}")
    for (shape, processes), runs in results.items():
        cells = [f"{statistics.median(r[c] for r in runs):,.0f}" for c in columns]
        print(f"| {shape} | {processes} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
