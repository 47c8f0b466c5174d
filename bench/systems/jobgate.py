"""jobgate: one gateway and ``python -m worker`` processes (the built-in ``echo`` handler), driven
over gRPC from one asyncio client.

Batched submission is ``SubmitJobs``, unary is one ``SubmitJob`` per job; both count completions
on one ``WatchResults`` stream (``max_batch`` 1,000, fewer for large payloads: completions that
arrive together come in one response). Round trips are ``RunJob`` calls, one after another.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc

from bench.streams import Streams
from bench.systems.base import BATCH_BYTES, WAIT_S, System, chunks, rate
from devtools.devstack import Stack
from jobgate.v1 import job_pb2, scheduler_pb2, scheduler_pb2_grpc
from jobgate_client import Client as JobgateClient
from tests.processes import wait_until

SLOTS = 64  # per worker: jobs one worker runs at once
# The measuring stream takes every completion of a burst while the same process is submitting:
# give it a buffer that holds the burst instead of the default 1,024 events.
T = TypeVar("T")
PROBE = -1  # the input of the job that shows a stream is registered
# The submitter keeps what it sent: the replies leave the jobs' inputs out (a 100 KB payload does not
# travel back), as a client that does not need them asks.
BASIC = scheduler_pb2.JOB_VIEW_BASIC
WATCH_BATCH = 1000  # completions per WatchResults response, at most (the gateway's limit)
ENV = {"JOBGATE_LOG_LEVEL": "WARNING", "JOBGATE_STREAM_BUFFER": "200000"}


def echo(i: int, payload: int = 0) -> scheduler_pb2.SubmitJobRequest:
    """An ``echo`` job: args ``{"i": i}``, or ``payload`` bytes (which echo returns) and no args."""
    if payload:
        return scheduler_pb2.SubmitJobRequest(kind="echo", payload=b"x" * payload)
    req = scheduler_pb2.SubmitJobRequest(kind="echo")
    req.args.struct_value.fields["i"].number_value = i
    return req


def is_probe(event: job_pb2.JobEvent) -> bool:
    fields = event.result.struct_value.fields
    return "i" in fields and fields["i"].number_value == PROBE


_RUNNER: asyncio.Runner | None = None


def shared_runner() -> asyncio.Runner:
    """The event loop every jobgate measurement of this process runs on, kept until the process
    exits. grpc.aio binds its poller to a loop for as long as any of its objects lives; with a new
    loop per system, a poller left bound to a closed one raised "Event loop is closed" with a
    traceback on every completion while later systems were measured in this process."""
    global _RUNNER  # one per process, on purpose
    if _RUNNER is None:
        _RUNNER = asyncio.Runner()
        atexit.register(_RUNNER.close)
    return _RUNNER


TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds a process has used so far (from /proc: that process alone,
    whatever else the machine runs)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid: int) -> float:
    """VmRSS of a process, in MB (10^6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Jobgate(System):
    name = "jobgate"
    packages = ("jobgate", "grpcio", "protobuf", "redis", "hiredis", "uvloop")
    submitter = (
        "batched: `SubmitJobs` per chunk (`view` JOB_VIEW_BASIC), every chunk in flight at once; "
        "unary: `SubmitJob` from asyncio tasks, "
        "and the Python client's `submit` (jobgate_client) from as many; "
        "results: one `WatchResults` stream (`max_batch` 1,000) counts completions; round trip: `RunJob`"
    )

    def __init__(self, redis_url: str) -> None:
        super().__init__(redis_url)
        self.stack: Stack | None = None
        self.address = ""
        self.runner: asyncio.Runner | None = None
        self.channel: grpc.aio.Channel | None = None
        self.stub: scheduler_pb2_grpc.SchedulerServiceStub | None = None
        self.queues: list[str] = []  # batched jobs go to these in turn (empty: the default queue)

    def settings(self, workers: int) -> str:
        return (
            f"1 gateway (`python -m gateway`, `JOBGATE_STREAM_BUFFER=200000`, log level WARNING) and "
            f"{workers} × `python -m worker --concurrency {SLOTS}` (asyncio, built-in `echo` handler); "
            "the client is one asyncio process"
        )

    def start(self, workers: int, env: dict[str, str] | None = None) -> None:
        self.stack = Stack(self.redis_url, "bench", env=ENV if env is None else env)
        _, self.address = self.stack.start_gateway()
        for _ in range(workers):
            self.stack.start_worker("--concurrency", str(SLOTS))
        self.runner = shared_runner()
        self.channel = self.runner.run(self._open())
        self.stub = scheduler_pb2_grpc.SchedulerServiceStub(self.channel)
        wait_until(lambda: self._live_workers() == workers, 30, f"{workers} jobgate workers", interval_s=0.1)
        if workers:
            self.round_trips(20)  # warm-up: connections, scripts, handler caches

    async def _open(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.address)

    def _live_workers(self) -> int:
        stub = self._stub()

        async def count() -> int:
            reply = await stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=5)
            return len(reply.workers)

        return self._run(count())

    def stop(self) -> None:
        if self.runner and self.channel:
            self.runner.run(self.channel.close())
        if self.stack:
            self.stack.stop()
        self.runner = self.channel = self.stub = self.stack = None

    def logs(self) -> str:
        return self.stack.logs() if self.stack else ""

    @property
    def gateway_pid(self) -> int:
        assert self.stack
        return self.stack.gateways[0].pid

    def processes(self) -> dict[str, list[int]]:
        """The stack's process ids: its gateways and its workers."""
        assert self.stack
        return {"gateway": [g.pid for g in self.stack.gateways], "workers": [w.pid for w in self.stack.workers]}

    # --- measurements ---------------------------------------------------------------------------
    def batched(self, n: int, payload: int = 0) -> float:
        stub = self._stub()

        async def submit() -> None:
            await asyncio.gather(
                *(
                    stub.SubmitJobs(
                        scheduler_pb2.SubmitJobsRequest(jobs=[self._echo(i, payload) for i in part], view=BASIC),
                        timeout=60,
                    )
                    for part in chunks(n, payload)
                )
            )

        return self._run(self._throughput(n, submit, payload))

    def _echo(self, i: int, payload: int) -> scheduler_pb2.SubmitJobRequest:
        req = echo(i, payload)
        if self.queues:
            req.queue = self.queues[i % len(self.queues)]
        return req

    def unary(self, n: int, clients: int) -> float:
        stub = self._stub()

        async def one_client(first: int) -> None:
            for i in range(first, n, clients):
                await stub.SubmitJob(echo(i), timeout=30)

        async def submit() -> None:
            await asyncio.gather(*(one_client(c) for c in range(clients)))

        return self._run(self._throughput(n, submit))

    def client_unary(self, n: int, clients: int) -> float:
        """The unary shape through the Python client (jobgate_client): ``submit`` from ``clients``
        concurrent tasks, each submit awaited before the next, as an application would call it.
        The client sends the submits that meet in flight together (one SubmitJobs per round trip)."""

        async def submit() -> None:
            async with JobgateClient(self.address, timeout=30) as client:

                async def one_client(first: int) -> None:
                    for i in range(first, n, clients):
                        await client.submit("echo", {"i": i})

                await asyncio.gather(*(one_client(c) for c in range(clients)))

        return self._run(self._throughput(n, submit))

    def round_trips(self, n: int) -> list[float]:
        stub = self._stub()

        async def trips() -> list[float]:
            out = []
            for i in range(n):
                began = time.perf_counter()
                async for resp in stub.RunJob(scheduler_pb2.RunJobRequest(job=self._echo(i, 0)), timeout=30):
                    last = resp.event.state
                if last != job_pb2.JOB_STATE_SUCCEEDED:
                    raise RuntimeError(f"RunJob ended in state {last}")
                out.append((time.perf_counter() - began) * 1000)
            return out

        return self._run(trips())

    def enqueue(self, n: int) -> None:
        stub = self._stub()

        async def submit() -> None:
            for part in chunks(n, 0):
                await stub.SubmitJobs(
                    scheduler_pb2.SubmitJobsRequest(jobs=[echo(i) for i in part], view=BASIC), timeout=60
                )

        self._run(submit())

    def stream_rss(self, streams: int, channels: int) -> tuple[float, float]:
        """The gateway's VmRSS (MB) before and with ``streams`` ``WatchResults`` streams open, spread
        over ``channels`` connections (HTTP/2 caps concurrent streams per connection). Every stream
        has received one completion before the second reading, so each is registered on the gateway."""
        before = rss_mb(self.gateway_pid)
        return before, self._run(self._streams_open_rss(streams, channels))

    async def _streams_open_rss(self, streams: int, channels: int) -> float:
        request = scheduler_pb2.WatchResultsRequest(kinds=["echo"])
        async with Streams(self.address, channels, request) as held, asyncio.timeout(120):
            held.open(streams)
            # A stream that registers after a probe job's completion misses it: probe until every
            # stream has had one.
            while not held.all_reached:
                held.check()
                async for _ in self._stub().RunJob(scheduler_pb2.RunJobRequest(job=echo(0)), timeout=30):
                    pass
                await asyncio.sleep(0.5)
            return rss_mb(self.gateway_pid)

    # --- plumbing -------------------------------------------------------------------------------
    def _stub(self) -> scheduler_pb2_grpc.SchedulerServiceStub:
        if self.stub is None:
            raise RuntimeError("jobgate is not started")
        return self.stub

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self.runner
        return self.runner.run(coro)

    async def _throughput(self, n: int, submit: Callable[[], Awaitable[None]], payload: int = 0) -> float:
        """Runs ``submit`` while one ``WatchResults`` stream counts ``n`` completions; jobs/s from
        the first submit to the n-th completion. A probe job, seen on the stream before the clock
        starts, proves the stream is registered on the gateway."""
        stub = self._stub()
        primed = asyncio.Event()
        # Completions that arrive together come in one response, as a client following many jobs
        # asks for them; no more than a submission chunk's worth of payload bytes in one response.
        batch = max(1, min(WATCH_BATCH, BATCH_BYTES // max(payload, 1)))
        request = scheduler_pb2.WatchResultsRequest(kinds=["echo"], max_batch=batch)
        call = stub.WatchResults(request, timeout=WAIT_S)

        async def count() -> float:
            seen = 0
            async for resp in call:
                for event in resp.events or [resp.event]:
                    if event.state != job_pb2.JOB_STATE_SUCCEEDED:
                        raise RuntimeError(f"job {event.job_id} ended {event.state}: {event.error}")
                    if is_probe(event):
                        primed.set()
                        continue
                    seen += 1
                if seen >= n:
                    return time.perf_counter()
            raise RuntimeError(f"the stream ended after {seen} of {n} completions")

        counter = asyncio.create_task(count())
        try:
            async with asyncio.timeout(30):
                while not primed.is_set():
                    await stub.SubmitJob(self._echo(PROBE, 0), timeout=10)
                    await asyncio.wait([asyncio.ensure_future(primed.wait()), counter], timeout=1.0)
                    if counter.done():
                        counter.result()
            began = time.perf_counter()
            await submit()
            ended = await asyncio.wait_for(counter, timeout=WAIT_S)
            return rate(n, began, ended)
        finally:
            call.cancel()
            counter.cancel()
