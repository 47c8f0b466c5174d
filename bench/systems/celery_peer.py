"""Celery with its Redis broker and Redis result backend.

Workers: ``celery worker`` processes with a thread pool; batched submission is a pipelined
``apply_async`` loop per chunk (one producer), unary is one ``delay`` per job from concurrent
threads, and the submitter waits for every result through ``ResultSet.get``/``AsyncResult.get``
(the Redis backend's pub/sub result consumer).
"""

from __future__ import annotations

import os
import time
from typing import Any

from bench.systems.base import WAIT_S, System, check_count, chunks, job_input, rate, sequential_trips, threaded_unary

POOL = os.environ.get("BENCH_CELERY_POOL", "threads")
CONCURRENCY = int(os.environ.get("BENCH_CELERY_CONCURRENCY", "8"))
PREFETCH = int(os.environ.get("BENCH_CELERY_PREFETCH", "16"))


class CeleryPeer(System):
    name = "celery"
    packages = ("celery", "kombu", "redis", "hiredis")
    submitter = (
        "batched: `apply_async()` on one producer per chunk (a `group` was some 20% slower); "
        "unary: `echo.delay()` from threads; results: `ResultSet.get()`, `AsyncResult.get()` (Redis backend)"
    )

    def __init__(self, redis_url: str) -> None:
        super().__init__(redis_url)
        os.environ["BENCH_REDIS_URL"] = redis_url  # read by celery_app at import
        from bench.systems import celery_app

        self.app: Any = celery_app.app
        self.echo: Any = celery_app.echo
        self.ready = celery_app.READY

    def argv(self, index: int) -> list[str]:
        return self.python(
            "-m", "celery", "-A", "bench.systems.celery_app", "worker",
            "--pool", POOL, "--concurrency", str(CONCURRENCY), "--prefetch-multiplier", str(PREFETCH),
            "--hostname", f"w{index}@%h", "--loglevel", "WARNING",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        )  # fmt: skip

    def settings(self, workers: int) -> str:
        args = " ".join(self.argv(1)[3:]).replace("w1@%h", "w<i>@%h")
        return f"{workers} × `celery {args}`; JSON messages, Redis broker and result backend"

    def start(self, workers: int) -> None:
        for i in range(workers):
            self.spawn(self.argv(i + 1), {"BENCH_REDIS_URL": self.redis_url})
        self.wait_ready(lambda: self.marked(self.ready) == workers)
        if workers:
            self.round_trips(20)

    def batched(self, n: int, payload: int = 0) -> float:
        from celery.result import ResultSet

        began = time.perf_counter()
        sent = [ResultSet(self._send_chunk(part, payload)) for part in chunks(n, payload)]
        got = sum(len(rs.get(timeout=WAIT_S)) for rs in sent)
        ended = time.perf_counter()
        check_count(got, n)
        return rate(n, began, ended)

    def _send_chunk(self, part: range, payload: int, ignore_result: bool = False) -> list[Any]:
        """One chunk as ``apply_async`` calls on one producer. (A ``group`` of the same tasks
        measured some 20% slower end to end here.)"""
        with self.app.producer_or_acquire() as producer:
            return [
                self.echo.apply_async((job_input(i, payload),), producer=producer, ignore_result=ignore_result)
                for i in part
            ]

    def unary(self, n: int, clients: int) -> float:
        def client(inputs: range) -> list[Any]:
            sent = [self.echo.delay(i) for i in inputs]
            return [r.get(timeout=WAIT_S) for r in sent]

        return threaded_unary(n, clients, client)

    def round_trips(self, n: int) -> list[float]:
        return sequential_trips(n, lambda i: self.echo.delay(i).get(timeout=30))

    def enqueue(self, n: int) -> None:
        # Nobody waits for these: without ignore_result, the result consumer would subscribe to
        # each task's result channel, which is the submitter's state, not the queued job's.
        for part in chunks(n, 0):
            self._send_chunk(part, 0, ignore_result=True)
