"""Many ``WatchResults`` streams held open by one benchmark process, for the memory readings of
the gateway (bench/systems/jobgate.py) and of gRPC alone (bench/grpc_floor.py)."""

from __future__ import annotations

import asyncio
from types import TracebackType

import grpc

from jobgate.v1 import scheduler_pb2, scheduler_pb2_grpc


class Streams:
    """``WatchResults`` streams over ``channels`` connections of their own (channels with equal
    arguments would share one: HTTP/2 caps the streams of a connection), opened with :meth:`open`;
    ``reached`` holds the index of each stream that has received a message. Leaving the ``async
    with`` block cancels them and closes the connections."""

    def __init__(self, address: str, channels: int, request: scheduler_pb2.WatchResultsRequest) -> None:
        self.request = request
        self.opened = [
            grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(channels)
        ]
        self.reached: set[int] = set()
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Streams:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for c in self.opened:
            await c.close()

    def open(self, n: int) -> None:
        """Opens ``n`` more streams."""
        for i in range(len(self.tasks), len(self.tasks) + n):
            self.tasks.append(asyncio.create_task(self._watch(i)))

    async def _watch(self, i: int) -> None:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(self.opened[i % len(self.opened)])
        async for _ in stub.WatchResults(self.request, timeout=600):
            self.reached.add(i)

    def check(self) -> None:
        """Raises what ended a stream, if any has ended (an open one never does by itself)."""
        if ended := [t for t in self.tasks if t.done()]:
            ended[0].result()
            raise RuntimeError(f"{len(ended)} of {len(self.tasks)} streams ended")

    @property
    def all_reached(self) -> bool:
        return len(self.reached) == len(self.tasks)
