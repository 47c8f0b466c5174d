"""``python -m bench.due_lag``: how late delayed jobs start when many fall due at once.

Starts a private redis-server, two gateways and two workers (64 slots each) as real processes,
submits ``--jobs`` jobs (10,000 by default) with ``run_at`` set to one and the same instant a few
seconds ahead, and listens on the results channel itself: for each job, the lag from its due time to
its QUEUED event (a gateway's promote moved it into its queue) and to its RUNNING event (a worker
started it). Then the same again with the gateway that accepted the jobs SIGKILLed while they
wait, so the other gateway alone queues them. Reports p50, p99 and the last of each; and, as a
reference for the start lag, how long the same jobs take from a plain submit (not delayed) to their
start: with all of them due at once, their starts are bound by the stack's throughput.
Writes docs/DUE_LAG.md (``--out -`` prints only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import platform
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from redis.asyncio import Redis

from devtools.devstack import Service, Stack
from devtools.servers import RedisProcess
from jobgate.v1 import job_pb2, relay_pb2, scheduler_pb2, scheduler_pb2_grpc
from protocol.connection import now_ms
from protocol.keys import Keys

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "DUE_LAG.md"
NAMESPACE = "duelag"
ENV = {"JOBGATE_LOG_LEVEL": "WARNING", "JOBGATE_STREAM_BUFFER": "50000"}
BATCH = 1000


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


class Listener:
    """The results channel, read directly: when each job was QUEUED and RUNNING (event times, ms)."""

    def __init__(self, url: str) -> None:
        self.redis = Redis.from_url(url)
        self.queued: dict[str, int] = {}
        self.running: dict[str, int] = {}
        self.ready = asyncio.Event()

    async def run(self) -> None:
        async with self.redis.pubsub() as ps:
            await ps.subscribe(Keys(NAMESPACE).results_channel())
            self.ready.set()
            while True:
                msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg is None:
                    continue
                for e in relay_pb2.JobEvents.FromString(msg["data"]).events:
                    at = e.time.ToMilliseconds()
                    if e.state == job_pb2.JOB_STATE_QUEUED:
                        self.queued[e.job_id] = at
                    elif e.state == job_pb2.JOB_STATE_RUNNING:
                        self.running[e.job_id] = at

    async def wait_started(self, ids: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while any(i not in self.running for i in ids):
            if time.monotonic() > deadline:
                missing = sum(1 for i in ids if i not in self.running)
                raise TimeoutError(f"{missing} of {len(ids)} jobs not started within {timeout_s:.0f}s")
            await asyncio.sleep(0.1)


async def submit(address: str, jobs: int, due_ms: int | None) -> list[str]:
    """Submits ``jobs`` echo jobs (due at ``due_ms``, or at once); returns their ids."""
    ids: list[str] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        for first in range(0, jobs, BATCH):
            batch = []
            for _ in range(min(BATCH, jobs - first)):
                req = scheduler_pb2.SubmitJobRequest(kind="echo")
                if due_ms is not None:
                    req.run_at.FromMilliseconds(due_ms)
                batch.append(req)
            reply = await stub.SubmitJobs(scheduler_pb2.SubmitJobsRequest(jobs=batch), timeout=60)
            ids += [j.id for j in reply.jobs]
    return ids


def lags(ids: list[str], at: dict[str, int], since: int | dict[str, int]) -> list[float]:
    return [at[i] - (since if isinstance(since, int) else since[i]) for i in ids]


@contextlib.asynccontextmanager
async def running(url: str, gateways: int) -> AsyncIterator[tuple[list[tuple[Service, str]], Listener]]:
    """A fresh namespace with ``gateways`` gateways and two workers (64 slots each), and a listener
    on its results channel; everything stopped on exit."""
    redis = Redis.from_url(url)
    await redis.flushall()
    await redis.aclose()
    stack = Stack(url, NAMESPACE, env=ENV)
    listener = Listener(url)
    task = asyncio.create_task(listener.run())
    try:
        started = [stack.start_gateway() for _ in range(gateways)]
        for _ in range(2):
            stack.start_worker("--concurrency", "64")
        await asyncio.wait_for(listener.ready.wait(), timeout=10)
        await asyncio.sleep(1.0)  # workers registered
        yield started, listener
    finally:
        task.cancel()
        stack.stop()
        await listener.redis.aclose()


async def scenario(url: str, jobs: int, kill: bool, ahead_s: float) -> dict[str, list[float]]:
    """One run on a fresh namespace: ``jobs`` due together ``ahead_s`` from now; with ``kill``, the
    gateway that accepted them is SIGKILLed half-way through their wait."""
    async with running(url, 2) as ([(accepting, address), _], listener):
        due = (now_ms() // 1000 + int(ahead_s) + 1) * 1000  # on a whole second
        ids = await submit(address, jobs, due)
        if kill:
            await asyncio.sleep(max(0.0, (due - now_ms()) / 2000))
            accepting.signal(signal.SIGKILL)
        await listener.wait_started(ids, timeout_s=ahead_s + 120)
        return {"queued": lags(ids, listener.queued, due), "started": lags(ids, listener.running, due)}


async def reference(url: str, jobs: int) -> list[float]:
    """The same jobs submitted plain: from their submit to their start."""
    async with running(url, 1) as ([(_, address)], listener):
        began = now_ms()
        ids = await submit(address, jobs, None)
        await listener.wait_started(ids, timeout_s=120)
        return lags(ids, listener.running, began)


def row(name: str, values: list[float]) -> str:
    return f"| {name} | {percentile(values, 50):,.0f} | {percentile(values, 99):,.0f} | {max(values):,.0f} |"


async def main_async(args: argparse.Namespace, url: str) -> str:
    calm = await scenario(url, args.jobs, kill=False, ahead_s=args.ahead_s)
    killed = await scenario(url, args.jobs, kill=True, ahead_s=args.ahead_s)
    plain = await reference(url, args.jobs)
    return "\n".join(
        [
            "# Due lag",
            "",
            f"Produced by `make bench-due` (`bench/due_lag.py`) on {platform.machine()} with CPython"
            f" {platform.python_version()}: {args.jobs:,} `echo` jobs submitted with one and the same",
            f"`run_at`, {args.ahead_s:g} s or so ahead (on a whole second), to two gateways and two workers of 64",
            "slots on a private Redis. Lags are measured from the due time to each job's QUEUED event (a",
            "gateway's promote put it in its queue) and to its RUNNING event (a worker started it), in ms,",
            "from the events on the results channel. *One gateway killed*: the gateway that accepted the",
            "jobs is SIGKILLed half-way through their wait, so the other one queues them.",
            "",
            "| | p50 (ms) | p99 (ms) | last (ms) |",
            "|---|---|---|---|",
            row("queued, both gateways", calm["queued"]),
            row("started, both gateways", calm["started"]),
            row("queued, one gateway killed", killed["queued"]),
            row("started, one gateway killed", killed["started"]),
            row("reference: started, after a plain submit of the same jobs", plain),
            "",
            "A gateway promotes due jobs at the earliest due time it knows of (it reads the next one after",
            "each pass, and on every placement tick, `tick_ms`), up to 1,000 per script call, in due order.",
            "With every job due at once, the start lag is the time the stack takes to run that many jobs:",
            "compare with the reference row, the same jobs submitted without a delay.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--ahead-s", type=float, default=4.0, help="how far ahead the jobs are due")
    parser.add_argument("--out", type=Path, default=REPORT, help="report file ('-' prints only)")
    args = parser.parse_args()
    server = RedisProcess().start()
    try:
        text = asyncio.run(main_async(args, server.url))
    finally:
        server.stop()
    print(text)
    if str(args.out) != "-":
        args.out.write_text(text)
        print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
