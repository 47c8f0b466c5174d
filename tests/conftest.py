"""Shared fixtures: a private Redis, a unique namespace per test, and the stack as real processes."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from redis.asyncio import Redis

from devtools.devstack import RedisProcess, Stack
from jobgate.v1 import scheduler_pb2, scheduler_pb2_grpc
from protocol.keys import Keys

# Short heartbeats and ticks so fault tests settle in seconds, not minutes.
FAST = {
    "JOBGATE_HEARTBEAT_MS": "200",
    "JOBGATE_HEARTBEAT_TTL_MS": "1000",
    "JOBGATE_TICK_MS": "200",
    "JOBGATE_ACK_TIMEOUT_MS": "1000",
    "JOBGATE_RECONCILE_MS": "1000",
    "JOBGATE_GRACE_S": "5",
    "JOBGATE_LOG_LEVEL": "INFO",
}


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """``JOBGATE_TEST_REDIS_URL``, else a private redis-server for the session."""
    if url := os.environ.get("JOBGATE_TEST_REDIS_URL"):
        yield url
        return
    server = RedisProcess().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def namespace() -> str:
    """A namespace of its own for each test, so tests never see each other's keys."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def keys(namespace: str) -> Keys:
    return Keys(namespace)


@pytest.fixture
def stack(request: pytest.FixtureRequest, redis_url: str, namespace: str) -> Iterator[Stack]:
    """Gateways and workers as subprocesses; their logs are printed when the test fails."""
    s = Stack(redis_url, namespace, env=FAST)
    try:
        yield s
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(s.logs())
        s.stop()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, socket_timeout=5)
    try:
        yield client
    finally:
        await client.aclose()


class Client:
    """A gRPC client for one gateway address, with a few conveniences for tests."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = scheduler_pb2_grpc.SchedulerServiceStub(self.channel)

    async def submit(self, kind: str = "echo", args: Any = None, **fields: Any) -> scheduler_pb2.SubmitJobResponse:
        return await self.stub.SubmitJob(request(kind, args, **fields), timeout=10)

    async def wait_results(self, job_ids: list[str], timeout: float = 30) -> dict[str, Any]:
        """Streams WatchResults for ``job_ids`` until it ends; returns events by job id."""
        events = {}
        call = self.stub.WatchResults(scheduler_pb2.WatchResultsRequest(job_ids=job_ids), timeout=timeout)
        async for resp in call:
            assert resp.event.job_id not in events, "a job was reported terminal twice"
            events[resp.event.job_id] = resp.event
        return events

    async def close(self) -> None:
        await self.channel.close()


def request(kind: str = "echo", args: Any = None, **fields: Any) -> scheduler_pb2.SubmitJobRequest:
    req = scheduler_pb2.SubmitJobRequest(kind=kind, **fields)
    if args is not None:
        json_format.ParseDict(args, req.args)
    return req


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[[str], Client]]:
    """Opens clients for gateway addresses and closes them after the test."""
    opened: list[Client] = []

    def open_client(address: str) -> Client:
        c = Client(address)
        opened.append(c)
        return c

    yield open_client
    for c in opened:
        await c.close()


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 20, what: str = "condition") -> Any:
    """Polls an async ``check`` until it returns something truthy; fails the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.05)
    pytest.fail(f"{what} not reached within {timeout}s (last: {last!r})")


def value(v: Any) -> Any:
    """A google.protobuf.Value as plain Python."""
    return json_format.MessageToDict(v)
