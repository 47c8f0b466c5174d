"""What every system in the side-by-side benchmark provides, and the process handling they share.

Each system runs the same no-op job (it returns its input) against the same private Redis, with
worker processes started for the measurement and stopped after it. The submitter lives in the
benchmark process and measures from its first submit to the last outcome it has received.
"""

from __future__ import annotations

import abc
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import redis

from tests.processes import Process, wait_until

ROOT = Path(__file__).resolve().parent.parent.parent

# One chunk of a batched submission: 500 jobs, fewer when their payloads are large, so that no
# request (or a gateway's reply, which carries the stored jobs) comes near gRPC's 4 MiB default.
BATCH = 500
BATCH_BYTES = 2_000_000

# Every wait in a measurement is bounded by this.
WAIT_S = 300.0


def chunks(n: int, payload: int) -> list[range]:
    """Index ranges covering ``range(n)``, one per submission batch for jobs of ``payload`` bytes."""
    size = max(1, min(BATCH, BATCH_BYTES // max(payload, 1)))
    return [range(start, min(n, start + size)) for start in range(0, n, size)]


def job_input(i: int, payload: int) -> int | str:
    """The job's input for the peers: its index, or a string of ``payload`` ASCII bytes."""
    return "x" * payload if payload else i


def rate(n: int, began: float, ended: float) -> float:
    """Jobs per second, from ``time.perf_counter()`` readings."""
    return n / max(ended - began, 1e-9)


def used_memory(url: str) -> int:
    """Redis's ``used_memory`` (bytes)."""
    with redis.Redis.from_url(url) as client:
        return int(client.info("memory")["used_memory"])


def flush(url: str) -> None:
    """Empties the Redis db, so every system starts from the same state."""
    with redis.Redis.from_url(url) as client:
        client.flushall()


def check_count(got: int, n: int) -> None:
    """Raises unless all ``n`` results came back."""
    if got != n:
        raise RuntimeError(f"{got} of {n} results came back")


def threaded_unary(n: int, clients: int, client: Callable[[range], list[Any]]) -> float:
    """Throughput of ``clients`` threads, each submitting its share of ``n`` jobs one call at a time
    and then waiting for their results (``client(inputs)`` returns them); every result must be the
    job's input. Jobs/s from the first submit to the last result."""
    with ThreadPoolExecutor(clients) as pool:
        began = time.perf_counter()
        shares = [range(first, n, clients) for first in range(clients)]
        got = sum(
            sum(1 for i, r in zip(share, res, strict=True) if r == i)
            for share, res in zip(shares, pool.map(client, shares), strict=True)
        )
        ended = time.perf_counter()
    check_count(got, n)
    return rate(n, began, ended)


def sequential_trips(n: int, run: Callable[[int], Any]) -> list[float]:
    """Round trips in ms: ``run(i)`` submits job ``i`` and returns its result, which must be ``i``."""
    out = []
    for i in range(n):
        began = time.perf_counter()
        if run(i) != i:
            raise RuntimeError("echo returned something else")
        out.append((time.perf_counter() - began) * 1000)
    return out


class System(abc.ABC):
    """One job system under test. ``start`` and ``stop`` bracket every measurement."""

    name: ClassVar[str]
    # Python distributions whose versions the report lists.
    packages: ClassVar[tuple[str, ...]]
    # How its submitter submits and waits, in Markdown, for the report.
    submitter: ClassVar[str]

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.procs: list[Process] = []
        self.spawned = 0  # names each process's log file, never reused within a run
        self.log_dir = tempfile.mkdtemp(prefix=f"bench-{self.name}-")

    # --- the interface -------------------------------------------------------------------------
    @abc.abstractmethod
    def settings(self, workers: int) -> str:
        """How its workers run, in Markdown, for the report."""

    @abc.abstractmethod
    def start(self, workers: int) -> None:
        """Starts ``workers`` worker processes (0: none, jobs stay queued) and waits until they are
        ready. Raises on failure or after a timeout."""

    def stop(self) -> None:
        """Stops every process started by ``start`` (also after a failure): SIGTERM to all, then
        each gets 10 s to exit before SIGKILL."""
        for p in self.procs:
            p.signal(signal.SIGTERM)
        for p in self.procs:
            p.stop()
        self.procs = []

    @abc.abstractmethod
    def batched(self, n: int, payload: int = 0) -> float:
        """Submits ``n`` jobs through the bulk API, waits for every result; returns jobs/s."""

    @abc.abstractmethod
    def unary(self, n: int, clients: int) -> float:
        """Submits ``n`` jobs one call each from ``clients`` concurrent submitters, waits for every
        result; returns jobs/s."""

    @abc.abstractmethod
    def round_trips(self, n: int) -> list[float]:
        """Runs ``n`` jobs one after another, each submitted once the previous result is in; returns
        each round trip in milliseconds."""

    @abc.abstractmethod
    def enqueue(self, n: int) -> None:
        """Submits ``n`` small jobs through the bulk API without waiting for them."""

    def bytes_per_job(self, n: int) -> float:
        """Redis ``used_memory`` growth per queued small job, with no worker running (bytes).

        A first tenth of ``n`` jobs goes in unmeasured, so that connections, loaded scripts and
        the queue's own keys are in place before the reading starts."""
        self.enqueue(max(n // 10, 1))
        before = used_memory(self.redis_url)
        self.enqueue(n)
        return (used_memory(self.redis_url) - before) / n

    def logs(self) -> str:
        """The end of each worker's log, for a failure's diagnosis."""
        return "\n".join(f"===== {p.name}\n{p.log()[-3000:]}" for p in self.procs)

    # --- helpers for the adapters -------------------------------------------------------------
    def spawn(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Process:
        """Starts a worker process for a measurement, in a session of its own so that stopping it
        also stops the children it forks (Celery's pool, Dramatiq's worker processes)."""
        self.spawned += 1
        name = f"{self.name}-{self.spawned}"
        proc = Process(name, argv, {"PYTHONPATH": str(ROOT), **(env or {})}, self.log_dir, cwd=ROOT)
        self.procs.append(proc)
        return proc

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def wait_ready(self, check: Callable[[], bool], timeout_s: float = 60) -> None:
        """Waits for ``check()``; raises with the workers' logs if one exits or time runs out."""

        def ready() -> bool:
            for p in self.procs:
                if not p.alive():
                    raise RuntimeError(f"{p.name} exited with {p.proc.returncode}:\n{p.log()[-3000:]}")
            return check()

        try:
            wait_until(ready, timeout_s, f"{self.name} workers")
        except TimeoutError as exc:
            logs = "\n".join(f"== {p.name}\n{p.log()[-2000:]}" for p in self.procs)
            raise TimeoutError(f"{exc}\n{logs}") from None

    def marked(self, marker: str) -> int:
        """How many of the worker logs contain ``marker`` (a regular expression)."""
        return sum(1 for p in self.procs if re.search(marker, p.log()))
