"""Dramatiq with its Redis broker and the Results middleware's Redis backend.

Workers: one ``dramatiq`` command with as many worker processes as the other systems have
workers, each with its default 8 threads. Batched submission is a ``group`` per chunk (Dramatiq's
Redis broker has no bulk enqueue: a group enqueues its messages one by one), unary is one ``send``
per job from concurrent threads, and the submitter waits for every result through the Results
backend (``get_result(block=True)``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from bench.systems.base import WAIT_S, System, check_count, chunks, job_input, rate, sequential_trips, threaded_unary

THREADS = 8
READY = "Worker process is ready for action"


class DramatiqPeer(System):
    name = "dramatiq"
    packages = ("dramatiq", "redis", "hiredis")
    submitter = (
        "batched: `group(...).run()` per chunk (one enqueue per message); unary: `echo.send()` from threads; "
        "results: `get_results(block=True)`, `get_result(block=True)` (Results middleware)"
    )

    def __init__(self, redis_url: str) -> None:
        super().__init__(redis_url)
        os.environ["BENCH_REDIS_URL"] = redis_url  # read by dramatiq_app at import
        from bench.systems import dramatiq_app

        self.echo: Any = dramatiq_app.echo

    def argv(self, workers: int) -> list[str]:
        return self.python(
            "-m", "dramatiq", "bench.systems.dramatiq_app", "--processes", str(workers), "--threads", str(THREADS)
        )  # fmt: skip

    def settings(self, workers: int) -> str:
        args = " ".join(self.argv(workers)[3:])
        return (
            f"`dramatiq {args}` ({workers} worker processes × {THREADS} threads; defaults otherwise: "
            f"prefetch 2 × threads, idle poll back-off up to 1 s); JSON messages, "
            "`Results` middleware with `RedisBackend`, `max_retries=0`"
        )

    def start(self, workers: int) -> None:
        if workers:
            self.spawn(self.argv(workers), {"BENCH_REDIS_URL": self.redis_url})
            self.wait_ready(lambda: self._ready_count() == workers)
            self.round_trips(20)

    def _ready_count(self) -> int:
        return sum(p.log().count(READY) for p in self.procs)

    def batched(self, n: int, payload: int = 0) -> float:
        from dramatiq import group

        began = time.perf_counter()
        sent = [group(self.echo.message(job_input(i, payload)) for i in part).run() for part in chunks(n, payload)]
        got = sum(sum(1 for _ in g.get_results(block=True, timeout=int(WAIT_S * 1000))) for g in sent)
        ended = time.perf_counter()
        check_count(got, n)
        return rate(n, began, ended)

    def unary(self, n: int, clients: int) -> float:
        def client(inputs: range) -> list[Any]:
            sent = [self.echo.send(i) for i in inputs]
            return [m.get_result(block=True, timeout=int(WAIT_S * 1000)) for m in sent]

        return threaded_unary(n, clients, client)

    def round_trips(self, n: int) -> list[float]:
        return sequential_trips(n, lambda i: self.echo.send(i).get_result(block=True, timeout=30_000))

    def enqueue(self, n: int) -> None:
        from dramatiq import group

        for part in chunks(n, 0):
            group(self.echo.message(i) for i in part).run()
