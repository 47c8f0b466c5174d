"""``python -m bench.relay_floor``: gRPC in front of a bare pub/sub relay, the least a gateway that
hands jobs to a worker process through Redis can cost on this machine.

The server (a process of its own, uvloop like the gateway) serves jobgate's ``SchedulerService``
with handlers that keep nothing: ``SubmitJob`` publishes the job on a dispatch channel and answers
(one Redis round trip per call, the least a gateway must do to hand a job on); ``RunJob`` streams
QUEUED, publishes the job, waits for it to come back on the result channel through the server's one
subscription, and streams the other three events, as ``bench.grpc_floor`` does. The worker is
``bench.reference``'s unbatched relay process: it republishes every message it receives on the result
channel. No job is stored, none has a lease, no outcome is checked: what jobgate adds above these
figures is what it costs to lose nothing.

It is driven with the same client shapes as ``bench.grpc_floor`` (``measure``): unary calls from 32
asyncio tasks, then sequential ``RunJob`` calls.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing
import sys
from collections.abc import AsyncIterator

import grpc
from redis.asyncio import Redis

from bench.grpc_floor import STATES, in_child, measure_rounds, spawned
from bench.reference import DISPATCH, RESULT, STOP, _run_relay
from devtools.servers import RedisProcess, free_port
from jobgate.v1 import job_pb2, scheduler_pb2, scheduler_pb2_grpc

WAIT_S = 10.0  # a RunJob's wait for its job to come back
READY_S = 30.0  # the measuring side's wait for the server and the relay


class Relayed(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Hands each job to the relay process and, for ``RunJob``, waits for it to come back."""

    def __init__(self, url: str) -> None:
        self.redis = Redis.from_url(url)
        self.subscriber = Redis.from_url(url)
        self.waiting: dict[bytes, asyncio.Future[None]] = {}
        self.ids = itertools.count()

    async def start(self) -> None:
        self.pubsub = self.subscriber.pubsub(ignore_subscribe_messages=True)
        await self.pubsub.subscribe(RESULT)
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            msg = await self.pubsub.get_message(timeout=WAIT_S)
            if msg is None:
                continue
            waiter = self.waiting.pop(msg["data"], None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    async def _hand_on(self, job: bytes) -> None:
        """PUBLISH ``job`` on the dispatch channel until the relay has it (0 receivers: it has not
        subscribed yet, only while it starts)."""
        async with asyncio.timeout(WAIT_S):
            while not await self.redis.publish(DISPATCH, job):  # noqa: ASYNC110 - nothing to wait on but Redis
                await asyncio.sleep(0.01)

    async def SubmitJob(  # noqa: N802 - the RPC's name
        self, request: scheduler_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.SubmitJobResponse:
        job_id = b"%032d" % next(self.ids)
        await self._hand_on(job_id)
        return scheduler_pb2.SubmitJobResponse(
            job=job_pb2.Job(id=job_id.decode(), spec=job_pb2.JobSpec(kind=request.kind))
        )

    async def RunJob(  # noqa: N802 - the RPC's name
        self, request: scheduler_pb2.RunJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.RunJobResponse]:
        job_id = b"%032d" % next(self.ids)
        back = self.waiting[job_id] = asyncio.get_running_loop().create_future()
        try:
            yield scheduler_pb2.RunJobResponse(
                event=job_pb2.JobEvent(job_id=job_id.decode(), kind="echo", state=STATES[0])
            )
            await self._hand_on(job_id)
            await asyncio.wait_for(back, WAIT_S)
        finally:
            self.waiting.pop(job_id, None)
        for state in STATES[1:]:
            yield scheduler_pb2.RunJobResponse(event=job_pb2.JobEvent(job_id=job_id.decode(), kind="echo", state=state))


async def serve(address: str, url: str) -> None:
    servicer = Relayed(url)
    await servicer.start()
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, server)
    server.add_insecure_port(address)
    await server.start()
    await server.wait_for_termination()


def run_server(address: str, url: str) -> None:
    import uvloop

    uvloop.run(serve(address, url))


async def _warm(address: str) -> None:
    """Returns once a ``RunJob`` has come back through the relay (it may still be subscribing)."""
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), READY_S)
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        async for _ in stub.RunJob(
            scheduler_pb2.RunJobRequest(job=scheduler_pb2.SubmitJobRequest(kind="echo")), timeout=READY_S
        ):
            pass


def _warm_then_measure(address: str, calls: int, trips: int, rounds: int) -> list[tuple[float, float, float]]:
    asyncio.run(_warm(address))
    return measure_rounds(address, calls, trips, rounds)


def relay_floor(url: str, calls: int, trips: int, rounds: int = 1) -> list[tuple[float, float, float]]:
    """Per round, unary calls/s (32 asyncio tasks) and ``RunJob`` p50 and p99 (ms) through gRPC in
    front of a bare relay on the Redis at ``url``."""
    address = f"127.0.0.1:{free_port()}"
    relay = multiprocessing.get_context("spawn").Process(target=_run_relay, args=(url, False), daemon=True)
    relay.start()
    try:
        with spawned(run_server, address, url):
            return in_child(_warm_then_measure, address, calls, trips, rounds)
    finally:
        asyncio.run(_stop_relay(url))
        relay.join(timeout=10)
        if relay.is_alive():
            relay.kill()
            relay.join(timeout=10)


async def _stop_relay(url: str) -> None:
    redis = Redis.from_url(url)
    try:
        await redis.publish(DISPATCH, STOP)
    finally:
        await redis.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay_floor", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=8000)
    parser.add_argument("--trips", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    redis = RedisProcess().start()
    try:
        for r, (rate, p50, p99) in enumerate(relay_floor(redis.url, args.calls, args.trips, args.rounds)):
            print(f"round {r + 1}: unary {rate:,.0f} calls/s (32 tasks); RunJob p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    finally:
        redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
