"""A gateway of several processes on one address (``processes``): every process serves, the kernel
spreads connections over them, signals reach them all, and one that dies takes the rest down."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from devtools.devstack import Service, Stack
from devtools.servers import free_port
from jobgate.v1 import job_pb2, scheduler_pb2, scheduler_pb2_grpc

from .helpers import request
from .processes import children_of, scrape

RPCS = "jobgate_gateway_rpcs_total"
RUN_JOB = ("method", "RunJob")


def gone(pids: set[int], timeout_s: float = 20) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{p}").exists() for p in pids):
            return True
        time.sleep(0.1)
    return False


def start(stack: Stack, processes: int = 3) -> tuple[Service, str, int, set[int]]:
    metrics = free_port()  # process i takes metrics + i
    env = {"JOBGATE_PROCESSES": str(processes), "JOBGATE_METRICS_LISTEN": f"127.0.0.1:{metrics}"}
    gateway, address = stack.start_gateway(env=env)
    deadline = time.monotonic() + 20
    while len(children := children_of(gateway.pid)) < processes and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(children) == processes, gateway.log()
    # A process serves its metrics (port + i) only once its gRPC server listens: until every one
    # does, the kernel can hand every connection to the first.
    waiting = set(range(processes))
    while waiting and time.monotonic() < deadline + 20:
        for index in list(waiting):
            try:
                scrape(metrics + index)
                waiting.discard(index)
            except OSError:
                pass
        time.sleep(0.1)
    assert not waiting, gateway.log()
    return gateway, address, metrics, children


async def run_echo(address: str, n: int) -> job_pb2.JobEvent:
    # a channel of its own (no shared subchannel): a connection of its own, which the kernel gives
    # to one of the processes
    async with grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        call = stub.RunJob(scheduler_pb2.RunJobRequest(job=request("echo", {"n": n})), timeout=20)
        return [r.event async for r in call][-1]


async def test_every_process_serves_one_address_and_sigterm_stops_them_all(stack: Stack) -> None:
    gateway, address, metrics, children = start(stack)
    stack.start_worker()
    outcomes = await asyncio.gather(*(run_echo(address, n) for n in range(24)))
    assert {e.state for e in outcomes} == {job_pb2.JOB_STATE_SUCCEEDED}
    served = []
    for index in range(3):  # process i serves metrics on the port + i
        samples = scrape(metrics + index)
        served.append(
            sum(v for (name, labels), v in samples.items() if name == RPCS and ("method", "RunJob") in labels)
        )
    assert sum(served) == 24 and sum(1 for n in served if n) >= 2, served  # spread over the processes

    gateway.signal(signal.SIGTERM)
    assert gateway.wait_or_kill(30) == 0, gateway.log()
    assert gone(children), "a gateway process outlived SIGTERM"
    assert gateway.log().count("INFO gateway: stopped") == 3


async def test_a_process_that_dies_stops_the_others_and_the_gateway_exits_with_an_error(stack: Stack) -> None:
    gateway, _, _, children = start(stack, processes=2)
    victim = min(children)
    os.kill(victim, signal.SIGKILL)
    assert gateway.wait_or_kill(30) == 1, gateway.log()
    assert gone(children)
    assert f"(pid {victim}) exited (signal SIGKILL): stopping the others" in gateway.log()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"JOBGATE_PROCESSES": "0"}, "processes must be from 1 to 64"),
        ({"JOBGATE_PROCESSES": "65"}, "processes must be from 1 to 64"),
        ({"JOBGATE_PROCESSES": "4", "JOBGATE_METRICS_LISTEN": "127.0.0.1:65534"}, "metrics_listen's port"),
    ],
)
def test_process_counts_that_cannot_work_stop_the_gateway_at_start(env: dict[str, str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway"],
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0 and message in done.stderr, done.stderr
