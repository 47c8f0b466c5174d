"""``python -m bench.grpc_floor``: what Python gRPC alone costs, as a floor under jobgate's figures.

Serves jobgate's own ``SchedulerService`` from a separate process with handlers that do nothing
(``SubmitJob`` answers at once; ``RunJob`` streams four events, as a real one does; ``WatchResults``
sends one event and stays open) and drives it with the benchmark's client shapes: unary calls from
32 concurrent asyncio tasks, sequential ``RunJob`` calls, and the server's memory with 10,000 open
streams. No Redis, no workers: whatever jobgate adds comes on top of these numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

import grpc

from bench.streams import Streams
from bench.systems.jobgate import rss_mb
from devtools.servers import free_port
from jobgate.v1 import job_pb2, scheduler_pb2, scheduler_pb2_grpc

T = TypeVar("T")
STATES = (
    job_pb2.JOB_STATE_QUEUED,
    job_pb2.JOB_STATE_DISPATCHED,
    job_pb2.JOB_STATE_RUNNING,
    job_pb2.JOB_STATE_SUCCEEDED,
)


class Nothing(scheduler_pb2_grpc.SchedulerServiceServicer):
    async def SubmitJob(  # noqa: N802 - the RPC's name
        self, request: scheduler_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.SubmitJobResponse:
        return scheduler_pb2.SubmitJobResponse(job=job_pb2.Job(id="0" * 32, spec=job_pb2.JobSpec(kind=request.kind)))

    async def RunJob(  # noqa: N802 - the RPC's name
        self, request: scheduler_pb2.RunJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.RunJobResponse]:
        for state in STATES:
            yield scheduler_pb2.RunJobResponse(event=job_pb2.JobEvent(job_id="0" * 32, kind="echo", state=state))

    async def WatchResults(  # noqa: N802 - the RPC's name
        self, request: scheduler_pb2.WatchResultsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.WatchResultsResponse]:
        yield scheduler_pb2.WatchResultsResponse(event=job_pb2.JobEvent(job_id="0" * 32, kind="echo"))
        await asyncio.Event().wait()  # open until the client goes


async def serve(address: str) -> None:
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(Nothing(), server)
    server.add_insecure_port(address)
    await server.start()
    await server.wait_for_termination()


def run_server(address: str) -> None:
    import uvloop

    uvloop.run(serve(address))


async def measure(
    address: str, calls: int, clients: int, trips: int, ready_s: float = 30
) -> tuple[float, float, float]:
    """Unary calls/s from ``clients`` tasks, then ``RunJob`` p50 and p99 (ms) of ``trips`` calls in
    a row, once the server at ``address`` answers (within ``ready_s``)."""
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), ready_s)
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        req = scheduler_pb2.SubmitJobRequest(kind="echo")
        await stub.SubmitJob(req, timeout=10)

        async def client(n: int) -> None:
            for _ in range(n):
                await stub.SubmitJob(req, timeout=10)

        began = time.perf_counter()
        await asyncio.gather(*(client(calls // clients) for _ in range(clients)))
        rate = calls // clients * clients / (time.perf_counter() - began)
        took = []
        for _ in range(trips):
            began = time.perf_counter()
            async for _ in stub.RunJob(scheduler_pb2.RunJobRequest(job=req), timeout=10):
                pass
            took.append((time.perf_counter() - began) * 1000)
        took.sort()
        return rate, took[len(took) // 2], took[int(len(took) * 0.99)]


def in_child(fn: Callable[..., T], *args: Any, timeout_s: float = 900) -> T:
    """``fn(*args)`` run in a process of its own. The clients below run there, not in the
    benchmark's process: grpc.aio keeps a poller per process, and once one of their event loops had
    closed, it raised in the benchmark's later loops on every completion (tens of thousands of
    tracebacks on stderr, in the process measuring the system that came next)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result(timeout=timeout_s)


@contextlib.contextmanager
def spawned(target: Callable[..., None], *args: Any) -> Iterator[multiprocessing.Process]:
    """``target(*args)`` running in a spawned process for the block; terminated after it."""
    process = multiprocessing.get_context("spawn").Process(target=target, args=args, daemon=True)
    process.start()
    try:
        yield process
    finally:
        process.terminate()
        process.join(timeout=10)


def measure_rounds(address: str, calls: int, trips: int, rounds: int) -> list[tuple[float, float, float]]:
    """``measure`` of the server at ``address``, ``rounds`` times (32 unary tasks)."""
    return [asyncio.run(measure(address, calls, 32, trips)) for _ in range(rounds)]


def floor(calls: int, trips: int, rounds: int = 1) -> list[tuple[float, float, float]]:
    """Per round, unary calls/s (32 asyncio tasks) and ``RunJob`` p50 and p99 (ms), against one
    server process with handlers that do nothing."""
    address = f"127.0.0.1:{free_port()}"
    with spawned(run_server, address):
        return in_child(measure_rounds, address, calls, trips, rounds)


async def _open_streams(address: str, pid: int, streams: int, channels: int) -> float:
    """Opens ``streams`` WatchResults streams over ``channels`` connections, a thousand at a time,
    each until it has had its one message; the server's VmRSS (MB) with all of them open."""
    async with Streams(address, channels, scheduler_pb2.WatchResultsRequest()) as held, asyncio.timeout(120):
        await asyncio.wait_for(held.opened[0].channel_ready(), 30)
        while len(held.tasks) < streams:
            held.open(min(1000, streams - len(held.tasks)))
            while not held.all_reached:
                held.check()
                await asyncio.sleep(0.05)
        return rss_mb(pid)


def _streams_rss(address: str, pid: int, streams: int, channels: int) -> float:
    return asyncio.run(_open_streams(address, pid, streams, channels))


def stream_rss(streams: int, channels: int) -> float:
    """The VmRSS (MB) of a server with handlers that do nothing but hold ``streams`` WatchResults
    streams open (each sent one message), over ``channels`` connections: what Python gRPC alone
    takes for them, under the gateway's figure."""
    address = f"127.0.0.1:{free_port()}"
    with spawned(run_server, address) as server:
        assert server.pid is not None
        return in_child(_streams_rss, address, server.pid, streams, channels)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_floor", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=8000)
    parser.add_argument("--trips", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=10_000, help="open streams for the memory figure (0: skip)")
    args = parser.parse_args()
    for r, (rate, p50, p99) in enumerate(floor(args.calls, args.trips, args.rounds)):
        print(f"round {r + 1}: unary {rate:,.0f} calls/s (32 tasks); RunJob p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    if args.streams:
        rss = stream_rss(args.streams, -(-args.streams // 90))
        print(f"VmRSS with {args.streams:,} open WatchResults streams: {rss:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
