"""Shared fixtures: a private Redis, a unique namespace per test, and the stack as real processes."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from devtools.devstack import Stack
from devtools.servers import ClusterProcess, RedisProcess
from protocol.keys import Keys

from .helpers import (
    FAST,
    NODE_DIR,
    NPM_TIMEOUT_S,
    Client,
    PausableRedis,
    node_and_npm,
    node_packages_installed,
    running_stack,
    start_gateway,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "gateway(env=None, worker=()): settings of the `client` fixture's gateway, arguments of its worker"
    )


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
def private_redis() -> Iterator[RedisProcess]:
    """A Redis of the test's own, with an append-only file, which it may kill, restart or pause."""
    server = PausableRedis(appendonly=True).start()
    try:
        yield server
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
    with running_stack(request, redis_url, namespace, FAST) as s:
        yield s


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, socket_timeout=5)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[..., Client]]:
    """Opens clients for gateway addresses and closes them after the test."""
    opened: list[Client] = []

    def open_client(address: str, metrics_port: int = 0) -> Client:
        c = Client(address, metrics_port)
        opened.append(c)
        return c

    yield open_client
    for c in opened:
        await c.close()


@pytest.fixture
def client(request: pytest.FixtureRequest, stack: Stack, client_for: Callable[..., Client]) -> Client:
    """One gateway (serving metrics) and one worker, and a client of the gateway. A module or test
    marked ``@pytest.mark.gateway(env={...}, worker=(...))`` gives the gateway more settings and the
    worker its arguments (``worker=None``: no worker)."""
    mark = request.node.get_closest_marker("gateway")
    options = mark.kwargs if mark else {}
    _, address, port = start_gateway(stack, env=options.get("env"))
    if (worker := options.get("worker", ())) is not None:
        stack.start_worker(*worker)
    return client_for(address, port)


@pytest.fixture(scope="session")
def node() -> str:
    """The node binary, with tests/node's packages installed; installs them once if needed."""
    if os.environ.get("JOBGATE_SKIP_NODE") == "1":
        pytest.skip("JOBGATE_SKIP_NODE=1")
    node, npm = node_and_npm()
    if not node_packages_installed():
        has_lock = (NODE_DIR / "package-lock.json").exists()
        # --ignore-scripts: the only install script (protobufjs's) merely prints version advice.
        args = [*npm, "ci" if has_lock else "install", "--ignore-scripts", "--no-audit", "--no-fund"]
        try:
            done = subprocess.run(args, cwd=NODE_DIR, capture_output=True, text=True, timeout=NPM_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`npm {args[len(npm)]}` in {NODE_DIR} took over {NPM_TIMEOUT_S}s")
        if done.returncode != 0:
            pytest.fail(
                f"`npm {args[len(npm)]}` in {NODE_DIR} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
            )
    return node


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterProcess]:
    """A local Redis Cluster (3 primaries, 3 replicas) for the module: each test leaves it healthy,
    and asks it who serves what."""
    c = ClusterProcess().start()
    try:
        yield c
    finally:
        c.stop()
