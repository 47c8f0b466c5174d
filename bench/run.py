"""``make bench``: jobgate's own throughput and latency on this machine, written to docs/BENCHMARKS.md.

Starts a private Redis, one gateway and workers as real processes (as ``make run`` does), then
measures, each over several interleaved rounds (medians with min-max, the machine is shared):
- batched throughput: ``SubmitJobs`` batches from one client, first submit to last completion
  received on a ``WatchResults`` stream;
- unary throughput: one ``SubmitJob`` per job from concurrent clients, measured the same way;
- ``RunJob`` round trip: sequential single jobs, p50 and p99.
Timing lives here, never in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import grpc

from gateway.devstack import RedisProcess, Stack
from jobgate.v1 import job_pb2, scheduler_pb2, scheduler_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "BENCHMARKS.md"


@dataclass
class Setup:
    stub: scheduler_pb2_grpc.SchedulerServiceStub
    channel: grpc.aio.Channel


def echo(i: int) -> scheduler_pb2.SubmitJobRequest:
    req = scheduler_pb2.SubmitJobRequest(kind="echo")
    req.args.struct_value.fields["i"].number_value = i
    return req


async def _completions(stub: scheduler_pb2_grpc.SchedulerServiceStub, n: int, ready: asyncio.Event) -> float:
    """Counts completions on an unfiltered stream; returns the time the n-th arrived."""
    call = stub.WatchResults(scheduler_pb2.WatchResultsRequest(kinds=["echo"]), timeout=300)
    seen = 0
    ready.set()
    async for resp in call:
        if resp.event.state == job_pb2.JOB_STATE_SUCCEEDED:
            seen += 1
            if seen == n:
                call.cancel()
                break
    return time.perf_counter()


async def throughput(
    stub: scheduler_pb2_grpc.SchedulerServiceStub, n: int, submit: Callable[[], Awaitable[None]]
) -> float:
    ready = asyncio.Event()
    watcher = asyncio.create_task(_completions(stub, n, ready))
    await ready.wait()
    await asyncio.sleep(0.2)  # the stream is registered on the gateway
    began = time.perf_counter()
    await submit()
    ended = await asyncio.wait_for(watcher, timeout=300)
    return n / (ended - began)


async def batched(stub: scheduler_pb2_grpc.SchedulerServiceStub, n: int, batch: int = 500) -> float:
    async def submit() -> None:
        await asyncio.gather(
            *(
                stub.SubmitJobs(
                    scheduler_pb2.SubmitJobsRequest(jobs=[echo(i) for i in range(start, start + batch)]), timeout=60
                )
                for start in range(0, n, batch)
            )
        )

    return await throughput(stub, n, submit)


async def unary(stub: scheduler_pb2_grpc.SchedulerServiceStub, n: int, clients: int = 32) -> float:
    async def one_client(count: int) -> None:
        for i in range(count):
            await stub.SubmitJob(echo(i), timeout=30)

    async def submit() -> None:
        await asyncio.gather(*(one_client(n // clients) for _ in range(clients)))

    return await throughput(stub, n // clients * clients, submit)


async def round_trips(stub: scheduler_pb2_grpc.SchedulerServiceStub, n: int) -> list[float]:
    out = []
    for i in range(n):
        began = time.perf_counter()
        async for _ in stub.RunJob(scheduler_pb2.RunJobRequest(job=echo(i)), timeout=30):
            pass
        out.append((time.perf_counter() - began) * 1000)
    return out


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


async def measure(address: str, rounds: int, jobs: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"batched": [], "unary": [], "p50": [], "p99": []}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        await round_trips(stub, 50)  # warm-up
        for r in range(rounds):
            results["batched"].append(await batched(stub, jobs))
            results["unary"].append(await unary(stub, jobs // 4))
            trips = await round_trips(stub, 300)
            results["p50"].append(pct(trips, 50))
            results["p99"].append(pct(trips, 99))
            print(
                f"round {r + 1}: batched {results['batched'][-1]:,.0f}/s, unary {results['unary'][-1]:,.0f}/s, "
                f"RunJob p50 {results['p50'][-1]:.2f} ms p99 {results['p99'][-1]:.2f} ms",
                flush=True,
            )
    return results


def report(results: dict[str, list[float]], workers: int, concurrency: int, jobs: int) -> str:
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("grpcio", "protobuf", "redis", "hiredis", "uvloop"))
    return f"""# Benchmarks

Produced by `make bench` (`bench/run.py`) on {platform.machine()} with {platform.python_implementation()}
{platform.python_version()}; Redis, the gateway, {workers} workers ({concurrency} slots each) and the
submitting client all share this machine (the gateway with `stream_buffer` 200,000, so the measuring
stream can hold a whole burst). Medians over {len(results["batched"])} rounds, min–max in brackets.
Versions: {versions}.

| measure | result |
|---|---|
| batched throughput (`SubmitJobs` of 500, {jobs:,} jobs, first submit to last completion streamed back) | {spread(results["batched"])} jobs/s |
| unary throughput (one `SubmitJob` per job from 32 concurrent calls, {jobs // 4:,} jobs) | {spread(results["unary"])} jobs/s |
| `RunJob` round trip p50 (300 sequential jobs) | {spread(results["p50"], "{:.2f}")} ms |
| `RunJob` round trip p99 | {spread(results["p99"], "{:.2f}")} ms |

Every figure is end to end with every guarantee on: each job is stored in Redis before it is
acknowledged, placed by the placement script, acknowledged and recorded by the worker's scripts,
and its completion is checked against the stored job before it is streamed back.
"""


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--no-report", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    redis = RedisProcess().start()
    # The measuring stream takes every completion of a 10,000-job burst while the same process is
    # submitting: give it a buffer that holds the burst instead of the default 1,024 events.
    stack = Stack(redis.url, "bench", env={"JOBGATE_LOG_LEVEL": "WARNING", "JOBGATE_STREAM_BUFFER": "200000"})
    try:
        _, address = stack.start_gateway()
        for _ in range(args.workers):
            stack.start_worker("--concurrency", str(args.concurrency))
        time.sleep(1.5)  # workers registered
        results = asyncio.run(measure(address, args.rounds, args.jobs))
    finally:
        stack.stop()
        redis.stop()
    text = report(results, args.workers, args.concurrency, args.jobs)
    print(text)
    if not args.no_report:
        REPORT.parent.mkdir(exist_ok=True)
        REPORT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
