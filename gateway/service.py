"""The SchedulerService servicer: validate, call the store/scheduler, map domain errors to statuses.

This is the only gateway module that speaks gRPC status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from common import tracing
from jobgate.v1 import job_pb2, scheduler_pb2, scheduler_pb2_grpc
from protocol.coalesce import Coalescer
from protocol.codec import BLOCKED, CANCELLED, QUEUED, SCHEDULED, TERMINAL, event_from_hash, timestamp
from protocol.connection import now_ms
from protocol.errors import AlreadyExists, InvalidArgument, JobgateError, NotFound
from protocol.gateway_calls import GatewayCalls, PreparedJob
from protocol.replies import Settled
from protocol.schedule_calls import ScheduleCalls

from . import auth
from .batches import prepare_batch_options
from .handlers import Encoded
from .hub import Hub
from .metrics import GatewayMetrics
from .scheduler import Scheduler
from .schedules import (
    NEXT_SHOWN,
    prepare_schedule,
    schedule_message,
    schedule_name,
    timing_of,
    trigger_request,
)
from .streams import Admission, Follower, Watcher, watch_responses
from .validation import (
    Limits,
    basic_view,
    in_basic_view,
    job_id,
    job_states,
    jobs_page_position,
    jobs_page_token,
    kind_name,
    limits_message,
    page_position,
    page_size,
    page_token,
    prepare,
    prepare_batch,
    queue_limits,
    queue_name,
    schedule_page_position,
    schedule_page_token,
    stats_queues,
    with_trace_context,
)

SUBMITTED_JOBS = scheduler_pb2.SubmitJobsResponse.DESCRIPTOR.fields_by_name["jobs"].number
SUBMITTED_BATCH = scheduler_pb2.SubmitJobsResponse.DESCRIPTOR.fields_by_name["batch_id"].number
log = logging.getLogger(__name__)

MAX_WATCH_BATCH = 1000  # completions per WatchResults response
STATS_AT_ONCE = 32  # queues GetQueueStats reads at a time

Req = TypeVar("Req")
Resp = TypeVar("Resp")


# The longest status message sent: messages quote what a request got wrong, and a status message
# travels in a header, which gRPC clients refuse past 16 KiB (8 KiB by default in some).
MAX_STATUS_MESSAGE = 1024


def _abort_code(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, JobgateError):
        message = exc.message
        if len(message) > MAX_STATUS_MESSAGE:
            message = f"{message[:MAX_STATUS_MESSAGE]}… ({len(message) - MAX_STATUS_MESSAGE} more characters)"
        return grpc.StatusCode[exc.code], message
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

    return wrapper


class SchedulerService(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Implements jobgate.v1.SchedulerService."""

    def __init__(
        self,
        store: GatewayCalls,
        scheduler: Scheduler,
        hub: Hub,
        limits: Limits,
        *,
        stream_buffer: int,
        reconcile_s: float,
        max_streams: int,
        max_message_bytes: int = 4 << 20,
        metrics: GatewayMetrics | None = None,
        schedules: ScheduleCalls | None = None,
        tracing: bool = False,
    ) -> None:
        self.metrics = metrics or GatewayMetrics()
        self.tracing = tracing  # a span per submit, its context stored in the jobs (common/tracing.py)
        self.schedules = schedules or ScheduleCalls(store.redis, store.keys, store.durability)
        # A batched WatchResults response stays well under what the server may send in one message.
        self.batch_bytes = max_message_bytes // 2
        self.store = store
        self.scheduler = scheduler
        self.hub = hub
        self.limits = limits
        self.stream_buffer = stream_buffer
        self.admission = Admission(max_streams, self.metrics)
        self.follower = Follower(store, self.admission, stream_buffer=stream_buffer, reconcile_s=reconcile_s)
        # Single submits (SubmitJob, RunJob) that arrive together share one script call.
        self._singles: Coalescer[PreparedJob, job_pb2.Job | JobgateError] = Coalescer(self._submit_singles)

    def close_streams(self) -> None:
        """Ends every open stream with UNAVAILABLE (the gateway is going away): clients resume on
        another gateway, RunJob callers with WatchResults for their job."""
        self.admission.close()
        self.hub.wake_all()

    # --- unary ----------------------------------------------------------------------------
    @unary
    async def SubmitJob(
        self, request: scheduler_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.SubmitJobResponse:
        prepared = prepare(request, self.limits)
        auth.current().check(prepared.spec.queue, "queue")
        with self._traced(context, [prepared]) as [traced]:
            job = await self._submit_one(traced)
        return scheduler_pb2.SubmitJobResponse(job=job)

    @contextlib.contextmanager
    def _traced(self, context: grpc.aio.ServicerContext, prepared: list[PreparedJob]) -> Iterator[list[PreparedJob]]:
        """With tracing on, a ``jobgate submit`` span around the body, continuing the caller's trace,
        and the jobs with that span's context in their spec; else the jobs as they are."""
        if not self.tracing:
            yield prepared
            return
        first = prepared[0]
        attributes: dict[str, str | int] = {
            "jobgate.queue": first.spec.queue,
            "jobgate.kind": first.spec.kind,
            "jobgate.job_id": first.id,
        }
        if len(prepared) > 1:
            attributes["jobgate.jobs"] = len(prepared)
        with tracing.submit_span(context.invocation_metadata(), "jobgate submit", attributes) as carried:
            yield [with_trace_context(p, carried) for p in prepared]

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
        self._note_due(jobs)
        return results

    @unary
    async def SubmitJobs(self, request: scheduler_pb2.SubmitJobsRequest, context: grpc.aio.ServicerContext) -> bytes:
        prepared = prepare_batch(list(request.jobs), self.limits)
        basic = basic_view(request.view)
        principal = auth.current()
        for i, p in enumerate(prepared):
            principal.check(p.spec.queue, f"jobs[{i}].queue")
        batch = None
        if request.HasField("batch"):
            batch = prepare_batch_options(request.batch, prepared, self.limits, self.store.keys)
            if request.batch.HasField("callback"):
                principal.check(request.batch.callback.queue or "default", "batch.callback.queue")
        with self._traced(context, prepared) as traced:
            jobs, placed = await self.store.submit(traced, batch)
        self.metrics.submitted.inc(len(jobs))
        self.scheduler.record(placed)
        self._note_due(prepared)
        reply = Encoded()  # a SubmitJobsResponse: its jobs carry their specs (inputs too, but in the basic view)
        for job in jobs:
            reply.add(SUBMITTED_JOBS, (in_basic_view(job) if basic else job).SerializeToString())
        if batch:
            reply.add(SUBMITTED_BATCH, batch[0].encode())
        return bytes(reply)

    @unary
    async def GetBatch(
        self, request: scheduler_pb2.GetBatchRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.GetBatchResponse:
        bid = job_id(request.id)
        fields = await self._batch_fields(bid, "id")
        total, succeeded, failed, cancelled = (
            int(fields.get(n, 0)) for n in (b"total", b"succeeded", b"failed", b"cancelled")
        )
        batch = scheduler_pb2.Batch(
            id=bid,
            total=total,
            pending=total - succeeded - failed - cancelled,
            succeeded=succeeded,
            failed=failed,
            cancelled=cancelled,
            callback_job_id=fields.get(b"callback_job", b"").decode(),
        )
        batch.created_at.FromMilliseconds(int(fields.get(b"created", 0)))
        if done := fields.get(b"done"):
            batch.finished_at.FromMilliseconds(int(done))
        return scheduler_pb2.GetBatchResponse(batch=batch)

    async def _batch_fields(self, bid: str, field: str) -> dict[bytes, bytes]:
        """A batch's stored hash. Raises NotFound, or PermissionDenied for a token that may not use
        its jobs' queue."""
        fields = await self.store.get_batch(bid)
        if not fields:
            raise NotFound(f"{field}: no batch {bid}")
        auth.current().check(fields.get(b"queue", b"").decode(), field)
        return fields

    def _note_due(self, jobs: Sequence[PreparedJob]) -> None:
        """Tells the placement loop when the earliest of the jobs stored SCHEDULED is due."""
        dues = [j.due_ms for j in jobs if j.due_ms]
        if dues:
            self.scheduler.due_at(min(dues))

    @unary
    async def GetJob(
        self, request: scheduler_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.GetJobResponse:
        job = await self.store.get(job_id(request.id))
        auth.current().check_job(job.spec.queue, job.id, "id")
        job.waiting_reason = await self.store.waiting_reason(job)
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
    async def PauseQueue(
        self, request: scheduler_pb2.PauseQueueRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.PauseQueueResponse:
        queue = queue_name(request.queue)
        auth.current().check(queue, "queue")
        return scheduler_pb2.PauseQueueResponse(already=await self.store.pause(queue, True))

    @unary
    async def ResumeQueue(
        self, request: scheduler_pb2.ResumeQueueRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ResumeQueueResponse:
        queue = queue_name(request.queue)
        auth.current().check(queue, "queue")
        already = await self.store.pause(queue, False)
        self.scheduler.kick(queue)
        return scheduler_pb2.ResumeQueueResponse(already=already)

    @unary
    async def SetQueueLimits(
        self, request: scheduler_pb2.SetQueueLimitsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.SetQueueLimitsResponse:
        queue = queue_name(request.queue)
        limits = queue_limits(request.limits)
        auth.current().check(queue, "queue")
        await self.store.set_limits(queue, limits)
        self.scheduler.kick(queue)  # a raised limit lets waiting jobs go now
        return scheduler_pb2.SetQueueLimitsResponse(limits=limits_message(await self.store.limits(queue)))

    @unary
    async def RetryJob(
        self, request: scheduler_pb2.RetryJobRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.RetryJobResponse:
        jid = job_id(request.id)
        await self._check_job(jid, "id")
        self.scheduler.kick(await self.store.retry(jid))
        return scheduler_pb2.RetryJobResponse(job=await self.store.get(jid))

    @unary
    async def ListFailedJobs(
        self, request: scheduler_pb2.ListFailedJobsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListFailedJobsResponse:
        queue = queue_name(request.queue)
        size = page_size(request.page_size)
        after = page_position(request.page_token)
        basic = basic_view(request.view)
        auth.current().check(queue, "queue")
        jobs = await self.store.failed_jobs(queue, size + 1, after, apart=not basic)
        if basic:
            jobs = [in_basic_view(job) for job in jobs]
        response = scheduler_pb2.ListFailedJobsResponse(jobs=jobs[:size])
        if len(jobs) > size:
            last = jobs[size - 1]
            response.next_page_token = page_token((last.finished_at.ToMilliseconds(), last.id))
        return response

    @unary
    async def ListJobs(
        self, request: scheduler_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListJobsResponse:
        queue = queue_name(request.queue)
        states = job_states(request.states)
        kind = kind_name(request.kind) if request.kind else ""
        size = page_size(request.page_size)
        before = jobs_page_position(request.page_token)
        basic = basic_view(request.view)
        auth.current().check(queue, "queue")
        jobs, next_seq = await self.store.list_jobs(queue, states, kind, size, before, apart=not basic)
        if basic:
            jobs = [in_basic_view(job) for job in jobs]
        response = scheduler_pb2.ListJobsResponse(jobs=jobs)
        if next_seq is not None:
            response.next_page_token = jobs_page_token(next_seq)
        return response

    @unary
    async def GetQueueStats(
        self, request: scheduler_pb2.GetQueueStatsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.GetQueueStatsResponse:
        queues = stats_queues(request.queues)
        principal = auth.current()
        if queues:
            for i, queue in enumerate(queues):
                principal.check(queue, f"queues[{i}]")
        else:
            queues = [q for q in await self.store.known_queues() if principal.may_use(q)]
        response = scheduler_pb2.GetQueueStatsResponse()
        for first in range(0, len(queues), STATS_AT_ONCE):
            found = await asyncio.gather(
                *(
                    self.store.queue_stats(q, self.limits.for_queue(q).retention_s)
                    for q in queues[first : first + STATS_AT_ONCE]
                )
            )
            for stats, limits in found:
                stats.limits.CopyFrom(limits_message(limits))
                response.queues.append(stats)
        return response

    # --- periodic schedules -----------------------------------------------------------------
    @unary
    async def CreateSchedule(
        self, request: scheduler_pb2.CreateScheduleRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.CreateScheduleResponse:
        now = now_ms()
        spec, first = prepare_schedule(request.schedule, self.limits, now)
        auth.current().check(spec.job.queue or "default", "schedule.job.queue")
        if not await self.schedules.create(spec.name, spec.SerializeToString(deterministic=True), first, now):
            raise AlreadyExists(f"schedule.name: a schedule named {spec.name!r} exists")
        return scheduler_pb2.CreateScheduleResponse(schedule=await self._schedule(spec.name, 1))

    @unary
    async def GetSchedule(
        self, request: scheduler_pb2.GetScheduleRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.GetScheduleResponse:
        return scheduler_pb2.GetScheduleResponse(schedule=await self._schedule(schedule_name(request.name), NEXT_SHOWN))

    @unary
    async def ListSchedules(
        self, request: scheduler_pb2.ListSchedulesRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListSchedulesResponse:
        size = page_size(request.page_size)
        after = ""
        if request.page_token:
            after = schedule_page_position(request.page_token)
        principal = auth.current()
        out = scheduler_pb2.ListSchedulesResponse()
        names = await self.schedules.names(after, size + 1)
        for name in names[:size]:
            stored = await self.schedules.get(name)
            if stored is None:  # deleted meanwhile
                continue
            schedule = schedule_message(stored, 1)
            if principal.may_use(schedule.spec.job.queue or "default"):
                out.schedules.append(schedule)
        if len(names) > size:
            out.next_page_token = schedule_page_token(names[size - 1])
        return out

    @unary
    async def PauseSchedule(
        self, request: scheduler_pb2.PauseScheduleRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.PauseScheduleResponse:
        name = schedule_name(request.name)
        await self._schedule(name, 0)  # NOT_FOUND, PERMISSION_DENIED
        if not await self.schedules.pause(name):
            raise NotFound(f"name: no schedule {name!r}")
        return scheduler_pb2.PauseScheduleResponse(schedule=await self._schedule(name, 1))

    @unary
    async def ResumeSchedule(
        self, request: scheduler_pb2.ResumeScheduleRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ResumeScheduleResponse:
        name = schedule_name(request.name)
        current = await self._schedule(name, 0)
        upcoming = timing_of(current.spec, current.created_at.ToMilliseconds()).after(now_ms())
        if not await self.schedules.resume(name, upcoming):
            raise NotFound(f"name: no schedule {name!r}")
        return scheduler_pb2.ResumeScheduleResponse(schedule=await self._schedule(name, 1))

    @unary
    async def DeleteSchedule(
        self, request: scheduler_pb2.DeleteScheduleRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.DeleteScheduleResponse:
        name = schedule_name(request.name)
        await self._schedule(name, 0)
        if not await self.schedules.delete(name):
            raise NotFound(f"name: no schedule {name!r}")
        return scheduler_pb2.DeleteScheduleResponse()

    @unary
    async def TriggerSchedule(
        self, request: scheduler_pb2.TriggerScheduleRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.TriggerScheduleResponse:
        name = schedule_name(request.name)
        current = await self._schedule(name, 0)  # NOT_FOUND, PERMISSION_DENIED
        prepared = prepare(trigger_request(current.spec, request.request_id), self.limits, "job.")
        asked = now_ms()
        with self._traced(context, [prepared]) as [traced]:
            job = await self._submit_one(traced)
        if job.id == traced.id:  # stored now, not a retry answered with the job its first call stored
            now = now_ms()
            run = scheduler_pb2.ScheduleRun(tick=timestamp(asked), job_id=job.id, time=timestamp(now), manual=True)
            if not await self.schedules.record(name, job.id, run.SerializeToString()):
                raise NotFound(f"name: no schedule {name!r}")
        return scheduler_pb2.TriggerScheduleResponse(job=job, schedule=await self._schedule(name, 1))

    async def _schedule(self, name: str, shown: int) -> scheduler_pb2.Schedule:
        """The schedule, with up to ``shown`` next ticks. Raises NotFound, or PermissionDenied for a
        token that may not use its job's queue."""
        stored = await self.schedules.get(name)
        if stored is None:
            raise NotFound(f"name: no schedule {name!r}")
        schedule = schedule_message(stored, shown)
        auth.current().check(schedule.spec.job.queue or "default", "name")
        return schedule

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
        with self.admission.stream():
            async for response in self._run_job(request, context):
                yield response

    async def _run_job(
        self, request: scheduler_pb2.RunJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.RunJobResponse]:
        prepared = prepare(request.job, self.limits, "job.")
        auth.current().check(prepared.spec.queue, "job.queue")
        watcher = Watcher(job_ids=[prepared.id], terminal_only=False, buffer=self.stream_buffer)
        self.hub.add(watcher)  # before the job exists: no event can slip past
        try:
            with self._traced(context, [prepared]) as [traced]:
                job = await self._submit_one(traced)
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
                    state=job.state if job.state in (QUEUED, SCHEDULED, BLOCKED) else QUEUED,
                    time=job.created_at,
                    created_at=job.created_at,
                )
                yield scheduler_pb2.RunJobResponse(event=first)
            async for events in self.follower.follow(watcher):
                for event in events:
                    yield scheduler_pb2.RunJobResponse(event=event)
        finally:
            self.hub.remove(watcher)

    @streaming
    async def WatchResults(
        self, request: scheduler_pb2.WatchResultsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.WatchResultsResponse | bytes]:
        with self.admission.stream():
            async for response in self._watch_results(request):
                yield response

    async def _watch_results(
        self, request: scheduler_pb2.WatchResultsRequest
    ) -> AsyncIterator[scheduler_pb2.WatchResultsResponse | bytes]:
        if len(request.job_ids) > self.limits.max_watch_ids:
            raise InvalidArgument(f"job_ids: at most {self.limits.max_watch_ids} ids, got {len(request.job_ids)}")
        ids = [job_id(j, f"job_ids[{i}]") for i, j in enumerate(request.job_ids)]
        if request.batch_id:
            if ids:
                raise InvalidArgument("batch_id: give job_ids or batch_id, not both")
            jobs = (await self._batch_fields(job_id(request.batch_id, "batch_id"), "batch_id")).get(b"jobs", b"")
            ids = [jobs[i : i + 32].decode() for i in range(0, len(jobs), 32)]
        queue = queue_name(request.queue) if request.queue else ""
        kinds = [kind_name(k, f"kinds[{i}]") for i, k in enumerate(request.kinds)]
        if request.max_batch > MAX_WATCH_BATCH:
            raise InvalidArgument(f"max_batch: at most {MAX_WATCH_BATCH}, got {request.max_batch}")
        most = max(1, request.max_batch)
        principal = auth.current()
        if queue:
            principal.check(queue, "queue")
        watcher = Watcher(
            job_ids=ids,
            queue=queue,
            kinds=kinds,
            queues=principal.queues,
            progress=request.include_progress,
            buffer=self.stream_buffer,
        )
        self.hub.add(watcher)  # subscribe before reading stored state
        try:
            if ids:
                stored = await self.follower.stored_terminal(watcher, missing_is_error=True)
                for response in watch_responses(stored, request.max_batch, self.batch_bytes):
                    yield response
            async for arrived in self.follower.follow(watcher, most):
                for response in watch_responses(arrived, request.max_batch, self.batch_bytes):
                    yield response
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
