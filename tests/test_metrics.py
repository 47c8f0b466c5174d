"""Prometheus metrics of a gateway and a worker, scraped over HTTP as an operator's collector would."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from devtools.devstack import Stack
from devtools.servers import free_port

from .helpers import Client, eventually
from .processes import metrics_env, scrape


async def test_gateway_and_worker_export_what_they_did(stack: Stack, client_for: Callable[[str], Client]) -> None:
    gw_port, worker_port = free_port(), free_port()
    _, address = stack.start_gateway(env=metrics_env(gw_port))
    client = client_for(address)
    ids = [(await client.submit("echo", {"n": n})).job.id for n in range(3)]
    ids.append((await client.submit("fail", max_attempts=1)).job.id)
    with pytest.raises(grpc.aio.AioRpcError):
        await client.submit("")
    waiting = ("jobgate_queue_jobs_waiting", (("queue", "default"),))
    live = ("jobgate_workers_live", ())

    async def census(jobs: int | None, workers: int) -> bool:
        now = scrape(gw_port)
        return now.get(waiting) == jobs and now.get(live) == workers

    await eventually(lambda: census(4, 0), what="4 jobs waiting, no worker")
    stack.start_worker(env=metrics_env(worker_port))
    await client.wait_results(ids)
    await eventually(lambda: census(None, 1), what="the emptied queue dropped, 1 worker")

    gw = scrape(gw_port)
    assert gw[("jobgate_gateway_jobs_submitted_total", ())] == 4
    assert gw[("jobgate_gateway_rpcs_total", (("code", "OK"), ("method", "SubmitJob")))] == 4
    assert gw[("jobgate_gateway_rpcs_total", (("code", "INVALID_ARGUMENT"), ("method", "SubmitJob")))] == 1
    assert gw[("jobgate_gateway_rpcs_total", (("code", "OK"), ("method", "WatchResults")))] == 1
    assert gw[("jobgate_gateway_jobs_placed_total", ())] == 4
    assert gw[("jobgate_gateway_redis_up", ())] == 1
    assert gw[("jobgate_gateway_streams_open", ())] == 0
    w = scrape(worker_port)
    assert w[("jobgate_worker_jobs_total", (("kind", "echo"), ("state", "SUCCEEDED")))] == 3
    assert w[("jobgate_worker_jobs_total", (("kind", "fail"), ("state", "FAILED")))] == 1
    assert w[("jobgate_worker_job_duration_seconds_count", (("kind", "echo"),))] == 3
    assert w[("jobgate_worker_jobs_running", ())] == 0
