"""Turns public requests into validated, normalised jobs ready to store."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from google.protobuf import struct_pb2

from jobgate.v1 import job_pb2, scheduler_pb2
from protocol.errors import InvalidArgument, ResourceExhausted
from protocol.gateway_calls import PreparedJob
from protocol.keys import JOB_ID_RE, KIND_RE, QUEUE_RE

DEFAULT_QUEUE = "default"
DEFAULT_MAX_ATTEMPTS = 3
MAX_ATTEMPTS_LIMIT = 100
MAX_PRIORITY = 255
MAX_IDEMPOTENCY_KEY = 256
MAX_TIMEOUT_MS = 7 * 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class Limits:
    """Request limits (see gateway settings)."""

    max_payload_bytes: int
    default_timeout_ms: int
    max_batch: int
    max_watch_ids: int


def new_job_id() -> str:
    """A fresh job id: 32 lowercase hex characters (128 random bits)."""
    return os.urandom(16).hex()


def job_id(value: str, field: str = "id") -> str:
    """Checks a job id. Raises InvalidArgument naming ``field``."""
    if not JOB_ID_RE.fullmatch(value):
        raise InvalidArgument(f"{field}: must be 32 lowercase hex characters")
    return value


def queue_name(value: str, field: str = "queue") -> str:
    """Checks a queue name ('' means the default queue). Raises InvalidArgument."""
    if value == "":
        return DEFAULT_QUEUE
    if not QUEUE_RE.fullmatch(value):
        raise InvalidArgument(f"{field}: must be 1-64 characters from [A-Za-z0-9_.-]")
    return value


def kind_name(value: str, field: str = "kind") -> str:
    """Checks a handler name. Raises InvalidArgument."""
    if not value:
        raise InvalidArgument(f"{field}: is required")
    if not KIND_RE.fullmatch(value):
        raise InvalidArgument(f"{field}: must be 1-128 characters from [A-Za-z0-9_.:-]")
    return value


def prepare(req: scheduler_pb2.SubmitJobRequest, limits: Limits, field: str = "") -> PreparedJob:
    """Validates one submit request. Raises InvalidArgument or ResourceExhausted naming the field."""
    spec = job_pb2.JobSpec(
        queue=queue_name(req.queue, f"{field}queue"),
        kind=kind_name(req.kind, f"{field}kind"),
        payload=req.payload,
        idempotency_key=req.idempotency_key,
    )
    if req.HasField("args"):
        _check_value(req.args, f"{field}args")
        spec.args.CopyFrom(req.args)
    if not 0 <= req.priority <= MAX_PRIORITY:
        raise InvalidArgument(f"{field}priority: must be between 0 and {MAX_PRIORITY}")
    spec.priority = req.priority
    if not 0 <= req.max_attempts <= MAX_ATTEMPTS_LIMIT:
        raise InvalidArgument(f"{field}max_attempts: must be between 1 and {MAX_ATTEMPTS_LIMIT} (0 = default)")
    spec.max_attempts = req.max_attempts or DEFAULT_MAX_ATTEMPTS
    timeout_ms = limits.default_timeout_ms
    if req.HasField("timeout"):
        t = req.timeout
        if t.seconds < 0 or t.nanos < 0:
            raise InvalidArgument(f"{field}timeout: must not be negative")
        if t.nanos > 999_999_999:
            raise InvalidArgument(f"{field}timeout: nanos must be below one second (999999999 at most)")
        if t.seconds > MAX_TIMEOUT_MS // 1000 or t.ToMilliseconds() > MAX_TIMEOUT_MS:
            raise InvalidArgument(f"{field}timeout: must be at most 7 days")
        if t.seconds or t.nanos:
            timeout_ms = max(1, t.ToMilliseconds())
            spec.timeout.CopyFrom(t)
    if len(req.idempotency_key) > MAX_IDEMPOTENCY_KEY:
        raise InvalidArgument(f"{field}idempotency_key: must be at most {MAX_IDEMPOTENCY_KEY} characters")
    size = len(req.payload) + (req.args.ByteSize() if req.HasField("args") else 0)
    if size > limits.max_payload_bytes:
        raise ResourceExhausted(
            f"{field}payload: args and payload take {size} bytes, over the limit of {limits.max_payload_bytes} bytes"
        )
    spec_bytes = spec.SerializeToString(deterministic=True)
    idem = req.idempotency_key
    return PreparedJob(
        id=new_job_id(),
        spec=spec,
        spec_bytes=spec_bytes,
        timeout_ms=timeout_ms,
        # Scoped to the queue: a token limited to other queues can neither see nor claim this key.
        idempotency_digest=hashlib.sha256(f"{spec.queue}\0{idem}".encode()).hexdigest() if idem else "",
        request_digest=hashlib.sha256(spec_bytes).hexdigest() if idem else "",
        field=field,
    )


def _check_value(value: struct_pb2.Value, field: str) -> None:
    """Refuses a Value (or nested Value) with no kind set: clients that build Values by hand (for
    example a JavaScript object passed where the Value form is needed) would lose their input."""
    stack = [value]
    while stack:
        v = stack.pop()
        kind = v.WhichOneof("kind")
        if kind is None:
            raise InvalidArgument(f"{field}: a google.protobuf.Value with no kind set (use null_value for null)")
        if kind == "struct_value":
            stack.extend(v.struct_value.fields.values())
        elif kind == "list_value":
            stack.extend(v.list_value.values)


def prepare_batch(reqs: list[scheduler_pb2.SubmitJobRequest], limits: Limits) -> list[PreparedJob]:
    """Validates a SubmitJobs batch. Raises InvalidArgument naming ``jobs[i].field``."""
    if not reqs:
        raise InvalidArgument("jobs: at least one job is required")
    if len(reqs) > limits.max_batch:
        raise InvalidArgument(f"jobs: at most {limits.max_batch} jobs per batch, got {len(reqs)}")
    prepared = [prepare(r, limits, f"jobs[{i}].") for i, r in enumerate(reqs)]
    keys = [p.idempotency_digest for p in prepared if p.idempotency_digest]
    if len(keys) != len(set(keys)):
        raise InvalidArgument("jobs: the same idempotency_key appears twice for one queue in one batch")
    return prepared
