"""``make soak``: a long run of jobs through one stack, watching memory and asyncio tasks for leaks.

Starts a private Redis, one gateway and workers as real processes (as ``make run`` does), each
serving Prometheus metrics; submits ``--jobs`` jobs in ``SubmitJobs`` batches while keeping at most
``--in-flight`` unfinished (completions counted on an unfiltered ``WatchResults`` stream), samples
the resident memory and asyncio tasks of every process every ``--every-s`` seconds, and writes the
start (after warm-up), peak and end figures and the slope of the second half to docs/SOAK.md.
Finished jobs are kept ``--retention-s`` seconds (failed ones, a tenth of the jobs, as long): Redis's
own memory (``used_memory``) and key count are sampled too, the last time once that retention has
passed, so the report shows whether Redis gives back what the jobs took.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis as redis_sync

from devtools.devstack import Stack
from devtools.servers import RedisProcess, free_port
from jobgate.v1 import job_pb2, scheduler_pb2, scheduler_pb2_grpc
from tests.processes import metrics_env, scrape, totals

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "SOAK.md"
MB = 1024 * 1024
TERMINAL = (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED)


@dataclass
class Series:
    """Samples of one process: (seconds since start, jobs done, RSS bytes, asyncio tasks)."""

    name: str
    port: int
    prefix: str
    samples: list[tuple[float, int, float, float]] = field(default_factory=list)

    def sample(self, t: float, done: int) -> None:
        m = totals(scrape(self.port))
        self.samples.append((t, done, m["process_resident_memory_bytes"], m[f"{self.prefix}_asyncio_tasks"]))

    def slope_mb_per_10k(self) -> float:
        """Least-squares RSS slope over the second half of the run, MB per 10,000 jobs."""
        half = self.samples[len(self.samples) // 2 :]
        if len(half) < 2 or half[-1][1] == half[0][1]:
            return 0.0
        xs, ys = [s[1] for s in half], [s[2] / MB for s in half]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        den = sum((x - mx) ** 2 for x in xs)
        return 0.0 if den == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den * 10_000


class Counter:
    """Completions seen on the unfiltered stream, with an event to wake the submitter."""

    def __init__(self) -> None:
        self.done = 0
        self.changed = asyncio.Event()


async def count_completions(
    stub: scheduler_pb2_grpc.SchedulerServiceStub, counter: Counter, ready: asyncio.Event
) -> None:
    call = stub.WatchResults(scheduler_pb2.WatchResultsRequest(kinds=["echo", "fail"]), timeout=24 * 3600)
    ready.set()
    async for resp in call:
        if resp.event.state in TERMINAL:
            counter.done += 1
            counter.changed.set()


class RedisSeries:
    """Samples of Redis: (seconds since start, jobs done, used_memory bytes, keys)."""

    def __init__(self, url: str) -> None:
        self.client = redis_sync.Redis.from_url(url)
        self.samples: list[tuple[float, int, float, float]] = []

    def sample(self, t: float, done: int) -> None:
        self.samples.append((t, done, float(self.client.info("memory")["used_memory"]), float(self.client.dbsize())))


def job(i: int) -> scheduler_pb2.SubmitJobRequest:
    """An ``echo`` job; every tenth fails for good (a dead letter, kept dead_retention_s)."""
    if i % 10 == 9:
        req = scheduler_pb2.SubmitJobRequest(kind="fail")
        req.args.struct_value.fields["fatal"].bool_value = True
        return req
    req = scheduler_pb2.SubmitJobRequest(kind="echo")
    req.args.struct_value.fields["i"].number_value = i
    return req


async def push(
    stub: scheduler_pb2_grpc.SchedulerServiceStub, total: int, batch: int, in_flight: int, counter: Counter
) -> None:
    """Submits ``total`` jobs, never more than ``in_flight`` unfinished; every wait is bounded."""
    sent = 0
    while sent < total:
        while sent - counter.done + batch > in_flight:
            counter.changed.clear()
            await asyncio.wait_for(counter.changed.wait(), timeout=60)
        n = min(batch, total - sent)
        await stub.SubmitJobs(scheduler_pb2.SubmitJobsRequest(jobs=[job(sent + i) for i in range(n)]), timeout=60)
        sent += n
    while counter.done < total:
        counter.changed.clear()
        await asyncio.wait_for(counter.changed.wait(), timeout=60)


async def sampler(
    series: Sequence[Series | RedisSeries], counter: Counter, began: float, every_s: float, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        for s in series:
            await asyncio.to_thread(s.sample, time.monotonic() - began, counter.done)
        try:
            await asyncio.wait_for(stop.wait(), timeout=every_s)
        except TimeoutError:
            pass


async def soak(args: argparse.Namespace, address: str, series: list[Series], redis: RedisSeries) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        counter, ready = Counter(), asyncio.Event()
        watcher = asyncio.create_task(count_completions(stub, counter, ready))
        await asyncio.wait_for(ready.wait(), timeout=10)
        await asyncio.sleep(0.3)  # the stream is registered on the gateway
        await push(stub, args.warm_up, args.batch, args.in_flight, counter)  # warm-up, not sampled
        await asyncio.sleep(args.retention_s + args.settle_s)  # the warm-up's jobs expire: Redis at rest
        counter.done = 0
        stop, began = asyncio.Event(), time.monotonic()
        redis.sample(0.0, 0)
        sampling = asyncio.create_task(sampler([*series, redis], counter, began, args.every_s, stop))
        await push(stub, args.jobs, args.batch, args.in_flight, counter)
        elapsed = time.monotonic() - began
        await asyncio.sleep(args.settle_s)  # let the processes go idle before the last sample
        stop.set()
        await sampling
        for s in series:
            s.sample(time.monotonic() - began, counter.done)
        await asyncio.sleep(args.retention_s)  # every job of the run has expired now
        redis.sample(time.monotonic() - began, counter.done)
        watcher.cancel()
        return elapsed


def report(args: argparse.Namespace, series: list[Series], redis: RedisSeries, elapsed: float) -> str:
    r0, r1 = redis.samples[0], redis.samples[-1]
    rows = []
    for s in series:
        start, end = s.samples[0], s.samples[-1]
        peak = max(x[2] for x in s.samples)
        rows.append(
            f"| {s.name} | {start[2] / MB:.1f} | {peak / MB:.1f} | {end[2] / MB:.1f} | {s.slope_mb_per_10k():+.2f} "
            f"| {start[3]:.0f} | {max(x[3] for x in s.samples):.0f} | {end[3]:.0f} |"
        )
    return "\n".join(
        [
            "# Soak",
            "",
            f"Produced by `make soak` (`bench/soak.py`) on {platform.machine()} "
            f"with CPython {platform.python_version()}:",
            f"{args.jobs:,} jobs (`echo`, every tenth `fail`) after a warm-up of {args.warm_up:,}, in batches of"
            f" {args.batch}, at most {args.in_flight:,} unfinished at a time,",
            f"through one gateway and {args.workers} workers ({args.concurrency} slots each) on a private Redis;",
            f"{elapsed:.0f} s ({args.jobs / elapsed:,.0f} jobs/s). Resident memory (RSS) and asyncio tasks were read",
            f"from each process's metrics every {args.every_s:g} s: start is the first sample after warm-up, end the",
            f"last one, taken {args.settle_s:g} s after the last completion. The slope is fitted over the second half.",
            "",
            "| process | RSS start (MB) | RSS peak (MB) | RSS end (MB) | slope (MB per 10,000 jobs) "
            "| tasks start | tasks peak | tasks end |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"Redis, with finished jobs kept {args.retention_s} s (`retention_s`, `dead_retention_s`; a tenth of the"
            " jobs fail for good): its `used_memory` and key count at rest after the warm-up, at the peak of the run,",
            f"and {args.retention_s} s after the last completion, once every job of the run has expired:",
            "",
            "| | start | peak | end |",
            "|---|---|---|---|",
            f"| used_memory (MB) | {r0[2] / MB:.1f} | {max(x[2] for x in redis.samples) / MB:.1f} | {r1[2] / MB:.1f} |",
            f"| keys | {r0[3]:,.0f} | {max(x[3] for x in redis.samples):,.0f} | {r1[3]:,.0f} |",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--warm-up", type=int, default=5_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--in-flight", type=int, default=5_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--every-s", type=float, default=2.0)
    parser.add_argument("--settle-s", type=float, default=3.0)
    parser.add_argument("--retention-s", type=int, default=5, help="how long finished and failed jobs are kept")
    parser.add_argument("--out", type=Path, default=REPORT, help="report file ('-' prints only)")
    args = parser.parse_args()
    redis = RedisProcess().start()
    kept = str(args.retention_s)
    env = {"JOBGATE_LOG_LEVEL": "WARNING", "JOBGATE_STREAM_BUFFER": "20000"}
    env |= {"JOBGATE_RETENTION_S": kept, "JOBGATE_DEAD_RETENTION_S": kept, "JOBGATE_IDEMPOTENCY_TTL_S": kept}
    stack = Stack(redis.url, "soak", env=env)
    try:
        port = free_port()
        _, address = stack.start_gateway(env=metrics_env(port))
        series = [Series("gateway", port, "jobgate_gateway")]
        for i in range(args.workers):
            port = free_port()
            stack.start_worker("--concurrency", str(args.concurrency), env=metrics_env(port))
            series.append(Series(f"worker {i + 1}", port, "jobgate_worker"))
        memory = RedisSeries(redis.url)
        elapsed = asyncio.run(soak(args, address, series, memory))
    finally:
        stack.stop()
        redis.stop()
    text = report(args, series, memory, elapsed)
    print(text)
    if str(args.out) != "-":
        args.out.write_text(text)
        print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
