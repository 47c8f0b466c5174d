"""RQ: ``rq worker`` processes with ``SimpleWorker``, which runs each job in the worker process.

RQ's default worker forks a work horse per job, which isolates jobs at a cost of milliseconds each;
``SimpleWorker`` runs jobs in-process as jobgate's, Celery's, Dramatiq's and arq's workers do, so
it is the like-for-like choice. RQ runs one job at a time per process. Batched submission is
``Queue.enqueue_many`` in a pipeline per chunk, unary is one ``Queue.enqueue`` per job from
concurrent threads, and the submitter waits for every result with ``Job.latest_result(timeout)``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import redis

from bench.systems.base import WAIT_S, System, check_count, chunks, job_input, rate, sequential_trips, threaded_unary

FUNC = "bench.systems.rq_app.echo"
WORKER_CLASS = "rq.worker.SimpleWorker"


class RQPeer(System):
    name = "rq"
    packages = ("rq", "redis", "hiredis")
    submitter = (
        "batched: `Queue.enqueue_many(..., pipeline=...)` per chunk; unary: `Queue.enqueue()` from threads; "
        "results: `Job.latest_result(timeout=...)`"
    )

    def __init__(self, redis_url: str) -> None:
        super().__init__(redis_url)
        from rq import Queue

        self.conn = redis.Redis.from_url(redis_url)
        self.queue = Queue("default", connection=self.conn)

    def argv(self) -> list[str]:
        rq = str(Path(self.python()[0]).with_name("rq"))
        return [rq, "worker", "--url", self.redis_url, "--worker-class", WORKER_CLASS, "--logging_level", "WARNING"]

    def settings(self, workers: int) -> str:
        return (
            f"{workers} × `rq worker --worker-class {WORKER_CLASS} --logging_level WARNING` "
            "(one job at a time per process; pickle serializer, the default)"
        )

    def start(self, workers: int) -> None:
        from rq import Worker

        for _ in range(workers):
            self.spawn(self.argv())
        self.wait_ready(lambda: Worker.count(connection=self.conn) == workers)
        if workers:
            self.round_trips(20)

    def _submit_many(self, n: int, payload: int) -> list[Any]:
        from rq import Queue

        jobs = []
        for part in chunks(n, payload):
            with self.conn.pipeline() as pipe:
                jobs += self.queue.enqueue_many(
                    [Queue.prepare_data(FUNC, args=(job_input(i, payload),)) for i in part], pipeline=pipe
                )
                pipe.execute()
        return jobs

    def batched(self, n: int, payload: int = 0) -> float:
        began = time.perf_counter()
        jobs = self._submit_many(n, payload)
        got = sum(1 for job in jobs if _result(job) is not None)
        ended = time.perf_counter()
        check_count(got, n)
        return rate(n, began, ended)

    def unary(self, n: int, clients: int) -> float:
        def client(inputs: range) -> list[Any]:
            sent = [self.queue.enqueue(FUNC, i) for i in inputs]
            return [_result(job) for job in sent]

        return threaded_unary(n, clients, client)

    def round_trips(self, n: int) -> list[float]:
        return sequential_trips(n, lambda i: _result(self.queue.enqueue(FUNC, i)))

    def enqueue(self, n: int) -> None:
        self._submit_many(n, 0)


def _result(job: Any) -> Any:
    """The job's return value, waiting for it (RQ's blocking wait is a whole number of seconds)."""
    result = job.latest_result(timeout=int(WAIT_S))
    if result is None:
        raise TimeoutError(f"no result for RQ job {job.id}")
    if result.type != result.Type.SUCCESSFUL:
        raise RuntimeError(f"RQ job {job.id}: {result.exc_string}")
    return result.return_value
