"""Plain Python views of jobgate's messages: states as an enum, times as datetimes, ``args`` and
results as the JSON values they are (dicts, lists, strings, numbers, booleans, None)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from jobgate.v1 import job_pb2, scheduler_pb2


class JobState(enum.IntEnum):
    """A job's state (``jobgate.v1.JobState``)."""

    QUEUED = job_pb2.JOB_STATE_QUEUED
    DISPATCHED = job_pb2.JOB_STATE_DISPATCHED
    RUNNING = job_pb2.JOB_STATE_RUNNING
    SUCCEEDED = job_pb2.JOB_STATE_SUCCEEDED
    FAILED = job_pb2.JOB_STATE_FAILED
    CANCELLED = job_pb2.JOB_STATE_CANCELLED
    SCHEDULED = job_pb2.JOB_STATE_SCHEDULED
    BLOCKED = job_pb2.JOB_STATE_BLOCKED

    @property
    def terminal(self) -> bool:
        """SUCCEEDED, FAILED or CANCELLED: the job will not change again (unless RetryJob)."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    def __str__(self) -> str:
        return self.name


def state_of(value: int) -> JobState | None:
    """The JobState of a protobuf value; None for 0 (unset)."""
    return JobState(value) if value else None


def to_python(value: struct_pb2.Value, present: bool = True) -> Any:
    """A google.protobuf.Value as the JSON value it holds (None when absent). JSON numbers travel as
    doubles: a whole one comes back as an int, as json.loads would give it."""
    if not present:
        return None
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return {k: to_python(v) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [to_python(v) for v in value.list_value.values]
    if kind == "number_value":
        n = value.number_value
        return int(n) if n.is_integer() and abs(n) < 2**53 else n
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None  # null_value, or unset


class _NotPlain(Exception):
    """A value to_value leaves to json_format (which says what is wrong with it, if anything)."""


def to_value(obj: Any, value: struct_pb2.Value) -> None:
    """Sets ``value`` to the JSON value ``obj``, as ``json_format.ParseDict`` would (whose errors a
    value of another kind gets), without its per-field overhead."""
    try:
        _set_value(obj, value)
    except (_NotPlain, TypeError, ValueError, OverflowError):
        value.Clear()
        json_format.ParseDict(obj, value)


def _set_value(obj: Any, value: struct_pb2.Value) -> None:
    kind = type(obj)
    if obj is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif kind is bool:
        value.bool_value = obj
    elif kind is int or kind is float:
        value.number_value = obj
    elif kind is str:
        value.string_value = obj
    elif kind is dict:
        value.struct_value.SetInParent()
        fields = value.struct_value.fields
        for k, v in obj.items():
            if type(k) is not str:
                raise _NotPlain
            _set_value(v, fields[k])
    elif kind is list:
        value.list_value.SetInParent()
        values = value.list_value.values
        for v in obj:
            _set_value(v, values.add())
    else:
        raise _NotPlain


def to_datetime(ts: timestamp_pb2.Timestamp, present: bool) -> datetime | None:
    """A Timestamp as an aware UTC datetime (None when unset)."""
    return ts.ToDatetime(tzinfo=UTC) if present else None


@dataclass(frozen=True, slots=True)
class JobError:
    """Why a job failed or was cancelled: a code (HANDLER_ERROR, TIMEOUT, WORKER_LOST, FATAL,
    CANCELLED, DEPENDENCY_FAILED, ...) and a message."""

    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def _error(msg: job_pb2.JobError, present: bool) -> JobError | None:
    return JobError(msg.code, msg.message) if present and (msg.code or msg.message) else None


@dataclass(frozen=True, slots=True)
class Progress:
    """What a running job last reported of how far it has come."""

    fraction: float
    message: str
    time: datetime | None


def _progress(msg: job_pb2.Progress, present: bool) -> Progress | None:
    return Progress(msg.fraction, msg.message, to_datetime(msg.time, msg.HasField("time"))) if present else None


@dataclass(frozen=True, slots=True)
class Attempt:
    """One start of a job and how it ended."""

    attempt: int
    worker_id: str
    started_at: datetime | None
    finished_at: datetime | None
    state: JobState | None
    error: JobError | None


@dataclass(frozen=True, slots=True)
class Job:
    """A stored job, as GetJob and the listings return it."""

    id: str
    queue: str
    kind: str
    state: JobState | None
    args: Any
    payload: bytes
    priority: int
    max_attempts: int
    attempt: int
    worker_id: str
    result: Any
    output: bytes
    error: JobError | None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    due_at: datetime | None
    attempts: list[Attempt]
    progress: Progress | None
    waiting_reason: str
    batch_id: str
    labels: dict[str, str]
    depends_on: list[str]
    concurrency_key: str
    unique_key: str
    idempotency_key: str
    raw: job_pb2.Job = field(repr=False, compare=False)

    @classmethod
    def from_pb(cls, job: job_pb2.Job) -> Job:
        spec = job.spec
        return cls(
            id=job.id,
            queue=spec.queue,
            kind=spec.kind,
            state=state_of(job.state),
            args=to_python(spec.args, spec.HasField("args")),
            payload=spec.payload,
            priority=spec.priority,
            max_attempts=spec.max_attempts,
            attempt=job.attempt,
            worker_id=job.worker_id,
            result=to_python(job.result, job.HasField("result")),
            output=job.output,
            error=_error(job.error, job.HasField("error")),
            created_at=to_datetime(job.created_at, job.HasField("created_at")),
            started_at=to_datetime(job.started_at, job.HasField("started_at")),
            finished_at=to_datetime(job.finished_at, job.HasField("finished_at")),
            due_at=to_datetime(job.due_at, job.HasField("due_at")),
            attempts=[
                Attempt(
                    a.attempt,
                    a.worker_id,
                    to_datetime(a.started_at, a.HasField("started_at")),
                    to_datetime(a.finished_at, a.HasField("finished_at")),
                    state_of(a.state),
                    _error(a.error, a.HasField("error")),
                )
                for a in job.attempts
            ],
            progress=_progress(job.progress, job.HasField("progress")),
            waiting_reason=job.waiting_reason,
            batch_id=job.batch_id,
            labels=dict(spec.labels),
            depends_on=list(spec.depends_on),
            concurrency_key=spec.concurrency_key,
            unique_key=spec.unique_key,
            idempotency_key=spec.idempotency_key,
            raw=job,
        )


@dataclass(frozen=True, slots=True)
class Event:
    """A change of a job's state (or, while it runs, a progress report: ``progress`` set)."""

    job_id: str
    queue: str
    kind: str
    state: JobState | None
    attempt: int
    worker_id: str
    result: Any
    output: bytes
    error: JobError | None
    time: datetime | None
    due_at: datetime | None
    progress: Progress | None
    raw: job_pb2.JobEvent = field(repr=False, compare=False)

    @property
    def terminal(self) -> bool:
        """Whether this is the job's outcome (SUCCEEDED, FAILED or CANCELLED), not a progress report."""
        return self.state is not None and self.state.terminal and self.progress is None

    @classmethod
    def from_pb(cls, e: job_pb2.JobEvent) -> Event:
        return cls(
            job_id=e.job_id,
            queue=e.queue,
            kind=e.kind,
            state=state_of(e.state),
            attempt=e.attempt,
            worker_id=e.worker_id,
            result=to_python(e.result, e.HasField("result")),
            output=e.output,
            error=_error(e.error, e.HasField("error")),
            time=to_datetime(e.time, e.HasField("time")),
            due_at=to_datetime(e.due_at, e.HasField("due_at")),
            progress=_progress(e.progress, e.HasField("progress")),
            raw=e,
        )


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing, and the token of the next ('' when it was the last)."""

    jobs: list[Job]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class Limits:
    """A queue's limits (SetQueueLimits): None where it has none; a rate is (starts, period)."""

    max_running: int | None = None
    rate: tuple[int, timedelta] | None = None
    max_running_per_key: int | None = None
    rate_per_key: tuple[int, timedelta] | None = None

    def to_pb(self) -> scheduler_pb2.QueueLimits:
        out = scheduler_pb2.QueueLimits()
        if self.max_running is not None:
            out.max_running = self.max_running
        if self.max_running_per_key is not None:
            out.max_running_per_key = self.max_running_per_key
        for rate, target in ((self.rate, out.rate), (self.rate_per_key, out.rate_per_key)):
            if rate is not None:
                target.count = rate[0]
                target.period.FromTimedelta(rate[1])
        return out

    @classmethod
    def from_pb(cls, msg: scheduler_pb2.QueueLimits) -> Limits:
        def rate(r: scheduler_pb2.RateLimit, present: bool) -> tuple[int, timedelta] | None:
            return (r.count, r.period.ToTimedelta()) if present else None

        return cls(
            msg.max_running if msg.HasField("max_running") else None,
            rate(msg.rate, msg.HasField("rate")),
            msg.max_running_per_key if msg.HasField("max_running_per_key") else None,
            rate(msg.rate_per_key, msg.HasField("rate_per_key")),
        )


@dataclass(frozen=True, slots=True)
class QueueStats:
    """A queue now: what it holds, what ended within ``window``, how fast it drains."""

    queue: str
    waiting: int
    scheduled: int
    running: int
    blocked: int
    succeeded: int
    failed: int
    cancelled: int
    window: timedelta
    dead_letters: int
    ended_per_minute: tuple[float, float, float]  # averaged over the last 1, 5 and 15 minutes
    ended_by_minute: list[int]  # the last 60 minutes, oldest first
    oldest_waiting_age: timedelta | None
    paused: bool
    limits: Limits
    workers: int
    slots: int

    @classmethod
    def from_pb(cls, s: scheduler_pb2.QueueStats) -> QueueStats:
        return cls(
            queue=s.queue,
            waiting=s.waiting,
            scheduled=s.scheduled,
            running=s.running,
            blocked=s.blocked,
            succeeded=s.succeeded,
            failed=s.failed,
            cancelled=s.cancelled,
            window=s.window.ToTimedelta(),
            dead_letters=s.dead_letters,
            ended_per_minute=(s.ended_per_minute_1m, s.ended_per_minute_5m, s.ended_per_minute_15m),
            ended_by_minute=list(s.ended_by_minute),
            oldest_waiting_age=s.oldest_waiting_age.ToTimedelta() if s.HasField("oldest_waiting_age") else None,
            paused=s.paused,
            limits=Limits.from_pb(s.limits),
            workers=s.workers,
            slots=s.slots,
        )


@dataclass(frozen=True, slots=True)
class Worker:
    """A live worker."""

    id: str
    queues: list[str]
    kinds: list[str]
    slots: int
    busy: int
    host: str
    pid: int
    last_seen: datetime | None
    labels: dict[str, str]

    @classmethod
    def from_pb(cls, w: scheduler_pb2.WorkerInfo) -> Worker:
        return cls(
            id=w.id,
            queues=list(w.queues),
            kinds=list(w.kinds),
            slots=w.slots,
            busy=w.busy,
            host=w.host,
            pid=w.pid,
            last_seen=to_datetime(w.last_seen, w.HasField("last_seen")),
            labels=dict(w.labels),
        )


@dataclass(frozen=True, slots=True)
class Batch:
    """A batch's counts, when it was created and finished (its last job ended), and its callback
    job once submitted."""

    id: str
    total: int
    pending: int
    succeeded: int
    failed: int
    cancelled: int
    created_at: datetime | None
    finished_at: datetime | None
    callback_job_id: str

    @classmethod
    def from_pb(cls, b: scheduler_pb2.Batch) -> Batch:
        return cls(
            id=b.id,
            total=b.total,
            pending=b.pending,
            succeeded=b.succeeded,
            failed=b.failed,
            cancelled=b.cancelled,
            created_at=to_datetime(b.created_at, b.HasField("created_at")),
            finished_at=to_datetime(b.finished_at, b.HasField("finished_at")),
            callback_job_id=b.callback_job_id,
        )


@dataclass(frozen=True, slots=True)
class Schedule:
    """A periodic schedule: its spec (``cron`` or ``interval``, the job it submits), whether it is
    paused, its next ticks and its last runs (as their protobuf messages)."""

    name: str
    cron: str
    time_zone: str
    interval: timedelta | None
    job: scheduler_pb2.SubmitJobRequest
    paused: bool
    created_at: datetime | None
    next_runs: list[datetime]
    recent_runs: list[scheduler_pb2.ScheduleRun]
    raw: scheduler_pb2.Schedule = field(repr=False, compare=False)

    @classmethod
    def from_pb(cls, s: scheduler_pb2.Schedule) -> Schedule:
        spec = s.spec
        return cls(
            name=spec.name,
            cron=spec.cron,
            time_zone=spec.time_zone,
            interval=spec.interval.ToTimedelta() if spec.HasField("interval") else None,
            job=spec.job,
            paused=s.paused,
            created_at=to_datetime(s.created_at, s.HasField("created_at")),
            next_runs=[t.ToDatetime(tzinfo=UTC) for t in s.next_fire_times],
            recent_runs=list(s.recent_runs),
            raw=s,
        )


def seconds(value: float | timedelta) -> timedelta:
    """A duration given in seconds or as a timedelta."""
    return value if isinstance(value, timedelta) else timedelta(seconds=value)
