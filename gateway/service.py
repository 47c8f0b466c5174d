"""The SchedulerService servicer: validate, call the store/scheduler, map domain errors to statuses.

This is the only gateway module that speaks gRPC status codes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from jobgate.v1 import job_pb2, scheduler_pb2, scheduler_pb2_grpc
from protocol.coalesce import Coalescer
from protocol.codec import CANCELLED, QUEUED, TERMINAL, event_from_hash
from protocol.errors import InvalidArgument, JobgateError, NotFound, ResourceExhausted, Unavailable
from protocol.gateway_calls import GatewayCalls, PreparedJob
from protocol.keys import Keys
from protocol.replies import Settled

from . import auth
from .hub import Hub, Watcher
from .metrics import GatewayMetrics
from .scheduler import Scheduler
from .validation import Limits, job_id, kind_name, prepare, prepare_batch, queue_name

log = logging.getLogger(__name__)

MAX_WATCH_BATCH = 1000  # completions per WatchResults response

Req = TypeVar("Req")
Resp = TypeVar("Resp")


def _abort_code(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, JobgateError):
        return grpc.StatusCode[exc.code], exc.message
    log.exception("unexpected error in a request handler")
    return grpc.StatusCode.INTERNAL, "internal error"


def _count(metrics: GatewayMetrics, method: str, code: grpc.StatusCode) -> None:
    metrics.rpcs.labels(method, code.name).inc()
    if code is grpc.StatusCode.PERMISSION_DENIED:
        metrics.denied.labels(code.name).inc()


def unary(
    fn: Callable[[Any, Req, grpc.aio.ServicerContext], Coroutine[Any, Any, Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext], Coroutine[Any, Any, Resp]]:
    """Maps domain errors of a unary handler to gRPC statuses, and counts calls by status."""

    @functools.wraps(fn)
    async def wrapper(self: SchedulerService, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            result = await fn(self, request, context)
        except asyncio.CancelledError:
            self.metrics.rpcs.labels(fn.__name__, "CANCELLED").inc()
            raise
        except Exception as exc:
            code, message = _abort_code(exc)
            _count(self.metrics, fn.__name__, code)
            await context.abort(code, message)
            raise  # unreachable: abort raises
        self.metrics.rpcs.labels(fn.__name__, "OK").inc()
        return result

    return wrapper


def streaming(
    fn: Callable[[Any, Req, grpc.aio.ServicerContext], AsyncIterator[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext], AsyncIterator[Resp]]:
    """Maps domain errors of a server-streaming handler to gRPC statuses, and counts calls by status."""

    @functools.wraps(fn)
    async def wrapper(self: SchedulerService, request: Req, context: grpc.aio.ServicerContext) -> AsyncIterator[Resp]:
        if self.closing:  # before anything is stored: a RunJob refused now must not leave a job
            self.metrics.rpcs.labels(fn.__name__, "UNAVAILABLE").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down; use another gateway")
        if self.open_streams >= self.max_streams:
            self.metrics.rpcs.labels(fn.__name__, "RESOURCE_EXHAUSTED").inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this gateway already serves {self.max_streams} streams (max_streams); retry later or elsewhere",
            )
        self.open_streams += 1
        self.metrics.streams.inc()
        try:
            async for item in fn(self, request, context):
                yield item
        except asyncio.CancelledError:
            self.metrics.rpcs.labels(fn.__name__, "CANCELLED").inc()
            raise
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            code, message = _abort_code(exc)
            _count(self.metrics, fn.__name__, code)
            await context.abort(code, message)
        else:
            self.metrics.rpcs.labels(fn.__name__, "OK").inc()
        finally:
            self.open_streams -= 1
            if self.closing and not self.open_streams:
                self.streams_closed.set()
            self.metrics.streams.dec()

    return wrapper


class SchedulerService(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Implements jobgate.v1.SchedulerService."""

    def __init__(
        self,
        store: GatewayCalls,
        scheduler: Scheduler,
        hub: Hub,
        keys: Keys,
        limits: Limits,
        *,
        stream_buffer: int,
        reconcile_s: float,
        max_streams: int,
        max_message_bytes: int = 4 << 20,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.metrics = metrics or GatewayMetrics()
        # A batched WatchResults response stays well under what the server may send in one message.
        self.batch_bytes = max_message_bytes // 2
        self.store = store
        self.scheduler = scheduler
        self.hub = hub
        self.keys = keys
        self.limits = limits
        self.stream_buffer = stream_buffer
        self.reconcile_s = reconcile_s
        self.max_streams = max_streams
        self.open_streams = 0
        self.closing = False
        self.streams_closed = asyncio.Event()  # set once closing and no stream is left
        # Single submits (SubmitJob, RunJob) that arrive together share one script call.
        self._singles: Coalescer[PreparedJob, job_pb2.Job | JobgateError] = Coalescer(self._submit_singles)

    def close_streams(self) -> None:
        """Ends every open stream with UNAVAILABLE (the gateway is going away): clients resume on
        another gateway, RunJob callers with WatchResults for their job."""
        self.closing = True
        if not self.open_streams:
            self.streams_closed.set()
        self.hub.wake_all()

    # --- unary ----------------------------------------------------------------------------
    @unary
    async def SubmitJob(
        self, request: scheduler_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.SubmitJobResponse:
        prepared = prepare(request, self.limits)
        auth.current().check(prepared.spec.queue, "queue")
        job = await self._submit_one(prepared)
        return scheduler_pb2.SubmitJobResponse(job=job)

    async def _submit_one(self, prepared: PreparedJob) -> job_pb2.Job:
        """Submits one job, in a script call shared with the single submits that arrive with it.
        Raises what a submit of it alone would."""
        result = await self._singles.call(prepared)
        if isinstance(result, JobgateError):
            raise result
        return result

    async def _submit_singles(self, jobs: Sequence[PreparedJob]) -> list[job_pb2.Job | JobgateError]:
        results, calls = await self.store.submit_each(jobs)
        self.metrics.submitted.inc(sum(1 for r in results if not isinstance(r, JobgateError)))
        for placed in calls:
            self.scheduler.record(placed)
        return results

    @unary
    async def SubmitJobs(
        self, request: scheduler_pb2.SubmitJobsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.SubmitJobsResponse:
        prepared = prepare_batch(list(request.jobs), self.limits)
        principal = auth.current()
        for i, p in enumerate(prepared):
            principal.check(p.spec.queue, f"jobs[{i}].queue")
        jobs, placed = await self.store.submit(prepared)
        self.metrics.submitted.inc(len(jobs))
        self.scheduler.record(placed)
        return scheduler_pb2.SubmitJobsResponse(jobs=jobs)

    @unary
    async def GetJob(
        self, request: scheduler_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.GetJobResponse:
        job = await self.store.get(job_id(request.id))
        auth.current().check_job(job.spec.queue, job.id, "id")
        return scheduler_pb2.GetJobResponse(job=job)

    @unary
    async def CancelJob(
        self, request: scheduler_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.CancelJobResponse:
        jid = job_id(request.id)
        await self._check_job(jid, "id")
        outcome = await self.store.cancel(jid)
        if outcome.worker_id:
            await self.store.tell_worker_to_cancel(outcome.worker_id, jid, outcome.lease)
        else:
            await self.store.publish_settled([Settled(jid, outcome.queue, CANCELLED)])
        return scheduler_pb2.CancelJobResponse(job=await self.store.get(jid))

    @unary
    async def ListWorkers(
        self, request: scheduler_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListWorkersResponse:
        principal = auth.current()
        workers = []
        for w in await self.store.workers():
            if principal.restricted:  # only its own queues: other queues' names are not its business
                mine = [q for q in w.queues if principal.may_use(q)]
                if not mine:
                    continue
                del w.queues[:]
                w.queues.extend(mine)
            workers.append(w)
        return scheduler_pb2.ListWorkersResponse(workers=workers)

    # --- streaming ------------------------------------------------------------------------
    @streaming
    async def RunJob(
        self, request: scheduler_pb2.RunJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.RunJobResponse]:
        prepared = prepare(request.job, self.limits, "job.")
        auth.current().check(prepared.spec.queue, "job.queue")
        watcher = Watcher(job_ids=[prepared.id], terminal_only=False, buffer=self.stream_buffer)
        self.hub.add(watcher)  # before the job exists: no event can slip past
        try:
            job = await self._submit_one(prepared)
            if job.id != prepared.id:  # idempotent repeat: follow the original job
                self.hub.remove(watcher)
                watcher = Watcher(job_ids=[job.id], terminal_only=False, buffer=self.stream_buffer)
                self.hub.add(watcher)
                [fields] = await self.store.get_fields([job.id])
                now = event_from_hash(job.id, fields)
                yield scheduler_pb2.RunJobResponse(event=now)  # where the original job is now
                if now.state in TERMINAL:
                    return
            else:
                first = job_pb2.JobEvent(
                    job_id=job.id,
                    queue=job.spec.queue,
                    kind=job.spec.kind,
                    state=QUEUED,
                    time=job.created_at,
                    created_at=job.created_at,
                )
                yield scheduler_pb2.RunJobResponse(event=first)
            async for events in self._follow(watcher):
                for event in events:
                    yield scheduler_pb2.RunJobResponse(event=event)
        finally:
            self.hub.remove(watcher)

    @streaming
    async def WatchResults(
        self, request: scheduler_pb2.WatchResultsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.WatchResultsResponse]:
        if len(request.job_ids) > self.limits.max_watch_ids:
            raise InvalidArgument(f"job_ids: at most {self.limits.max_watch_ids} ids, got {len(request.job_ids)}")
        ids = [job_id(j, f"job_ids[{i}]") for i, j in enumerate(request.job_ids)]
        queue = queue_name(request.queue) if request.queue else ""
        kinds = [kind_name(k, f"kinds[{i}]") for i, k in enumerate(request.kinds)]
        if request.max_batch > MAX_WATCH_BATCH:
            raise InvalidArgument(f"max_batch: at most {MAX_WATCH_BATCH}, got {request.max_batch}")
        most = max(1, request.max_batch)
        principal = auth.current()
        if queue:
            principal.check(queue, "queue")
        watcher = Watcher(job_ids=ids, queue=queue, kinds=kinds, queues=principal.queues, buffer=self.stream_buffer)
        self.hub.add(watcher)  # subscribe before reading stored state
        try:
            if ids:
                for events in _chunks(
                    await self._stored_terminal(watcher, missing_is_error=True), most, self.batch_bytes
                ):
                    yield _watch_response(events, request.max_batch)
            async for arrived in self._follow(watcher, most):
                for events in _chunks(arrived, most, self.batch_bytes):
                    yield _watch_response(events, request.max_batch)
        finally:
            self.hub.remove(watcher)

    async def _check_job(self, jid: str, field: str) -> None:
        """For a token limited to some queues: raises NotFound or PermissionDenied unless the job
        exists and is in one of its queues. Does nothing for unrestricted callers."""
        principal = auth.current()
        if not principal.restricted:
            return
        [fields] = await self.store.get_fields([jid])
        if not fields:
            raise NotFound(f"{field}: no job {jid}")
        principal.check_job(fields.get(b"queue", b"").decode(), jid, field)

    async def _follow(self, watcher: Watcher, most: int = 1) -> AsyncIterator[list[job_pb2.JobEvent]]:
        """Events for a watcher until it is finished, in lists of what arrived together (up to about
        ``most``, more when stored state is re-read); re-reads stored state when events may be lost."""
        while not watcher.finished:
            self._check_open(watcher)
            if not watcher.events.empty():  # no timer when an event is already there
                event = watcher.events.get_nowait()
            else:
                try:
                    async with asyncio.timeout(self.reconcile_s):
                        event = await watcher.events.get()
                except TimeoutError:
                    event = None
                    watcher.stale = bool(watcher.job_ids)
            self._check_open(watcher)
            arrived: list[job_pb2.JobEvent] = []
            while True:
                if event is None:
                    if watcher.stale and watcher.job_ids:
                        watcher.stale = False
                        arrived.extend(await self._stored_terminal(watcher, missing_is_error=False))
                elif watcher.delivered(event):
                    arrived.append(event)
                if len(arrived) >= most or watcher.events.empty():
                    break
                event = watcher.events.get_nowait()
            if arrived:
                yield arrived

    def _check_open(self, watcher: Watcher) -> None:
        """Raises the status that ends a stream: the gateway is stopping, events may have been
        missed with nothing to re-read, or the client fell too far behind."""
        if self.closing:
            raise Unavailable("the gateway is shutting down; resume on another gateway")
        if watcher.missed:
            raise Unavailable(
                "this gateway's subscription to results was interrupted and events may have been missed;"
                " reconnect (a stream of job_ids re-reads their stored state)"
            )
        if watcher.overflowed:
            raise ResourceExhausted(f"stream fell more than {self.stream_buffer} events behind; reconnect and resume")

    async def _stored_terminal(self, watcher: Watcher, *, missing_is_error: bool) -> list[job_pb2.JobEvent]:
        """Terminal events of the watcher's outstanding jobs, read from Redis (and marked delivered).
        Raises PermissionDenied for a job outside the caller's queues: the first read comes before
        anything is streamed."""
        ids = sorted(watcher.remaining)
        principal = auth.current()
        out = []
        for jid, fields in zip(ids, await self.store.get_fields(ids), strict=True):
            if not fields:
                if missing_is_error:
                    raise NotFound(f"job_ids: no job {jid}")
                continue
            principal.check_job(fields.get(b"queue", b"").decode(), jid, "job_ids")
            event = event_from_hash(jid, fields)
            if event.state not in TERMINAL:
                continue
            if watcher.matches(event) and watcher.delivered(event):
                out.append(event)
            else:  # finished, but outside the queue/kind filter: nothing to wait for
                watcher.remaining.discard(jid)
        return out


def _chunks(events: list[job_pb2.JobEvent], most: int, most_bytes: int) -> Iterator[list[job_pb2.JobEvent]]:
    """``events`` in runs of at most ``most``, and of at most ``most_bytes`` encoded (an event
    bigger than that goes alone)."""
    chunk: list[job_pb2.JobEvent] = []
    size = 0
    for event in events:
        n = event.ByteSize() + 8  # the event and its field header
        if chunk and (len(chunk) == most or size + n > most_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(event)
        size += n
    if chunk:
        yield chunk


def _watch_response(events: list[job_pb2.JobEvent], max_batch: int) -> scheduler_pb2.WatchResultsResponse:
    if max_batch > 1:
        return scheduler_pb2.WatchResultsResponse(events=events)
    [event] = events
    return scheduler_pb2.WatchResultsResponse(event=event)
