"""The machine's own pace, measured in every round beside the systems, so that figures from runs on
different machines (or one machine on a busy day) can be compared.

- A bare redis-py pub/sub relay with no persistence: this process publishes messages on a dispatch
  channel, a relay process subscribed to it publishes each one on a result channel, and this process
  counts them there. Unbatched: one PUBLISH at a time on each side; pipelined: PUBLISHes sent in
  pipelines (the relay sends whatever it has received at once). Messages per second, first publish
  to last message received.
- Python gRPC alone (``bench.grpc_floor``): unary calls per second from 32 asyncio tasks and
  ``RunJob`` round trips against handlers that do nothing.
- gRPC in front of the unbatched relay (``bench.relay_floor``): the same client shapes against
  handlers that hand each job to the relay process with one PUBLISH and, for ``RunJob``, wait for it
  to come back on the result channel: a gateway and a worker that store nothing.

``python -m bench.reference`` prints them.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
import time
from collections.abc import Callable

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from bench import grpc_floor
from devtools.servers import RedisProcess

DISPATCH = "bench:relay:dispatch"
RESULT = "bench:relay:result"
STOP = b"stop"
PIPELINE = 1000  # publishes per pipeline, pipelined run
WAIT_S = 60.0
MESSAGE = b"x" * 100
# what measures() returns
NAMES = (
    "relay_unbatched",
    "relay_pipelined",
    "grpc_unary",
    "grpc_p50",
    "grpc_p99",
    "grpc_rss_streams",
    "relayed_unary",
    "relayed_p50",
    "relayed_p99",
)


async def _next(pubsub: PubSub, timeout_s: float) -> bytes | None:
    """The next message's data, or None when none came within ``timeout_s`` (subscription replies
    are skipped)."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        msg = await pubsub.get_message(timeout=left)
        if msg is not None:
            data: bytes = msg["data"]
            return data
    return None


async def _relay(url: str, pipelined: bool) -> None:
    redis = Redis.from_url(url)
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(DISPATCH)
    await redis.publish(RESULT, b"ready")
    try:
        while True:
            data = await _next(pubsub, WAIT_S)
            if data is None:
                return  # nobody is publishing any more
            batch = [data]
            if pipelined:
                while (more := await pubsub.get_message(timeout=0)) is not None:
                    batch.append(more["data"])
            if STOP in batch:
                return
            if len(batch) == 1:
                await redis.publish(RESULT, batch[0])
            else:
                async with redis.pipeline(transaction=False) as pipe:
                    for data in batch:
                        pipe.publish(RESULT, data)
                    await pipe.execute()
    finally:
        await pubsub.aclose()
        await redis.aclose()


def _run_relay(url: str, pipelined: bool) -> None:
    asyncio.run(_relay(url, pipelined))


async def _drive(url: str, n: int, pipelined: bool) -> float:
    redis = Redis.from_url(url)
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(RESULT)
    relay = multiprocessing.get_context("spawn").Process(target=_run_relay, args=(url, pipelined), daemon=True)
    relay.start()
    try:
        async with asyncio.timeout(WAIT_S):
            if await _next(pubsub, WAIT_S) is None:  # the relay's "ready": it is subscribed
                raise TimeoutError("the relay process did not subscribe")

            async def count() -> float:
                for _ in range(n):
                    if await _next(pubsub, WAIT_S) is None:
                        raise TimeoutError("the relay stopped passing messages on")
                return time.perf_counter()

            counter = asyncio.create_task(count())
            began = time.perf_counter()
            if pipelined:
                for first in range(0, n, PIPELINE):
                    async with redis.pipeline(transaction=False) as pipe:
                        for _ in range(first, min(first + PIPELINE, n)):
                            pipe.publish(DISPATCH, MESSAGE)
                        await pipe.execute()
            else:
                for _ in range(n):
                    await redis.publish(DISPATCH, MESSAGE)
            ended = await counter
            return n / (ended - began)
    finally:
        await redis.publish(DISPATCH, STOP)
        relay.join(timeout=10)
        if relay.is_alive():
            relay.kill()
        await pubsub.aclose()
        await redis.aclose()


def relay_rate(url: str, n: int, pipelined: bool) -> float:
    """Messages per second through a bare pub/sub relay on the Redis at ``url``."""
    return asyncio.run(_drive(url, n, pipelined))


def measures(
    redis_url: str, relay_n: int, calls: int, trips: int, streams: int = 10_000, channels: int = 112
) -> dict[str, Callable[[], float]]:
    """Named measurements, in order; the gRPC figures come from one run of ``grpc_floor.floor``,
    the memory one from ``grpc_floor.stream_rss`` with ``streams`` open over ``channels``, and the
    relayed ones from one run of ``relay_floor.relay_floor``."""
    figures: list[float] = []
    relayed: list[float] = []

    def unary() -> float:
        [(rate, p50, p99)] = grpc_floor.floor(calls, trips)
        figures[:] = [rate, p50, p99]
        return rate

    def relayed_unary() -> float:
        from bench.relay_floor import relay_floor  # it imports this module

        [(rate, p50, p99)] = relay_floor(redis_url, calls, trips)
        relayed[:] = [rate, p50, p99]
        return rate

    return {
        "relay_unbatched": lambda: relay_rate(redis_url, relay_n, False),
        "relay_pipelined": lambda: relay_rate(redis_url, relay_n * 4, True),
        "grpc_unary": unary,
        "grpc_p50": lambda: figures[1],
        "grpc_p99": lambda: figures[2],
        "grpc_rss_streams": lambda: grpc_floor.stream_rss(streams, channels),
        "relayed_unary": relayed_unary,
        "relayed_p50": lambda: relayed[1],
        "relayed_p99": lambda: relayed[2],
    }


def main() -> int:
    server = RedisProcess().start()
    try:
        for name, measure in measures(server.url, 20_000, 8_000, 1_000).items():
            print(f"{name:<16} {measure():>12,.2f}", flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
