"""arq: worker processes running ``arq.worker.Worker`` (asyncio), driven from one asyncio client.

arq workers poll the queue (a sorted set) every ``poll_delay`` and clients poll for a result every
``poll_delay`` of ``Job.result``; both default to 0.5 s, which caps a worker at a few hundred jobs
a second, so both are set to 5 ms here, and ``max_jobs`` matches jobgate's slots per worker.
Batched submission is a ``gather`` of ``enqueue_job`` per 100 jobs (arq has no bulk enqueue), unary is
one ``enqueue_job`` per job from concurrent asyncio tasks, and the submitter waits for every result
with ``Job.result()``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from bench.systems.base import WAIT_S, System, chunks, job_input, rate

T = TypeVar("T")
# enqueue_job holds a connection for its WATCH/MULTI, and redis-py's pool has 100 by default.
GATHER = 100


class ArqPeer(System):
    name = "arq"
    packages = ("arq", "redis", "hiredis")
    submitter = (
        "batched: `asyncio.gather` of `enqueue_job`, 100 at a time (redis-py's default pool size); "
        "unary: `enqueue_job` from asyncio tasks; results: `Job.result()`, in submission order"
    )

    def __init__(self, redis_url: str) -> None:
        super().__init__(redis_url)
        os.environ["BENCH_REDIS_URL"] = redis_url
        from bench.systems import arq_app

        self.app = arq_app
        self.runner: asyncio.Runner | None = None
        self.pool: Any = None

    def settings(self, workers: int) -> str:
        return (
            f"{workers} × `arq.worker.Worker` (`python -m bench.systems.arq_app`: `max_jobs={self.app.MAX_JOBS}`, "
            f"`poll_delay={self.app.POLL_DELAY_S}`, `max_tries=1`, `log_results=False`); "
            f"clients wait with `Job.result(poll_delay={self.app.POLL_DELAY_S})` (asked again on "
            "`ResultNotFound`, a race of arq 0.25 fixed in 0.26); pickle serializer, the default"
        )

    def start(self, workers: int) -> None:
        from arq import create_pool

        self.runner = asyncio.Runner()
        self.pool = self._run(create_pool(self.app.WorkerSettings.redis_settings))
        for _ in range(workers):
            self.spawn(self.python("-m", "bench.systems.arq_app"), {"BENCH_REDIS_URL": self.redis_url})
        self.wait_ready(lambda: self.marked(self.app.READY) == workers)
        if workers:
            self.round_trips(20)

    def stop(self) -> None:
        super().stop()
        if self.runner:
            if self.pool is not None:
                self._run(self.pool.aclose())
            self.runner.close()
        self.runner = self.pool = None

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.runner is None:
            raise RuntimeError("arq is not started")
        return self.runner.run(coro)

    async def _result(self, job: Any, timeout_s: float = WAIT_S) -> Any:
        from arq.jobs import ResultNotFound

        # arq 0.25's Job.result reads the result and the queue in two commands, so a job that
        # finishes between them looks lost (ResultNotFound); asking again finds its result.
        for _ in range(2):
            try:
                return await job.result(timeout=timeout_s, poll_delay=self.app.POLL_DELAY_S)
            except ResultNotFound:
                pass
        return await job.result(timeout=timeout_s, poll_delay=self.app.POLL_DELAY_S)

    async def _submit_many(self, n: int, payload: int) -> list[Any]:
        jobs = []
        for part in chunks(n, payload):
            for start in range(0, len(part), GATHER):
                enqueued = (self.pool.enqueue_job("echo", job_input(i, payload)) for i in part[start : start + GATHER])
                jobs += await asyncio.gather(*enqueued)
        return jobs

    def batched(self, n: int, payload: int = 0) -> float:
        async def run() -> float:
            began = time.perf_counter()
            jobs = await self._submit_many(n, payload)
            for job in jobs:
                await self._result(job)
            return rate(n, began, time.perf_counter())

        return self._run(run())

    def unary(self, n: int, clients: int) -> float:
        async def client(first: int) -> None:
            sent = [await self.pool.enqueue_job("echo", i) for i in range(first, n, clients)]
            for job in sent:
                await self._result(job)

        async def run() -> float:
            began = time.perf_counter()
            await asyncio.gather(*(client(c) for c in range(clients)))
            return rate(n, began, time.perf_counter())

        return self._run(run())

    def round_trips(self, n: int) -> list[float]:
        async def run() -> list[float]:
            out = []
            for i in range(n):
                began = time.perf_counter()
                job = await self.pool.enqueue_job("echo", i)
                if await self._result(job, 30) != i:
                    raise RuntimeError("echo returned something else")
                out.append((time.perf_counter() - began) * 1000)
            return out

        return self._run(run())

    def enqueue(self, n: int) -> None:
        self._run(self._submit_many(n, 0))
