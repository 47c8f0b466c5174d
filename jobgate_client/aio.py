"""The asyncio client: :class:`Client`."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

import grpc

from jobgate.v1 import job_pb2, scheduler_pb2, scheduler_pb2_grpc

from .errors import InvalidArgument, JobgateError, Unavailable, from_rpc_error
from .models import Batch, Event, Job, JobState, Limits, Page, QueueStats, Schedule, Worker, seconds, to_value

T = TypeVar("T")

try:  # with OpenTelemetry installed, every call carries the caller's trace context
    from opentelemetry import propagate
except ImportError:
    propagate = None  # type: ignore[assignment]

RETRIED = (grpc.StatusCode.UNAVAILABLE,)
MAX_BATCH = 1000  # jobs per SubmitJobs call (the gateway's default max_batch)


@dataclass(frozen=True, slots=True)
class Retry:
    """How a call that is safe to repeat is retried on UNAVAILABLE: up to ``attempts`` times in all,
    waiting ``initial`` seconds, then twice as long each time up to ``most``, less up to half at
    random. Streams reconnect for up to ``reconnect_s`` seconds in all before giving up."""

    attempts: int = 5
    initial: float = 0.1
    most: float = 2.0
    reconnect_s: float = 30.0

    def wait(self, attempt: int) -> float:
        full = min(self.most, self.initial * 2 ** (attempt - 1))
        return float(full * (1 - random.random() / 2))


def job_request(
    kind: str,
    args: Any = None,
    *,
    queue: str = "",
    payload: bytes = b"",
    priority: int = 0,
    max_attempts: int = 0,
    timeout: float | timedelta | None = None,
    idempotency_key: str = "",
    run_at: datetime | None = None,
    delay: float | timedelta | None = None,
    unique_key: str = "",
    labels: Mapping[str, str] | None = None,
    depends_on: Iterable[str] = (),
    concurrency_key: str = "",
    retry: job_pb2.RetryPolicy | None = None,
) -> scheduler_pb2.SubmitJobRequest:
    """A SubmitJobRequest from plain Python values (``args``: any JSON value; ``run_at`` an aware
    datetime; ``timeout`` and ``delay`` seconds or timedeltas)."""
    req = scheduler_pb2.SubmitJobRequest(
        kind=kind,
        queue=queue,
        payload=payload,
        priority=priority,
        max_attempts=max_attempts,
        idempotency_key=idempotency_key,
        unique_key=unique_key,
        concurrency_key=concurrency_key,
        depends_on=list(depends_on),
    )
    if args is not None:
        to_value(args, req.args)
    if timeout is not None:
        req.timeout.FromTimedelta(seconds(timeout))
    if run_at is not None:
        req.run_at.FromDatetime(run_at)
    if delay is not None:
        req.delay.FromTimedelta(seconds(delay))
    if labels:
        req.labels.update(labels)
    if retry is not None:
        req.retry.CopyFrom(retry)
    return req


class Client:
    """A jobgate client over gRPC asyncio.

    ``targets``: one gateway address (``host:port``) or several: a call that finds its gateway
    unavailable moves to the next one. ``token``: the bearer token, sent with every call. ``tls``:
    use TLS (with ``root_certificates``, the PEM of the CA that signed the gateway's certificate, or
    the system's; ``private_key`` and ``certificate_chain`` for mutual TLS). ``timeout``: each
    call's deadline in seconds (streams have none unless given per call).

    Every submit carries an idempotency key (a fresh ``client-<uuid>`` unless one is given), so a
    submit retried after UNAVAILABLE cannot store its job twice; reads, cancels, pauses and the
    listings are retried too (``retry``). Concurrent :meth:`submit` calls are sent together: a submit
    that finds another call in flight waits for it, at most one round trip, and goes out in the next
    SubmitJobs with every submit that came meanwhile (``coalesce=False`` sends each alone).
    """

    def __init__(
        self,
        targets: str | Sequence[str] = "127.0.0.1:50051",
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        timeout: float = 10.0,
        retry: Retry | None = None,
        coalesce: bool = True,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        if not self.targets:
            raise ValueError("targets: at least one gateway address")
        self.timeout = timeout
        self.retry = retry or Retry()
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._credentials = (
            grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            if tls or root_certificates or private_key
            else None
        )
        self._options = list(options)
        self._current = 0
        self._channel = self._open(self.targets[0])
        self.stub = scheduler_pb2_grpc.SchedulerServiceStub(self._channel)
        self._submits = _Coalescer(self) if coalesce else None

    # --- plumbing ---------------------------------------------------------------------------
    def _meta(self) -> tuple[tuple[str, str], ...]:
        """The call's metadata: the token, and the current trace context (W3C traceparent)."""
        if propagate is None:
            return self._metadata
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return self._metadata + tuple(carrier.items())

    def _open(self, target: str) -> grpc.aio.Channel:
        if self._credentials is not None:
            return grpc.aio.secure_channel(target, self._credentials, options=self._options)
        return grpc.aio.insecure_channel(target, options=self._options)

    @property
    def target(self) -> str:
        """The gateway address calls go to now."""
        return self.targets[self._current]

    async def _next_target(self, failed: grpc.aio.Channel) -> None:
        """Moves to the next gateway, unless another call did already since ``failed`` was used."""
        if len(self.targets) == 1 or failed is not self._channel:
            return
        self._current = (self._current + 1) % len(self.targets)
        old, self._channel = self._channel, self._open(self.target)
        self.stub = scheduler_pb2_grpc.SchedulerServiceStub(self._channel)
        await old.close(grace=None)

    async def close(self) -> None:
        """Closes the channel (calls in flight end with CANCELLED)."""
        await self._channel.close(grace=None)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(
        self,
        rpc: Callable[[scheduler_pb2_grpc.SchedulerServiceStub], Callable[..., Awaitable[T]]],
        request: Any,
        *,
        safe: bool,
        deadline_s: float | None = None,
    ) -> T:
        """One unary call with the deadline; retried on UNAVAILABLE when ``safe``. Raises a
        JobgateError."""
        attempt = 0
        while True:
            attempt += 1
            channel = self._channel
            try:
                return await rpc(self.stub)(request, timeout=deadline_s or self.timeout, metadata=self._meta())
            except grpc.aio.AioRpcError as err:
                if not safe or err.code() not in RETRIED or attempt >= self.retry.attempts:
                    raise from_rpc_error(err) from None
                await self._next_target(channel)
                await asyncio.sleep(self.retry.wait(attempt))

    # --- jobs ---------------------------------------------------------------------------------
    async def submit(self, kind: str, args: Any = None, **options: Any) -> Job:
        """Stores one job and returns it (QUEUED, SCHEDULED or BLOCKED). ``options`` are the fields
        of :func:`job_request`. Raises InvalidArgument, AlreadyExists, ResourceExhausted, ..."""
        req = _keyed(job_request(kind, args, **options))
        if self._submits is not None:
            return await self._submits.submit(req)
        reply = await self._call(lambda s: s.SubmitJob, req, safe=True)
        return Job.from_pb(reply.job)

    async def submit_many(self, requests: Iterable[scheduler_pb2.SubmitJobRequest]) -> list[Job]:
        """Stores many jobs (:func:`job_request` builds each), up to 1,000 per SubmitJobs call, each
        call all or none; returns them in order."""
        reqs = [_keyed(r) for r in requests]
        out: list[Job] = []
        for first in range(0, len(reqs), MAX_BATCH):
            out += await self._submit_jobs(reqs[first : first + MAX_BATCH])
        return out

    async def _submit_jobs(self, reqs: Sequence[scheduler_pb2.SubmitJobRequest]) -> list[Job]:
        """One SubmitJobs call. Its reply leaves out what the requests carry (JOB_VIEW_BASIC: their
        args and payload do not travel back) and the jobs get them from the requests: what was
        stored, since a repeat of an idempotency key answers with the job of the same request. A
        job that has already SUCCEEDED (such a repeat) is read whole, for its result."""
        call = scheduler_pb2.SubmitJobsRequest(jobs=reqs, view=scheduler_pb2.JOB_VIEW_BASIC)
        reply = await self._call(lambda s: s.SubmitJobs, call, safe=True)
        out = []
        for req, job in zip(reqs, reply.jobs, strict=True):
            if job.state == job_pb2.JOB_STATE_SUCCEEDED:
                out.append(await self.get(job.id))
                continue
            if req.HasField("args"):
                job.spec.args.CopyFrom(req.args)
            job.spec.payload = req.payload
            out.append(Job.from_pb(job))
        return out

    async def get(self, job_id: str) -> Job:
        """One stored job, with its attempts and why it waits. Raises NotFound."""
        reply = await self._call(lambda s: s.GetJob, scheduler_pb2.GetJobRequest(id=job_id), safe=True)
        return Job.from_pb(reply.job)

    async def cancel(self, job_id: str) -> Job:
        """Cancels a job: CANCELLED at once if it waits; told to stop (still RUNNING) if it runs.
        Raises NotFound, FailedPrecondition (already finished)."""
        reply = await self._call(lambda s: s.CancelJob, scheduler_pb2.CancelJobRequest(id=job_id), safe=False)
        return Job.from_pb(reply.job)

    async def retry_job(self, job_id: str) -> Job:
        """Puts a FAILED or CANCELLED job back in its queue. Raises FailedPrecondition otherwise."""
        reply = await self._call(lambda s: s.RetryJob, scheduler_pb2.RetryJobRequest(id=job_id), safe=False)
        return Job.from_pb(reply.job)

    async def run(self, kind: str, args: Any = None, **options: Any) -> AsyncIterator[Event]:
        """Stores one job and yields its events (its first state, then each change, progress
        reports included) until its outcome, the last one. If the gateway goes away meanwhile, the
        same request (same idempotency key) is sent again, to it or the next gateway, which follows
        the stored job from its current state: the outcome comes exactly once."""
        req = _keyed(job_request(kind, args, **options))
        last: tuple[Any, ...] | None = None
        deadline = None
        while True:
            channel = self._channel
            call = self.stub.RunJob(scheduler_pb2.RunJobRequest(job=req), metadata=self._meta())
            try:
                async for reply in call:
                    deadline = None
                    event = Event.from_pb(reply.event)
                    mark = (event.state, event.attempt, event.progress)
                    if mark == last:
                        continue  # the state it was in when the stream came back
                    last = mark
                    yield event
                    if event.terminal:
                        return
                return
            except grpc.aio.AioRpcError as err:
                deadline = await self._reconnect(err, channel, deadline)
            finally:
                call.cancel()

    async def watch(
        self,
        job_ids: Iterable[str] = (),
        *,
        queue: str = "",
        kinds: Iterable[str] = (),
        batch_id: str = "",
        progress: bool = False,
    ) -> AsyncIterator[Event]:
        """Yields outcomes (terminal events): of ``job_ids`` (those already finished first; it ends
        once all have ended), of a batch (the same, for its jobs), or every outcome of ``queue`` /
        ``kinds`` as it happens (until the caller stops). With ``progress`` and job ids, their
        progress reports too. Across a gateway restart or a move to another gateway, job id and
        batch watches go on without losing or repeating an outcome; a watch of a queue goes on too,
        but outcomes published while it was away are not replayed (watch ids for that)."""
        ids = list(dict.fromkeys(job_ids))
        if ids and batch_id:
            raise InvalidArgument("batch_id: not with job_ids")
        seen: set[str] = set()
        deadline = None
        while True:
            left = [j for j in ids if j not in seen]
            if ids and not left:
                return
            req = scheduler_pb2.WatchResultsRequest(
                job_ids=left, queue=queue, kinds=list(kinds), batch_id=batch_id, include_progress=progress
            )
            channel = self._channel
            call = self.stub.WatchResults(req, metadata=self._meta())
            try:
                async for reply in call:
                    deadline = None
                    for pb in [*reply.events] or [reply.event]:
                        event = Event.from_pb(pb)
                        if event.terminal:
                            if event.job_id in seen:
                                continue
                            seen.add(event.job_id)
                        yield event
                return
            except grpc.aio.AioRpcError as err:
                deadline = await self._reconnect(err, channel, deadline)
            finally:
                call.cancel()

    async def wait(self, job_ids: Iterable[str]) -> dict[str, Event]:
        """Waits for every job of ``job_ids`` to end; returns their outcomes by id."""
        return {e.job_id: e async for e in self.watch(job_ids) if e.terminal}

    async def _reconnect(self, err: grpc.aio.AioRpcError, channel: grpc.aio.Channel, deadline: float | None) -> float:
        """After a stream broke: raises unless it was UNAVAILABLE within the reconnect budget;
        else moves to the next gateway and waits a little. Returns the budget's deadline."""
        loop = asyncio.get_running_loop()
        deadline = deadline if deadline is not None else loop.time() + self.retry.reconnect_s
        if err.code() not in RETRIED or loop.time() > deadline:
            raise from_rpc_error(err) from None
        await self._next_target(channel)
        await asyncio.sleep(self.retry.wait(2))
        return deadline

    # --- listings and queues ------------------------------------------------------------------
    async def list_jobs(
        self,
        queue: str = "default",
        *,
        states: Iterable[JobState] = (),
        kind: str = "",
        page_size: int = 100,
        page_token: str = "",
    ) -> Page:
        """One page of a queue's jobs, newest first (ListJobs): a page may be short, even empty,
        with a token when the filter is narrow; go on while ``next_page_token`` is set."""
        req = scheduler_pb2.ListJobsRequest(queue=queue, kind=kind, page_size=page_size, page_token=page_token)
        req.states.extend(cast(Any, [int(s) for s in states]))
        reply = await self._call(lambda s: s.ListJobs, req, safe=True)
        return Page([Job.from_pb(j) for j in reply.jobs], reply.next_page_token)

    async def iter_jobs(
        self, queue: str = "default", *, states: Iterable[JobState] = (), kind: str = "", page_size: int = 100
    ) -> AsyncIterator[Job]:
        """Every job of a queue matching the filters, newest first, page after page."""
        token, wanted = "", list(states)
        while True:
            page = await self.list_jobs(queue, states=wanted, kind=kind, page_size=page_size, page_token=token)
            for job in page.jobs:
                yield job
            token = page.next_page_token
            if not token:
                return

    async def failed_jobs(self, queue: str = "default", *, page_size: int = 100, page_token: str = "") -> Page:
        """One page of a queue's dead letters, the most recently failed first."""
        req = scheduler_pb2.ListFailedJobsRequest(queue=queue, page_size=page_size, page_token=page_token)
        reply = await self._call(lambda s: s.ListFailedJobs, req, safe=True)
        return Page([Job.from_pb(j) for j in reply.jobs], reply.next_page_token)

    async def queue_stats(self, queues: Iterable[str] = ()) -> list[QueueStats]:
        """The stats of the named queues, or of every queue the token may see."""
        req = scheduler_pb2.GetQueueStatsRequest(queues=list(queues))
        reply = await self._call(lambda s: s.GetQueueStats, req, safe=True)
        return [QueueStats.from_pb(q) for q in reply.queues]

    async def workers(self) -> list[Worker]:
        """The live workers."""
        reply = await self._call(lambda s: s.ListWorkers, scheduler_pb2.ListWorkersRequest(), safe=True)
        return [Worker.from_pb(w) for w in reply.workers]

    async def pause(self, queue: str = "default") -> bool:
        """Pauses a queue; returns True when it was paused already."""
        reply = await self._call(lambda s: s.PauseQueue, scheduler_pb2.PauseQueueRequest(queue=queue), safe=True)
        return bool(reply.already)

    async def resume(self, queue: str = "default") -> bool:
        """Resumes a queue; returns True when it was not paused."""
        reply = await self._call(lambda s: s.ResumeQueue, scheduler_pb2.ResumeQueueRequest(queue=queue), safe=True)
        return bool(reply.already)

    async def set_limits(self, queue: str, limits: Limits) -> Limits:
        """Replaces a queue's limits; returns those now in force."""
        req = scheduler_pb2.SetQueueLimitsRequest(queue=queue, limits=limits.to_pb())
        reply = await self._call(lambda s: s.SetQueueLimits, req, safe=True)
        return Limits.from_pb(reply.limits)

    async def get_batch(self, batch_id: str) -> Batch:
        """A batch's counts and its callback job."""
        reply = await self._call(lambda s: s.GetBatch, scheduler_pb2.GetBatchRequest(id=batch_id), safe=True)
        return Batch.from_pb(reply.batch)

    # --- schedules ----------------------------------------------------------------------------
    async def create_schedule(self, spec: scheduler_pb2.ScheduleSpec) -> Schedule:
        """Creates a periodic schedule. Raises AlreadyExists when the name is taken."""
        req = scheduler_pb2.CreateScheduleRequest(schedule=spec)
        reply = await self._call(lambda s: s.CreateSchedule, req, safe=False)
        return Schedule.from_pb(reply.schedule)

    async def get_schedule(self, name: str) -> Schedule:
        reply = await self._call(lambda s: s.GetSchedule, scheduler_pb2.GetScheduleRequest(name=name), safe=True)
        return Schedule.from_pb(reply.schedule)

    async def schedules(self) -> list[Schedule]:
        """Every schedule, by name."""
        out: list[Schedule] = []
        token = ""
        while True:
            req = scheduler_pb2.ListSchedulesRequest(page_size=100, page_token=token)
            reply = await self._call(lambda s: s.ListSchedules, req, safe=True)
            out += [Schedule.from_pb(s) for s in reply.schedules]
            token = reply.next_page_token
            if not token:
                return out

    async def pause_schedule(self, name: str) -> Schedule:
        req = scheduler_pb2.PauseScheduleRequest(name=name)
        return Schedule.from_pb((await self._call(lambda s: s.PauseSchedule, req, safe=True)).schedule)

    async def resume_schedule(self, name: str) -> Schedule:
        req = scheduler_pb2.ResumeScheduleRequest(name=name)
        return Schedule.from_pb((await self._call(lambda s: s.ResumeSchedule, req, safe=True)).schedule)

    async def trigger_schedule(self, name: str, request_id: str = "") -> Job:
        """Submits a schedule's job now, outside its timing (paused or not); returns the job. Calls
        with the same ``request_id`` submit one job between them."""
        req = scheduler_pb2.TriggerScheduleRequest(name=name, request_id=request_id)
        return Job.from_pb((await self._call(lambda s: s.TriggerSchedule, req, safe=bool(request_id))).job)

    async def delete_schedule(self, name: str) -> None:
        await self._call(lambda s: s.DeleteSchedule, scheduler_pb2.DeleteScheduleRequest(name=name), safe=False)


def _keyed(req: scheduler_pb2.SubmitJobRequest) -> scheduler_pb2.SubmitJobRequest:
    """``req`` with an idempotency key (a fresh one unless it has one), so that it is safe to resend."""
    if not req.idempotency_key:
        req.idempotency_key = f"client-{uuid.uuid4().hex}"
    return req


class _Coalescer:
    """Sends concurrent submits together: while a call is in flight, new submits wait (one round
    trip at most) and then go out as one SubmitJobs of up to MAX_BATCH. A batch refused as a whole
    (a bad field of one job refuses them all) is sent again one job per call, so that each submit
    gets its own answer."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.waiting: list[tuple[scheduler_pb2.SubmitJobRequest, asyncio.Future[Job]]] = []
        self.sending: asyncio.Future[None] | None = None

    async def submit(self, req: scheduler_pb2.SubmitJobRequest) -> Job:
        future: asyncio.Future[Job] = asyncio.get_running_loop().create_future()
        self.waiting.append((req, future))
        if self.sending is None:
            self.sending = asyncio.ensure_future(self._send())
        return await future

    async def _send(self) -> None:
        try:
            while self.waiting:
                batch, self.waiting = self.waiting[:MAX_BATCH], self.waiting[MAX_BATCH:]
                await self._send_batch(batch)
        finally:
            self.sending = None

    async def _send_batch(self, batch: list[tuple[scheduler_pb2.SubmitJobRequest, asyncio.Future[Job]]]) -> None:
        client = self.client
        try:
            if len(batch) == 1:
                reply = await client._call(lambda s: s.SubmitJob, batch[0][0], safe=True)
                jobs = [Job.from_pb(reply.job)]
            else:
                jobs = await client._submit_jobs([r for r, _ in batch])
        except JobgateError as exc:
            if len(batch) == 1 or isinstance(exc, Unavailable):
                for _, future in batch:
                    _settle(future, error=exc)
                return
            await asyncio.gather(*(self._send_batch([one]) for one in batch))
            return
        except BaseException as exc:  # cancelled: the waiting submits learn of it
            for _, future in batch:
                _settle(future, error=exc)
            raise
        for (_, future), job in zip(batch, jobs, strict=True):
            _settle(future, value=job)


def _settle(future: asyncio.Future[Job], *, value: Job | None = None, error: BaseException | None = None) -> None:
    if future.done():
        return
    with contextlib.suppress(asyncio.InvalidStateError):
        if error is not None:
            future.set_exception(error)
        else:
            assert value is not None
            future.set_result(value)
