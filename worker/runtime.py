"""The worker runtime: registration, heartbeats, dispatch handling, timeouts and graceful drain.

A worker subscribes to its own dispatch channel, acknowledges each dispatch with the ``start``
script (which refuses stale or forged placements), runs the handler, and records the outcome with
the ``finish`` script, which also publishes it on the result channel. The outcome is stored before
it is published, so it survives a moment when no gateway is listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.message import DecodeError
from google.protobuf.struct_pb2 import Value

from gateway.coalesce import Coalescer
from gateway.codec import events_message, python_to_value, value_to_python
from gateway.errors import Unavailable
from gateway.keys import JOB_ID_RE, Keys
from gateway.metrics import WorkerMetrics, serve
from gateway.store import (
    CONNECTION_ERRORS,
    JobStore,
    bounded,
    cannot_write_now,
    now_ms,
    placements,
    redis_client,
    settled,
    subscription,
)
from jobgate.v1 import job_pb2, relay_pb2

from .builtins import register_builtins
from .config import WorkerSettings, default_worker_id
from .registry import Handler, JobContext, Registry

log = logging.getLogger(__name__)

REDIS_ERRORS: tuple[type[Exception], ...] = (*CONNECTION_ERRORS, Unavailable)
STEP_ERRORS: tuple[type[Exception], ...] = (*REDIS_ERRORS, TimeoutError)  # a bounded shutdown step


def _transient(exc: Exception) -> bool:
    """Redis unreachable, or refusing writes only for now (memory freed, failover done, script or
    load finished): a start or finish that meets one is retried, or the job would stay RUNNING."""
    return isinstance(exc, REDIS_ERRORS) or cannot_write_now(exc)


F = TypeVar("F", bound=Handler)

# finish_many places waiting jobs of the queues whose slots it freed: at most this many per queue,
# each to be started within its stored ack timeout (DEFAULT_ACK_MS for a job stored without one).
PLACE_MOST = 500
DEFAULT_ACK_MS = 5000


@dataclass(frozen=True, slots=True)
class Outcome:
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
    started: bool = False


class Worker:
    """A jobgate worker. Register handlers with :meth:`handler`, then ``await run(settings)``.

    Plain functions run in a thread pool; coroutine functions run on the event loop.
    """

    def __init__(self, *, builtins: bool = True) -> None:
        self.registry = Registry()
        if builtins:
            register_builtins(self.registry)
        self._stop: asyncio.Event | None = None
        self.worker_id = ""
        self.threads_left = 0  # handler threads still running when run() returned

    def handler(self, kind: str) -> Callable[[F], F]:
        """Decorator registering a handler for ``kind``. Raises ValueError for a bad or taken kind."""
        return self.registry.decorator(kind)

    def stop(self) -> None:
        """Asks a running worker to drain and exit (safe to call from the event loop)."""
        if self._stop is not None:
            self._stop.set()

    async def run(self, settings: WorkerSettings) -> None:
        """Runs until :meth:`stop`; then drains in-flight jobs and hands the rest back."""
        self._stop = asyncio.Event()
        self.worker_id = settings.worker_id or default_worker_id()
        runtime = _Runtime(self, settings, self._stop)
        await runtime.run()
        self.threads_left = runtime.stuck_threads


class _Runtime:
    def __init__(self, worker: Worker, settings: WorkerSettings, stop: asyncio.Event) -> None:
        self.worker = worker
        self.settings = settings
        self.stop_event = stop
        self.id = worker.worker_id
        self.keys = Keys(settings.namespace)
        self.redis = redis_client(settings.redis_url, settings.redis_timeout_s)
        self.store = JobStore(self.redis, self.keys, retention_s=0, idempotency_ttl_s=0)
        self.scripts = self.store.scripts
        self.pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="jobgate-handler")
        self.slots = asyncio.Semaphore(settings.concurrency)
        # By (job id, lease): an attempt is known by its placement, so a dispatch for the same job with
        # another lease (a later placement, or a forgery) never displaces the attempt running here.
        self.jobs: dict[tuple[str, int], Running] = {}
        self.subscribed = False
        self.draining = False
        self.redis_ok = True
        self.registered = False  # set by the first successful heartbeat
        self.instance = uuid.uuid4().hex  # tells this process's registration from an earlier one's
        self.evictions: list[float] = []  # when this process found itself evicted (monotonic s)
        self.stuck_threads = 0  # handler threads still running after their job ended
        self.metrics = WorkerMetrics()
        self._background: set[asyncio.Task[None]] = set()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        # Concurrent starts and finishes go to Redis together, one script call per batch.
        self.starts: Coalescer[tuple[relay_pb2.DispatchJob, bytes], int] = Coalescer(self._start_many)
        self.finishes: Coalescer[list[Any], int] = Coalescer(self._finish_many, size=_outcome_bytes)

    # --- lifecycle ------------------------------------------------------------------------
    async def run(self) -> None:
        log.info(
            "worker %s serving queues %s with kinds %s (concurrency %d)",
            self.id,
            ",".join(self.settings.queue_list),
            ",".join(self.worker.registry.kinds),
            self.settings.concurrency,
        )
        metrics_server = (
            serve(self.settings.metrics_listen, self.metrics.registry) if self.settings.metrics_listen else None
        )
        beat = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        listen = asyncio.create_task(self._listen_loop(), name="listen")
        try:
            await self.stop_event.wait()
        finally:
            await self._drain(beat, listen)
            self.pool.shutdown(wait=False, cancel_futures=True)
            await bounded(self.redis.aclose(), self.settings.redis_timeout_s, "closing Redis connections")
            if metrics_server is not None:
                metrics_server.shutdown()
            log.info("worker %s stopped", self.id)

    async def _drain(self, beat: asyncio.Task[None], listen: asyncio.Task[None]) -> None:
        """Stop taking jobs, let running ones finish within the grace period, hand the rest back."""
        self.draining = True
        log.info("draining: no new jobs; waiting up to %.1fs for %d running", self.settings.grace_s, len(self.jobs))
        await self._quietly(self._beat())  # off=1: no more placements here
        await self._quietly(self._status(relay_pb2.WorkerStatus.CHANGE_LEAVING))
        # Still subscribed while draining, so cancel requests for running jobs arrive; new
        # dispatches are left unacknowledged and handed back by the leave script.
        tasks = [r.task for r in self.jobs.values() if r.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.settings.grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        background = [beat, listen, *self._background]  # no heartbeat may re-register us after leaving
        for task in background:
            task.cancel()
        # Bounded: a task's cleanup (closing a pub/sub connection, a TLS shutdown) may wait on Redis.
        _, stuck = await asyncio.wait(background, timeout=self.settings.redis_timeout_s)
        if stuck:
            log.warning("%d background task(s) did not stop within %.1fs", len(stuck), self.settings.redis_timeout_s)
        await self.starts.aclose()
        await self.finishes.aclose()
        await self._quietly(self._leave())

    async def _leave(self) -> None:
        k = self.keys
        flat = await self.scripts.leave(keys=[k.workers(), k.acks()], args=[k.prefix, self.id, now_ms()])
        handed = settled(flat)
        for s in handed:
            log.info("job_id=%s handed back to queue %s", s.job_id, s.queue)
        await self.store.publish_settled(handed)
        await self._status(relay_pb2.WorkerStatus.CHANGE_LEFT)

    async def _quietly(self, coro: Any) -> None:
        """Runs one Redis step of a best-effort sequence (shutdown, an early heartbeat); a failure is
        logged, and the gateways' reaping covers for it."""
        try:
            await asyncio.wait_for(coro, timeout=self.settings.redis_timeout_s + 1)
        except STEP_ERRORS as exc:
            self.metrics.redis_errors.inc()
            log.warning("Redis step failed (%s); heartbeat expiry and reaping cover for it", exc)

    # --- heartbeats -----------------------------------------------------------------------
    async def _beat(self) -> None:
        """One heartbeat. When it finds this worker had been evicted (and registered it again), every
        job still held here was placed elsewhere: they are abandoned."""
        k, s, now = self.keys, self.settings, now_ms()
        off = "1" if self.draining or not self.subscribed else "0"
        held = list(self.jobs.values())  # what an eviction found by this beat can have taken away
        reply = await self.scripts.heartbeat(
            keys=[k.workers(), k.worker(self.id), k.worker_jobs(self.id), k.acks()],
            args=[
                k.prefix,
                self.id,
                now,
                now + s.heartbeat_ttl_ms,
                max(0, s.concurrency - self.stuck_threads),
                ",".join(s.queue_list),
                ",".join(self.worker.registry.kinds),
                socket.gethostname(),
                os.getpid(),
                off,
                self.instance,
            ],
        )
        again = bool(reply[0]) and self.registered
        self.registered = True
        if again:
            self._abandon(held)
        if inherited := settled(reply[1:]):
            log.warning("an earlier process with id %s held %d jobs; they were placed again", self.id, len(inherited))
            await self.store.publish_settled(inherited)
        if s.health_file:
            Path(s.health_file).touch()  # noqa: ASYNC240 - a tiny local file, once a second
        if again and self.subscribed and not self.draining:
            await self._status(relay_pb2.WorkerStatus.CHANGE_JOINED)

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.heartbeat_ms / 1000
        while True:
            try:
                await self._beat()
                if not self.redis_ok:
                    log.info("Redis reachable again")
                self.redis_ok = True
            except Exception as exc:  # noqa: BLE001 - heartbeats must outlive any failure
                self.metrics.redis_errors.inc()
                if self.redis_ok:
                    log.warning("heartbeat failed (%s: %s); retrying", type(exc).__name__, exc)
                self.redis_ok = False
            await asyncio.sleep(interval)

    def _beat_soon(self) -> None:
        task = asyncio.create_task(self._quietly(self._beat()))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _abandon(self, held: list[Running]) -> None:
        """After an eviction the jobs held before it were placed again elsewhere: stop running them.
        (A job placed here after the beat re-registered this worker is valid and keeps running.)"""
        now = time.monotonic()
        self.evictions = [t for t in self.evictions if now - t < 60] + [now]
        log.warning("registered again after being evicted; abandoning %d superseded jobs", len(held))
        if len(self.evictions) > 1:  # a crashed predecessor is evicted once; a live twin again and again
            log.error(
                "evicted %d times in a minute: another live process seems to use worker id %s (ids must be unique)",
                len(self.evictions),
                self.id,
            )
        for running in held:
            if running.task is not None:
                running.task.cancel()

    async def _status(self, change: relay_pb2.WorkerStatus.Change) -> None:
        msg = relay_pb2.WorkerStatus(worker_id=self.id, change=change)
        await self.redis.publish(self.keys.workers_channel(), msg.SerializeToString())

    # --- dispatch channel -----------------------------------------------------------------
    async def _listen_loop(self) -> None:
        channel = self.keys.dispatch_channel(self.id)
        while True:
            try:
                async with subscription(self.redis, (channel,), self._resubscribed) as ps:
                    self.subscribed = True
                    await self._beat()
                    await self._status(relay_pb2.WorkerStatus.CHANGE_JOINED)
                    log.info("subscribed to %s", channel)
                    while True:
                        msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if msg is not None and isinstance(msg.get("data"), bytes):
                            self._on_message(msg["data"])
            except Exception as exc:  # the subscription must outlive any failure
                if not isinstance(exc, REDIS_ERRORS):
                    log.exception("dispatch handling failed; resubscribing")
                elif self.subscribed:
                    log.warning("dispatch subscription lost (%s); resubscribing", exc)
                self.subscribed = False
                await asyncio.sleep(0.5)
            finally:
                self.subscribed = False

    async def _resubscribed(self, connection: object) -> None:
        """redis-py re-established a dropped dispatch subscription by itself: say so, and let the
        gateways know this worker takes jobs (dispatches in the gap were taken back)."""
        log.warning("dispatch subscription re-established after a dropped connection")
        await self._status(relay_pb2.WorkerStatus.CHANGE_JOINED)

    def _on_message(self, data: bytes) -> None:
        msg = relay_pb2.WorkerMessage()
        try:
            msg.ParseFromString(data)
        except DecodeError:
            log.warning("dropped a malformed dispatch message (%d bytes)", len(data))
            return
        body = msg.WhichOneof("body")
        if body == "dispatch":
            self._on_dispatch(msg.dispatch)
        elif body == "dispatches":
            for d in msg.dispatches.jobs:
                self._on_dispatch(d)
        elif body == "cancel":
            self._on_cancel(msg.cancel)
        else:
            log.warning("dropped a dispatch message with no body")

    def _on_dispatch(self, d: relay_pb2.DispatchJob, taken: bool = False) -> None:
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

    def _on_cancel(self, c: relay_pb2.CancelJob) -> None:
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
            if not taken and (self.draining or not await self._start(d)):
                return
            log.info("job_id=%s kind=%s attempt=%d started", d.job_id, d.spec.kind, d.attempt)
            running.started = True
            self.metrics.running.inc()
            outcome = await self._run_handler(running)
            await self._finish(d, outcome)
        except Exception:
            # The job stays placed here; the gateway places it again if this worker goes away.
            log.exception("job_id=%s could not be run", d.job_id)
        finally:
            if running.started:
                self.metrics.running.dec()
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
        self._beat_soon()  # report the lost slot now, not at the next heartbeat
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
        delay = 0.1
        while True:
            try:
                return await call()
            except Exception as exc:
                if not _transient(exc):
                    raise
                self.metrics.redis_errors.inc()
                if delay == 0.1:
                    log.warning("job_id=%s %s not recorded yet (%s); retrying", job_id, what, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _start(self, d: relay_pb2.DispatchJob) -> bool:
        event = events_message([self._event(d, job_pb2.JOB_STATE_RUNNING)])
        code = await self._retrying("start", d.job_id, lambda: self.starts.call((d, event)))
        if code != 1:
            log.warning("job_id=%s dispatch refused (%s)", d.job_id, "missing" if code == -1 else "stale")
            return False
        return True

    async def _start_many(self, items: Sequence[tuple[relay_pb2.DispatchJob, bytes]]) -> list[int]:
        """One start_many call for dispatches that arrived together; start's code for each."""
        k = self.keys
        keys = [k.acks(), k.results_channel()]
        args: list[Any] = [self.id, now_ms()]
        for d, event in items:
            keys.append(k.job(d.job_id))
            args += (d.job_id, d.lease, event)
        codes: list[int] = await self.scripts.start_many(keys=keys, args=args)
        return codes

    async def _run_handler(self, running: Running) -> Outcome:
        d = running.dispatch
        if running.cancel_requested:  # the cancel arrived while the start was in flight
            return Outcome(job_pb2.JOB_STATE_CANCELLED, error_code="CANCELLED", error_message="cancelled by request")
        registered = self.worker.registry.get(d.spec.kind)
        if registered is None:
            return Outcome(
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
        )
        if registered.is_async:
            running.handler_task = asyncio.ensure_future(registered.call_async(ctx))
        else:
            running.thread = self.pool.submit(registered.fn, ctx)
            running.handler_task = asyncio.wrap_future(running.thread)
        began = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):  # cancels the handler's task when it fires
                value = await running.handler_task
        except TimeoutError:
            return Outcome(
                job_pb2.JOB_STATE_FAILED,
                error_code="TIMEOUT",
                error_message=f"attempt {d.attempt} ran longer than {d.timeout_ms} ms",
            )
        except asyncio.CancelledError:
            if running.cancel_requested and not _cancelling():
                return Outcome(
                    job_pb2.JOB_STATE_CANCELLED, error_code="CANCELLED", error_message="cancelled by request"
                )
            raise
        except Exception as exc:  # noqa: BLE001 - a handler's failure is the job's outcome
            log.info("job_id=%s handler raised %s", d.job_id, type(exc).__name__)
            return Outcome(
                job_pb2.JOB_STATE_FAILED,
                error_code="HANDLER_ERROR",
                error_message=f"{type(exc).__name__}: {exc}"[:4096],
            )
        finally:
            self._metric(self.metrics.duration, d.spec.kind).observe(time.perf_counter() - began)
        return _success(value)

    async def _finish(self, d: relay_pb2.DispatchJob, outcome: Outcome) -> None:
        # The published event leaves out result and output: gateways build what clients see from the
        # stored job, and big outputs on the shared channel would only swell every gateway's buffer.
        event = self._event(d, outcome.state)
        if outcome.error_code:
            event.error.code = outcome.error_code
            event.error.message = outcome.error_message
        item: list[Any] = [
            d.job_id,
            d.lease,
            outcome.state,
            outcome.result,
            outcome.output,
            outcome.error_code,
            outcome.error_message,
            events_message([event]),
        ]
        code = await self._retrying("outcome", d.job_id, lambda: self.finishes.call(item))
        if code in (1, 2):  # 2: recorded by an earlier try whose reply was lost
            log.info("job_id=%s finished %s", d.job_id, _STATE_NAMES[outcome.state])
            self._metric(self.metrics.jobs, d.spec.kind, _STATE_NAMES[outcome.state].removeprefix("JOB_STATE_")).inc()
        else:
            self.metrics.superseded.inc()
            log.warning("job_id=%s outcome discarded: this attempt was superseded", d.job_id)

    async def _finish_many(self, items: Sequence[list[Any]]) -> list[int]:
        """One finish_many call for outcomes recorded together; finish's code for each. The script
        also refills the slots it frees with waiting jobs of their queues: up to as many as these
        finishes free locally it starts at once and returns (they run here without a start call),
        more it dispatches as a placement pass would."""
        k = self.keys
        keys = [k.results_channel()]
        take = 0 if self.draining else sum(1 for item in items if self._frees_slot(item[0], item[1]))
        args: list[Any] = [k.prefix, self.id, now_ms(), PLACE_MOST, DEFAULT_ACK_MS, take]
        for item in items:
            keys.append(k.job(item[0]))
            args += item
        codes, flat, taken = await self.scripts.finish_many(keys=keys, args=args)
        if taken:
            for d in relay_pb2.DispatchJobs.FromString(taken).jobs:
                self._on_dispatch(d, taken=True)
        placed = placements(flat)
        self.metrics.placed.inc(sum(p.reached for p in placed))
        for p in placed:
            if not p.reached:
                log.warning("job_id=%s dispatch to worker %s reached nobody; it waits again", p.job_id, p.worker_id)
        return [int(c) for c in codes]

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
        event.time.FromMilliseconds(now_ms())
        return event


_STATE_NAMES = {number: name for name, number in job_pb2.JobState.items()}


def _outcome_bytes(item: list[Any]) -> int:
    """Roughly what one finish_many entry adds to the call: result, output and event bytes."""
    return len(item[3]) + len(item[4]) + len(item[7])


def _cancelling() -> bool:
    """True when the current task itself is being cancelled (shutdown), not just the handler."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _success(value: Any) -> Outcome:
    if isinstance(value, bytes | bytearray | memoryview):
        return Outcome(job_pb2.JOB_STATE_SUCCEEDED, output=bytes(value))
    result = Value()
    try:
        python_to_value(value, result)
    except (TypeError, ValueError, RecursionError) as exc:
        return Outcome(
            job_pb2.JOB_STATE_FAILED,
            error_code="HANDLER_ERROR",
            error_message=f"result is not JSON-compatible: {exc}"[:4096],
        )
    return Outcome(job_pb2.JOB_STATE_SUCCEEDED, result=result.SerializeToString())
