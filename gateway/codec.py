"""Conversions between stored job hashes and the protobuf messages of ``jobgate.v1``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from google.protobuf.struct_pb2 import Value
from google.protobuf.timestamp_pb2 import Timestamp

from jobgate.v1 import job_pb2, relay_pb2

QUEUED = job_pb2.JOB_STATE_QUEUED
DISPATCHED = job_pb2.JOB_STATE_DISPATCHED
RUNNING = job_pb2.JOB_STATE_RUNNING
SUCCEEDED = job_pb2.JOB_STATE_SUCCEEDED
FAILED = job_pb2.JOB_STATE_FAILED
CANCELLED = job_pb2.JOB_STATE_CANCELLED
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

Fields = Mapping[bytes, bytes]


def timestamp(ms: int) -> Timestamp:
    """A Timestamp for milliseconds since the epoch."""
    ts = Timestamp()
    ts.FromMilliseconds(ms)
    return ts


def events_message(events: Iterable[job_pb2.JobEvent]) -> bytes:
    """The results-channel message (a ``JobEvents``) carrying ``events`` in order."""
    return relay_pb2.JobEvents(events=events).SerializeToString()


def _int(fields: Fields, name: bytes) -> int:
    raw = fields.get(name)
    return int(raw) if raw else 0


def _str(fields: Fields, name: bytes) -> str:
    return fields.get(name, b"").decode()


def job_from_hash(job_id: str, fields: Fields) -> job_pb2.Job:
    """The public Job for a stored hash (as returned by HGETALL)."""
    job = job_pb2.Job(
        id=job_id,
        state=_int(fields, b"state"),  # type: ignore[arg-type]
        attempt=_int(fields, b"attempt"),
        worker_id=_str(fields, b"worker"),
        output=fields.get(b"output", b""),
    )
    job.spec.ParseFromString(fields.get(b"spec", b""))
    _fill_outcome(job, fields)
    job.created_at.CopyFrom(timestamp(_int(fields, b"created")))
    if started := _int(fields, b"started"):
        job.started_at.CopyFrom(timestamp(started))
    if finished := _int(fields, b"finished"):
        job.finished_at.CopyFrom(timestamp(finished))
    return job


def event_from_hash(job_id: str, fields: Fields) -> job_pb2.JobEvent:
    """The JobEvent describing a stored job's current state."""
    event = job_pb2.JobEvent(
        job_id=job_id,
        queue=_str(fields, b"queue"),
        kind=_str(fields, b"kind"),
        state=_int(fields, b"state"),  # type: ignore[arg-type]
        attempt=_int(fields, b"attempt"),
        worker_id=_str(fields, b"worker"),
        output=fields.get(b"output", b""),
    )
    _fill_outcome(event, fields)
    event.time.CopyFrom(timestamp(_int(fields, b"updated")))
    event.created_at.CopyFrom(timestamp(_int(fields, b"created")))
    return event


def _fill_outcome(msg: job_pb2.Job | job_pb2.JobEvent, fields: Fields) -> None:
    if raw := fields.get(b"result"):
        value = Value()
        value.ParseFromString(raw)
        msg.result.CopyFrom(value)
    if code := _str(fields, b"err_code"):
        msg.error.code = code
        msg.error.message = _str(fields, b"err_msg")
