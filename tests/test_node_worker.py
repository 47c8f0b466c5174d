"""A Node.js worker written from docs/PROTOCOL.md alone runs jobs end to end as the only worker.

The worker is tests/node/worker.mjs (node-redis + protobufjs, the Lua scripts of protocol/lua/ and
the envelopes of proto/). node, npm and the npm install come from the `node` fixture (conftest.py).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devtools.devstack import Stack
from jobgate.v1 import job_pb2, scheduler_pb2
from protocol.keys import Keys

from .helpers import FAST, NPM_TIMEOUT_S, Client, NodeWorker, call_failed, eventually, request, value
from .test_shards import spread

EXIT_TIMEOUT_S = 10


@pytest.fixture
def start_node_worker(
    request: pytest.FixtureRequest,
    node: str,
    redis_url: str,
    namespace: str,
) -> Iterator[Callable[..., NodeWorker]]:
    """Starts Node workers; kills any still running after the test, printing their output if it failed."""
    started: list[NodeWorker] = []
    log_dir = Path(tempfile.mkdtemp(prefix="jobgate-node-worker-"))

    def start(worker_id: str, env: dict[str, str] | None = None) -> NodeWorker:
        w = NodeWorker(node, redis_url, namespace, worker_id, log_dir, env)
        started.append(w)
        return w

    yield start
    failed = call_failed(request)
    for w in started:
        w.kill()
        if failed:
            print(f"===== node worker {w.worker_id}\n{w.log()[-4000:]}")
    shutil.rmtree(log_dir, ignore_errors=True)


async def _workers(client: Client) -> list[scheduler_pb2.WorkerInfo]:
    reply = await client.stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=5)
    return list(reply.workers)


# The first run includes `npm ci` (bounded by NPM_TIMEOUT_S), which the default per-test timeout
# would cut short; later runs take a few seconds.
@pytest.mark.timeout(NPM_TIMEOUT_S + 60)
async def test_node_worker_runs_and_fails_jobs_and_leaves_cleanly_on_sigterm(
    stack: Stack, client_for: Callable[[str], Client], start_node_worker: Callable[[str], NodeWorker]
) -> None:
    _, address = stack.start_gateway()
    client = client_for(address)
    worker = start_node_worker(f"node-{os.getpid()}")
    listed = await eventually(lambda: _workers(client), timeout=20, what="the node worker registered")
    assert [(w.id, list(w.kinds), list(w.queues)) for w in listed] == [
        (worker.worker_id, ["node.count", "node.fail", "node.upper"], ["default"])
    ]

    upper = (await client.submit("node.upper", {"text": "hello"})).job.id
    failing = (await client.submit("node.fail", {})).job.id
    # a spec over 4 KiB is not carried in the dispatch (spec_omitted): the worker reads it itself
    large = (await client.submit("node.upper", {"text": "abc" * 3000})).job.id
    events = await client.wait_results([upper, failing, large], timeout=20)
    assert value(events[large].result) == {"text": "ABC" * 3000, "by": "node"}, events[large]

    ok = events[upper]
    assert ok.state == job_pb2.JOB_STATE_SUCCEEDED, ok
    assert value(ok.result) == {"text": "HELLO", "by": "node"}
    assert ok.worker_id == worker.worker_id
    assert ok.attempt == 1
    failed = events[failing]
    assert failed.state == job_pb2.JOB_STATE_FAILED, failed
    assert failed.error.code == "HANDLER_ERROR"
    assert failed.error.message, failed
    assert failed.worker_id == worker.worker_id

    # progress, reported by the handler and written by the progress script
    run = client.stub.RunJob(scheduler_pb2.RunJobRequest(job=request("node.count", {"steps": 6, "seconds": 1.5})))
    seen = [r.event async for r in run]
    reports = [e.progress for e in seen if e.HasField("progress")]
    assert seen[-1].state == job_pb2.JOB_STATE_SUCCEEDED and 1 <= len(reports) <= 5, seen
    assert reports[0].message.startswith("step ") and 0 < reports[0].fraction <= 1
    stored = (await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=seen[-1].job_id), timeout=5)).job
    assert stored.progress == reports[-1]

    # the scripts' counts (written at the end of each call, as PROTOCOL.md wraps a script) count
    # what this worker finished: 3 succeeded, 1 failed
    reply = await client.stub.GetQueueStats(scheduler_pb2.GetQueueStatsRequest(queues=["default"]), timeout=5)
    [stats] = reply.queues
    assert (stats.succeeded, stats.failed, sum(stats.ended_by_minute)) == (3, 1, 4), stats

    worker.proc.send_signal(signal.SIGTERM)
    try:
        code = await asyncio.to_thread(worker.proc.wait, EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the node worker still ran {EXIT_TIMEOUT_S}s after SIGTERM")
    assert code == 0
    # leave unregistered it at once: no waiting for its heartbeat to expire
    assert await _workers(client) == []


@pytest.mark.timeout(NPM_TIMEOUT_S + 60)
async def test_node_worker_serves_queues_of_several_shards(
    redis_url: str, namespace: str, client_for: Callable[[str], Client], start_node_worker: Callable[..., NodeWorker]
) -> None:
    """With redis_shards, the Node worker registers in each shard of its queues with a share of its
    slots, hears dispatches on each shard's channel and records outcomes in each job's shard."""
    keys = Keys(namespace, 4)
    queues = spread(keys, 3)
    stack = Stack(redis_url, namespace, env={**FAST, "JOBGATE_REDIS_SHARDS": "4"})
    try:
        client = client_for(stack.start_gateway()[1])
        worker = start_node_worker(
            f"node-{os.getpid()}", {"JOBGATE_QUEUES": ",".join(queues), "JOBGATE_REDIS_SHARDS": "4"}
        )
        listed = await eventually(lambda: _workers(client), timeout=20, what="the node worker registered")
        assert [(w.id, sorted(w.queues), w.slots) for w in listed] == [(worker.worker_id, sorted(queues), 4)]
        ids = [(await client.submit("node.upper", {"text": q}, queue=q)).job.id for q in queues]
        events = await client.wait_results(ids, timeout=20)
        assert [value(events[i].result) for i in ids] == [{"text": q.upper(), "by": "node"} for q in queues]
        worker.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker.proc.wait, EXIT_TIMEOUT_S) == 0
        assert await _workers(client) == []  # it left every shard
    finally:
        stack.stop()
