"""``python -m bench.limits``: what flow control costs the placement scripts, per job.

Runs jobgate's own Redis calls (the gateway's submit, the workers' start_many and finish_many with
their refill) against a private Redis, for the same jobs under several shapes: plain; 1,000
concurrency keys under a per-key limit; 100 workers with different labels and jobs that require
some of them; and each of those beside a 100,000-job backlog that cannot run (in a paused queue,
behind one concurrency key at its limit, or requiring labels no worker has). It reports the Redis
commands (those its scripts run) and the Redis CPU each job cost from submission to its recorded
outcome (placement, start, finish and the refill of its slot), which is where flow control lives:
the gateway's and the workers' work per job does not change with it. docs/PERFORMANCE.md records
the figures.

The workers are lightweight: one process stands in for all of them, subscribed to their dispatch
channels (so each dispatch reaches a subscriber, as it must), starting and finishing what it was
given as a worker would, without running handlers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from redis.asyncio import Redis

from bench.profile import cpu_s
from devtools.servers import RedisProcess
from gateway.validation import Limits, prepare
from jobgate.v1 import job_pb2, scheduler_pb2
from protocol.connection import redis_client
from protocol.gateway_calls import GatewayCalls, QueueLimitValues
from protocol.keys import Keys
from protocol.worker_calls import Outcome, Registration, Start, WorkerCalls

QUEUE = "work"
WORKERS = 100
SLOTS = 10
KEYS = 1000
BACKLOG = 100_000
SETTLE_S = 2.0
TIMEOUT_S = 600  # one shape's measured jobs end well within this
LIMITS = Limits(max_payload_bytes=1 << 20, default_timeout_ms=60_000, max_batch=1000, max_watch_ids=100)


@dataclass(frozen=True)
class Shape:
    """One way of running the same jobs."""

    name: str
    keys: bool = False  # each job has one of KEYS concurrency keys; the queue allows 2 running per key
    labels: bool = False  # workers carry different labels; each job requires one zone
    backlog: str = ""  # '', 'paused', 'key' (one key at its limit) or 'labels' (no worker matches)


SHAPES = [
    Shape("plain"),
    Shape("1,000 concurrency keys", keys=True),
    Shape("100 workers with labels", labels=True),
    Shape("plain + 100,000 in a paused queue", backlog="paused"),
    Shape("keys + 100,000 behind a key at its limit", keys=True, backlog="key"),
    Shape("plain + 100,000 needing labels no worker has", backlog="labels"),
    Shape("keys + labels + 100,000 behind a key", keys=True, labels=True, backlog="key"),
]


@dataclass
class Fleet:
    """The stand-in workers: what each was dispatched or given, to start and finish."""

    calls: WorkerCalls
    instance: str
    dispatched: dict[str, list[tuple[str, int]]] = field(default_factory=lambda: defaultdict(list))
    started: dict[str, list[tuple[str, int]]] = field(default_factory=lambda: defaultdict(list))
    hold: set[str] = field(default_factory=set)  # jobs never finished (they keep their key at its limit)
    ended: int = 0

    def note(self, placements: Sequence[object]) -> None:
        for p in placements:
            if p.reached:  # type: ignore[attr-defined]
                self.dispatched[p.worker_id].append((p.job_id, p.lease))  # type: ignore[attr-defined]

    async def work(self) -> bool:
        """One round: every worker starts what it was dispatched and finishes what it runs (its
        refill starts more). Returns False when nothing was left to do."""
        busy = False
        for w in list(self.dispatched):
            todo = self.dispatched.pop(w)
            starts = [Start(j, lease, b"") for j, lease in todo]
            codes = await self.calls.start_many(w, self.instance, starts)
            self.started[w] += [(j, lease) for (j, lease), c in zip(todo, codes, strict=True) if c == 1]
            busy = True
        for w in list(self.started):
            running = [(j, lease) for j, lease in self.started.pop(w) if j not in self.hold]
            if not running:
                continue
            outcomes = [Outcome(j, lease, job_pb2.JOB_STATE_SUCCEEDED, b"", b"", "", "", b"") for j, lease in running]
            done = await self.calls.finish_many(w, self.instance, outcomes, take=[j for j, _ in running])
            self.ended += sum(1 for c in done.codes if c == 1)
            self.note(done.placements)
            self.started[w] += [(d.job_id, d.lease) for d in done.taken]
            busy = True
        return busy


def request(i: int, shape: Shape, kind: str = "work", queue: str = QUEUE) -> scheduler_pb2.SubmitJobRequest:
    req = scheduler_pb2.SubmitJobRequest(queue=queue, kind=kind)
    if shape.keys:
        req.concurrency_key = f"customer-{i % KEYS}"
    if shape.labels:
        req.labels["zone"] = f"z{i % 10}"
    return req


async def submit(store: GatewayCalls, reqs: Sequence[scheduler_pb2.SubmitJobRequest], fleet: Fleet | None) -> None:
    for first in range(0, len(reqs), 1000):
        _, placed = await store.submit([prepare(r, LIMITS) for r in reqs[first : first + 1000]])
        if fleet:
            fleet.note(placed.placements)


async def run_shape(
    url: str, redis_pid: int, shape: Shape, jobs: int, batch: int, backlog: int, settle_s: float = SETTLE_S
) -> dict[str, float]:
    """Redis CPU µs per job for ``jobs`` jobs of ``shape``, submitted ``batch`` at a time."""
    redis = redis_client(url, 30)
    await redis.flushall()
    keys = Keys(f"bench{uuid.uuid4().hex[:6]}")
    store = GatewayCalls(redis, keys, idempotency_ttl_s=3600)
    fleet = Fleet(WorkerCalls(redis, keys), uuid.uuid4().hex)
    listener = redis.pubsub()
    await listener.subscribe(*(keys.dispatch_channel(f"w{i}") for i in range(WORKERS)))
    drain = asyncio.create_task(_drain(listener))
    try:
        for i in range(WORKERS):
            labels = f"rack=r{i},zone=z{i % 10}" if shape.labels else ""
            reg = Registration(f"w{i}", fleet.instance, 600_000, SLOTS, [QUEUE, "held"], [], False, labels)
            await fleet.calls.heartbeat(reg)
        if shape.keys:
            await store.set_limits(QUEUE, QueueLimitValues(max_running_per_key=2))
        await _backlog(store, fleet, shape, backlog)
        await asyncio.sleep(settle_s)  # Redis finishes growing its tables before the measurement
        calls0 = await _commands(redis)
        t0, cpu0 = time.perf_counter(), cpu_s(redis_pid)
        sent = 0
        while fleet.ended < jobs:
            if time.perf_counter() - t0 > TIMEOUT_S:
                raise RuntimeError(f"{shape.name}: {fleet.ended} of {jobs} jobs ended within {TIMEOUT_S} s")
            if sent < jobs and sent - fleet.ended < 2 * batch:
                n = min(batch, jobs - sent)
                await submit(store, [request(sent + i, shape) for i in range(n)], fleet)
                sent += n
            if not await fleet.work() and sent >= jobs:
                await asyncio.sleep(0.01)  # what is left waits for its key's turn
        cpu, wall = cpu_s(redis_pid) - cpu0, time.perf_counter() - t0
        calls = await _commands(redis) - calls0
        return {"redis_us_per_job": cpu / jobs * 1e6, "commands_per_job": calls / jobs, "jobs_per_s": jobs / wall}
    finally:
        drain.cancel()
        await listener.aclose()
        await redis.aclose()


async def _backlog(store: GatewayCalls, fleet: Fleet, shape: Shape, size: int) -> None:
    """Stores the shape's ``size`` jobs that cannot run."""
    if shape.backlog == "paused":
        await store.pause("held", True)
        await submit(store, [request(i, Shape("x"), queue="held") for i in range(size)], None)
    elif shape.backlog == "key":
        hog = [scheduler_pb2.SubmitJobRequest(queue=QUEUE, kind="hold", concurrency_key="hog") for _ in range(size)]
        await submit(store, hog, fleet)
        for placements in fleet.dispatched.values():  # its first jobs run and never end
            fleet.hold.update(j for j, _ in placements)
        await fleet.work()
    elif shape.backlog == "labels":
        reqs = []
        for _ in range(size):
            req = scheduler_pb2.SubmitJobRequest(queue=QUEUE, kind="work")
            req.labels["gpu"] = "none"
            reqs.append(req)
        await submit(store, reqs, fleet)


async def _commands(redis: Redis) -> int:
    """Commands Redis has run so far, those the scripts ran included (not the script calls
    themselves, nor INFO)."""
    stats = await redis.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k not in ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_info"))


async def _drain(listener: object) -> None:
    async for _ in listener.listen():  # type: ignore[attr-defined]
        pass


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.limits", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs measured per shape and round (default 20000)")
    parser.add_argument("--batch", type=int, default=200, help="jobs per submit call (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported (default 3)")
    parser.add_argument("--backlog", type=int, default=BACKLOG, help="jobs that cannot run (default 100000)")
    parser.add_argument("--settle-s", type=float, default=SETTLE_S, help="pause before each measurement (default 2)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    server = RedisProcess().start()
    try:
        found: dict[str, list[dict[str, float]]] = defaultdict(list)
        for r in range(args.rounds):
            for shape in SHAPES:
                measured = run_shape(server.url, server.pid, shape, args.jobs, args.batch, args.backlog, args.settle_s)
                found[shape.name].append(asyncio.run(measured))
                print(f"round {r + 1}: {shape.name}: {found[shape.name][-1]}", file=sys.stderr, flush=True)
    finally:
        server.stop()
    plain = statistics.median(x["redis_us_per_job"] for x in found["plain"])
    print("| shape | Redis commands per job | Redis CPU per job (µs) | vs plain | jobs/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    report = {}
    for shape in SHAPES:
        us = statistics.median(x["redis_us_per_job"] for x in found[shape.name])
        rate = statistics.median(x["jobs_per_s"] for x in found[shape.name])
        calls = statistics.median(x["commands_per_job"] for x in found[shape.name])
        report[shape.name] = {"commands_per_job": calls, "redis_us_per_job": us, "jobs_per_s": rate}
        print(f"| {shape.name} | {calls:.1f} | {us:.0f} | {us / plain:.2f}× | {rate:,.0f} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
