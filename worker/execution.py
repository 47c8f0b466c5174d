"""A worker's execution: slots, handler threads and tasks, timeouts, and recording outcomes.

Each dispatch is acknowledged with a start call (which refuses stale or forged placements), the
handler runs (plain functions in a thread pool, coroutine functions on the event loop) under the
job's timeout, and the outcome is recorded with a finish call, which also publishes it on the
result channel and refills the freed slot. Concurrent starts and finishes share one script call.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from google.protobuf.struct_pb2 import Value

from common import tracing
from jobgate.v1 import job_pb2, relay_pb2
from protocol.coalesce import Coalescer
from protocol.codec import events_message, python_to_value, set_ms, value_to_python
from protocol.connection import longest_call_s, now_ms
from protocol.errors import transient
from protocol.keys import JOB_ID_RE
from protocol.worker_calls import Outcome, Start, WorkerCalls

from .config import WorkerSettings
from .metrics import WorkerMetrics
from .progress import ProgressReporter
from .registry import Fatal, JobContext, Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Result:
    """What one attempt produced."""

    state: int
    result: bytes = b""  # google.protobuf.Value bytes
    output: bytes = b""
    error_code: str = ""
    error_message: str = ""


@dataclass
class Running:
    """A job this worker holds."""

    dispatch: relay_pb2.DispatchJob
    task: asyncio.Task[None] | None = None
    handler_task: asyncio.Future[Any] | None = None
    thread: Future[Any] | None = None  # the handler's thread, for plain-function handlers
    cancel_requested: bool = False
    timed_out: bool = False  # its handler was cancelled at the job's deadline
    started: bool = False


class Executor:
    """Runs the jobs placed on one worker, within its concurrency."""

    def __init__(
        self,
        calls: WorkerCalls,
        settings: WorkerSettings,
        worker_id: str,
        instance: str,
        registry: Registry,
        metrics: WorkerMetrics,
    ) -> None:
        self.calls = calls
        self.settings = settings
        self.id = worker_id
        self.instance = instance  # the token this process registers with (see Membership)
        self.registry = registry
        self.metrics = metrics
        self.pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="jobgate-handler")
        self.slots = asyncio.Semaphore(settings.concurrency)
        # By (job id, lease): an attempt is known by its placement, so a dispatch for the same job with
        # another lease (a later placement, or a forgery) never displaces the attempt running here.
        self.jobs: dict[tuple[str, int], Running] = {}
        self.running = 0  # jobs started here and not ended (the running-jobs gauge reads it when scraped)
        metrics.running.set_function(lambda: self.running)
        # The deadlines of running handlers, earliest first, with one timer for the earliest: a
        # timer per job costs several times as much. Entries of jobs that ended stay until the heap
        # holds twice as many as are running (then it is rebuilt without them).
        self.deadlines: list[tuple[float, int, Running]] = []
        self.deadline_timer: asyncio.TimerHandle | None = None
        self.deadline_at = math.inf
        self._order = itertools.count()  # ties between deadlines: never compare Running objects
        self.draining = False
        self.stuck_threads = 0  # handler threads still running after their job ended
        self.on_slot_lost: Callable[[], None] = lambda: None  # a slot is held by a stuck thread: report it
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        # A start or finish call that takes longer is abandoned and tried again (see longest_call_s).
        self.call_s = longest_call_s(settings.redis_timeout_s, settings.redis_wait_timeout_ms)
        self.reporter = ProgressReporter(calls, worker_id, settings.progress_interval_ms / 1000, self.call_s)
        self.starts: Coalescer[Start, int] = Coalescer(self._start_many)
        self.finishes: Coalescer[Outcome, int] = Coalescer(self._finish_many, size=lambda o: o.size)
        self.spec_reads: Coalescer[str, bytes | None] = Coalescer(self._read_specs)

    def held(self) -> list[tuple[str, asyncio.Task[None] | None]]:
        """The jobs this worker holds now, with their tasks."""
        return [(job_id, r.task) for (job_id, _), r in self.jobs.items()]

    async def drain(self, grace_s: float) -> None:
        """Lets running jobs finish within ``grace_s``; cancels the rest (handed back by leaving)."""
        tasks = [r.task for r in self.jobs.values() if r.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def aclose(self) -> None:
        await self.starts.aclose()
        await self.finishes.aclose()
        await self.spec_reads.aclose()
        if self.deadline_timer is not None:
            self.deadline_timer.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # --- placements ----------------------------------------------------------------------
    def on_dispatch(self, d: relay_pb2.DispatchJob, taken: bool = False) -> None:
        """A placement on this worker: dispatched, or ``taken`` (started here by the finish_many call
        that freed its slot)."""
        if not JOB_ID_RE.fullmatch(d.job_id):
            log.warning("dropped a dispatch with a malformed job id")
            return
        if (d.job_id, d.lease) in self.jobs:
            return  # duplicate delivery, or a taken job a repeated finish_many call returned again
        if self.draining:
            return  # not acknowledged (or, taken, on this worker's books): handed back by the leave script
        running = Running(d)
        self.jobs[d.job_id, d.lease] = running
        running.task = asyncio.create_task(self._execute(running, taken), name=f"job-{d.job_id}")

    def on_cancel(self, c: relay_pb2.CancelJob) -> None:
        running = self.jobs.get((c.job_id, c.lease))
        if running is None:
            return
        if not running.cancel_requested:  # gateways repeat the message until the job ends
            log.info("job_id=%s cancel requested", c.job_id)
        running.cancel_requested = True
        if running.handler_task is not None:
            running.handler_task.cancel()

    # --- running a job --------------------------------------------------------------------
    async def _execute(self, running: Running, taken: bool = False) -> None:
        """Runs one placement: acknowledges it with a start call, or, when ``taken`` (started by
        the finish_many call that freed its slot), runs it at once."""
        d = running.dispatch
        acquired = False
        try:
            # Normally immediate: the gateway places no more jobs than the slots this worker offers.
            # A dispatch that still finds none free in time is left unacknowledged (placed again);
            # a taken job is running here already, so it runs even then.
            try:
                if self.slots.locked():
                    await asyncio.wait_for(self.slots.acquire(), timeout=self.settings.heartbeat_ttl_ms / 1000)
                else:
                    await self.slots.acquire()  # free: no need for a timer
                acquired = True
            except TimeoutError:
                if not taken:
                    log.warning("job_id=%s no free slot in time; leaving the dispatch unacknowledged", d.job_id)
                    return
                log.warning("job_id=%s no free slot in time; running it beyond the concurrency", d.job_id)
            if d.spec_omitted and not await self._read_spec(d):
                return
            if not taken and (self.draining or not await self._start(d)):
                return
            log.info("job_id=%s kind=%s attempt=%d started", d.job_id, d.spec.kind, d.attempt)
            running.started = True
            self.running += 1
            if self.settings.tracing and d.spec.trace_context:
                attributes = {"jobgate.job_id": d.job_id, "jobgate.attempt": d.attempt, "jobgate.queue": d.spec.queue}
                with tracing.run_span(d.spec.trace_context, d.spec.kind, attributes) as span:
                    result = await self._run_handler(running)
                    state = _STATE_NAMES[result.state].removeprefix("JOB_STATE_")
                    tracing.end_run(span, state, result.error_code, result.error_message)
            else:
                result = await self._run_handler(running)
            await self._finish(running, result)
        except Exception:
            # The job stays placed here; the gateway places it again if this worker goes away.
            log.exception("job_id=%s could not be run", d.job_id)
        finally:
            if running.started:
                self.running -= 1
            if self.jobs.get((d.job_id, d.lease)) is running:
                del self.jobs[d.job_id, d.lease]
            if acquired:
                self._release_slot(running)

    def _release_slot(self, running: Running) -> None:
        """Frees the job's slot, or, while its handler thread is still running (a thread cannot be
        stopped after a timeout or cancel), frees it only when the thread returns."""
        thread = running.thread
        if thread is None or thread.done():
            self.slots.release()
            return
        log.warning(
            "job_id=%s handler thread still running after the job ended; its slot is held", running.dispatch.job_id
        )
        self.stuck_threads += 1
        self.on_slot_lost()  # report the lost slot now, not at the next heartbeat
        loop = asyncio.get_running_loop()

        def returned(_: object) -> None:
            self.stuck_threads -= 1
            self.slots.release()

        def from_thread(f: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed first: the worker has stopped
                loop.call_soon_threadsafe(returned, f)

        thread.add_done_callback(from_thread)

    async def _retrying(self, what: str, job_id: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """Runs a script call until Redis answers. Every such call is safe to repeat: a repeated
        start or finish of the same placement is answered as the first was, or as stale once the
        placement has moved on. On shutdown the task is cancelled and the job handed back."""
        delay, began, said = 0.1, time.monotonic(), -RETRY_LOG_S
        while True:
            try:
                return await call()
            except Exception as exc:
                if not transient(exc):  # else the job would stay RUNNING
                    raise
                self.metrics.redis_errors.inc()
                waited = time.monotonic() - began
                if waited - said >= RETRY_LOG_S:  # the first failure, then every RETRY_LOG_S
                    said = waited
                    log.warning(
                        "job_id=%s %s not recorded yet after %.0fs (%s: %s); retrying",
                        job_id,
                        what,
                        waited,
                        type(exc).__name__,
                        exc,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _read_spec(self, d: relay_pb2.DispatchJob) -> bool:
        """Fills in the spec a DispatchJob left out (too large to carry) from the job hash; False,
        with nothing to run, when the job no longer exists."""
        raw = await self._retrying("spec read", d.job_id, lambda: self.spec_reads.call(d.job_id))
        if raw is None:
            log.warning("job_id=%s dropped a dispatch of a job that no longer exists", d.job_id)
            return False
        d.spec.ParseFromString(raw)
        return True

    async def _read_specs(self, job_ids: Sequence[str]) -> list[bytes | None]:
        """One read of the specs of placements that arrived together without them."""
        async with asyncio.timeout(self.call_s):
            return await self.calls.specs(job_ids)

    async def _start(self, d: relay_pb2.DispatchJob) -> bool:
        start = Start(d.job_id, d.lease, events_message([self._event(d, job_pb2.JOB_STATE_RUNNING)]))
        code = await self._retrying("start", d.job_id, lambda: self.starts.call(start))
        if code != 1:
            log.warning("job_id=%s dispatch refused (%s)", d.job_id, "missing" if code == -1 else "stale")
            return False
        return True

    async def _start_many(self, starts: Sequence[Start]) -> list[int]:
        """One start_many call for dispatches that arrived together; start's code for each."""
        async with asyncio.timeout(self.call_s):
            return await self.calls.start_many(self.id, self.instance, starts)

    async def _run_handler(self, running: Running) -> Result:
        d = running.dispatch
        if running.cancel_requested:  # the cancel arrived while the start was in flight
            return Result(job_pb2.JOB_STATE_CANCELLED, error_code="CANCELLED", error_message="cancelled by request")
        registered = self.registry.get(d.spec.kind)
        if registered is None:
            return Result(
                job_pb2.JOB_STATE_FAILED,
                error_code="UNKNOWN_KIND",
                error_message=f"no handler for kind {d.spec.kind!r} on worker {self.id}",
            )
        timeout_s = d.timeout_ms / 1000 if d.timeout_ms > 0 else None
        ctx = JobContext(
            id=d.job_id,
            kind=d.spec.kind,
            queue=d.spec.queue,
            attempt=d.attempt,
            args=value_to_python(d.spec.args) if d.spec.HasField("args") else None,
            payload=d.spec.payload,
            timeout_s=timeout_s or 0.0,
            reporter=lambda fraction, message: self.reporter.report(d, fraction, message),
            dependencies=await self._dependency_results(d) if d.spec.depends_on else {},
        )
        if registered.is_async:
            running.handler_task = asyncio.ensure_future(registered.call_async(ctx))
        else:
            running.thread = self.pool.submit(registered.fn, ctx)
            running.handler_task = asyncio.wrap_future(running.thread)
        began = time.perf_counter()
        if timeout_s is not None:
            self._watch_deadline(running, timeout_s)  # cancels the handler's task when it passes
        try:
            value = await running.handler_task
        except asyncio.CancelledError:
            if _cancelling():  # this worker is stopping: the job is handed back
                raise
            if running.timed_out:  # set only when no cancel had been requested: the deadline came first
                return Result(
                    job_pb2.JOB_STATE_FAILED,
                    error_code="TIMEOUT",
                    error_message=f"attempt {d.attempt} ran longer than {d.timeout_ms} ms",
                )
            if running.cancel_requested:
                return Result(job_pb2.JOB_STATE_CANCELLED, error_code="CANCELLED", error_message="cancelled by request")
            raise
        except Fatal as exc:
            log.warning(
                "job_id=%s kind=%s attempt=%d handler failed for good: %s",
                d.job_id,
                d.spec.kind,
                d.attempt,
                exc,
                exc_info=exc,
            )
            return Result(job_pb2.JOB_STATE_FAILED, error_code="FATAL", error_message=str(exc)[:4096])
        except Exception as exc:  # a handler's failure is the job's outcome
            log.warning(
                "job_id=%s kind=%s attempt=%d handler raised %s: %s",
                d.job_id,
                d.spec.kind,
                d.attempt,
                type(exc).__name__,
                exc,
                exc_info=exc,
            )
            return Result(
                job_pb2.JOB_STATE_FAILED,
                error_code="HANDLER_ERROR",
                error_message=f"{type(exc).__name__}: {exc}"[:4096],
            )
        finally:
            self._metric(self.metrics.duration, d.spec.kind).observe(time.perf_counter() - began)
        return _success(value)

    def _watch_deadline(self, running: Running, timeout_s: float) -> None:
        """Cancels ``running``'s handler when ``timeout_s`` has passed, unless it has ended by then."""
        loop = asyncio.get_running_loop()
        when = loop.time() + timeout_s
        if len(self.deadlines) > 2 * len(self.jobs) + 64:  # mostly jobs that ended: drop them
            self.deadlines = [e for e in self.deadlines if not _ended(e[2])]
            heapq.heapify(self.deadlines)
        heapq.heappush(self.deadlines, (when, next(self._order), running))
        if when < self.deadline_at:
            self._arm(loop, when)

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self.deadline_timer is not None:
            self.deadline_timer.cancel()
        self.deadline_at = when
        self.deadline_timer = loop.call_at(when, self._deadlines_passed)

    def _deadlines_passed(self) -> None:
        loop = asyncio.get_running_loop()
        self.deadline_timer, self.deadline_at = None, math.inf
        now = loop.time()
        while self.deadlines and self.deadlines[0][0] <= now:
            running = heapq.heappop(self.deadlines)[2]
            if not _ended(running) and not running.cancel_requested:
                running.timed_out = True
                assert running.handler_task is not None
                running.handler_task.cancel()
        if self.deadlines:
            self._arm(loop, self.deadlines[0][0])

    async def _dependency_results(self, d: relay_pb2.DispatchJob) -> dict[str, Any]:
        """The results of the jobs ``d`` depends on (read once, as the attempt starts)."""
        ids = list(d.spec.depends_on)
        fields = await self._retrying("dependency results", d.job_id, lambda: self.calls.get_fields(ids))
        out: dict[str, Any] = {}
        for job_id, f in zip(ids, fields, strict=True):
            raw = f.get(b"result")
            out[job_id] = value_to_python(Value.FromString(raw)) if raw else None
        return out

    async def _finish(self, running: Running, result: Result) -> None:
        d = running.dispatch
        self.reporter.forget(d.job_id, d.lease)
        # The published event leaves out result and output: gateways build what clients see from the
        # stored job, and big outputs on the shared channel would only swell every gateway's buffer.
        event = self._event(d, result.state)
        if result.error_code:
            event.error.code = result.error_code
            event.error.message = result.error_message
        outcome = Outcome(
            d.job_id,
            d.lease,
            result.state,
            result.result,
            result.output,
            result.error_code,
            result.error_message,
            events_message([event]),
        )
        code = await self._retrying("outcome", d.job_id, lambda: self.finishes.call(outcome))
        if code in (1, 2):  # 2: recorded by an earlier try whose reply was lost
            if result.error_code in RETRIED and d.attempt < d.spec.max_attempts and not running.cancel_requested:
                log.info(
                    "job_id=%s attempt %d failed (%s); retried after a backoff", d.job_id, d.attempt, result.error_code
                )
            else:
                log.info("job_id=%s finished %s", d.job_id, _STATE_NAMES[result.state])
            self._metric(self.metrics.jobs, d.spec.kind, _STATE_NAMES[result.state].removeprefix("JOB_STATE_")).inc()
        else:
            self.metrics.superseded.inc()
            log.warning("job_id=%s outcome discarded: this attempt was superseded", d.job_id)

    async def _finish_many(self, outcomes: Sequence[Outcome]) -> list[int]:
        """One finish_many call for outcomes recorded together; finish's code for each. The script
        also refills the slots it frees with waiting jobs of their queues: up to as many as these
        finishes free locally it starts at once and returns (they run here without a start call),
        more it dispatches as a placement pass would."""
        take = () if self.draining else {o.job_id for o in outcomes if self._frees_slot(o.job_id, o.lease)}
        async with asyncio.timeout(self.call_s):
            finished = await self.calls.finish_many(self.id, self.instance, outcomes, take=take)
        if finished.taken:
            # Run once the outcomes' callers have resumed: their slots, which the taken jobs fill,
            # are free by then, so each taken job finds its slot without waiting.
            asyncio.get_running_loop().call_soon(self._run_taken, finished.taken)
        self.metrics.placed.inc(sum(p.reached for p in finished.placements))
        for p in finished.placements:
            if not p.reached:
                log.warning("job_id=%s dispatch to worker %s reached nobody; it waits again", p.job_id, p.worker_id)
        return finished.codes

    def _run_taken(self, taken: Sequence[relay_pb2.DispatchJob]) -> None:
        for d in taken:
            self.on_dispatch(d, taken=True)

    def _frees_slot(self, job_id: str, lease: int) -> bool:
        """Whether the job's slot comes free when its finish returns (not held by a handler thread
        that is still running)."""
        running = self.jobs.get((job_id, lease))
        return running is not None and (running.thread is None or running.thread.done())

    def _metric(self, family: Any, *labels: str) -> Any:
        """The child of a labelled metric, looked up once per label set (labels() is not cheap)."""
        key = (id(family), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*labels)
        return child

    def _event(self, d: relay_pb2.DispatchJob, state: int) -> job_pb2.JobEvent:
        event = job_pb2.JobEvent(
            job_id=d.job_id,
            queue=d.spec.queue,
            kind=d.spec.kind,
            state=state,  # type: ignore[arg-type]
            attempt=d.attempt,
            worker_id=self.id,
        )
        set_ms(event.time, now_ms())
        return event


_STATE_NAMES = {number: name for name, number in job_pb2.JobState.items()}
RETRIED = ("HANDLER_ERROR", "TIMEOUT")  # failures the finish script retries while attempts are left
RETRY_LOG_S = 30.0  # how often a start or outcome that Redis keeps refusing is logged again


def _ended(running: Running) -> bool:
    """Whether a job's handler has returned (or never started)."""
    return running.handler_task is None or running.handler_task.done()


def _cancelling() -> bool:
    """True when the current task itself is being cancelled (shutdown), not just the handler."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _success(value: Any) -> Result:
    if isinstance(value, bytes | bytearray | memoryview):
        return Result(job_pb2.JOB_STATE_SUCCEEDED, output=bytes(value))
    result = Value()
    try:
        python_to_value(value, result)
    except (TypeError, ValueError, RecursionError) as exc:
        return Result(
            job_pb2.JOB_STATE_FAILED,
            error_code="HANDLER_ERROR",
            error_message=f"result is not JSON-compatible: {exc}"[:4096],
        )
    return Result(job_pb2.JOB_STATE_SUCCEEDED, result=result.SerializeToString())
