"""Turns public requests into validated, normalised jobs ready to store."""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from google.protobuf import duration_pb2, struct_pb2

from jobgate.v1 import job_pb2, scheduler_pb2
from protocol.connection import now_ms
from protocol.errors import InvalidArgument, ResourceExhausted
from protocol.gateway_calls import PreparedJob, QueueLimitValues, idempotency_digest
from protocol.keys import (
    JOB_ID_RE,
    KIND_RE,
    LABEL_NAME_RE,
    LABEL_VALUE_RE,
    QUEUE_RE,
    SCHEDULE_RE,
    placement_group,
)

DEFAULT_QUEUE = "default"
DEFAULT_MAX_ATTEMPTS = 3
MAX_ATTEMPTS_LIMIT = 100
MAX_PRIORITY = 255
MAX_IDEMPOTENCY_KEY = 256
MAX_TIMEOUT_MS = 7 * 24 * 3600 * 1000
DAY_MS = 24 * 3600 * 1000
MAX_DELAY_MS = 365 * DAY_MS  # how far ahead run_at and delay may reach
MAX_INITIAL_BACKOFF_MS = DAY_MS
MAX_BACKOFF_MS = 7 * DAY_MS
MAX_MULTIPLIER = 100.0
MAX_JOB_LABELS = 16


@dataclass(frozen=True, slots=True)
class QueueDefaults:
    """What a job of one queue gets for what its request leaves unset, and how long it is kept:
    the gateway's settings, overridden per queue by ``queue_settings``."""

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    default_timeout_ms: int = 300_000
    retry_initial_backoff_ms: int = 1000  # the RetryPolicy a job's unset fields take
    retry_max_backoff_ms: int = 300_000
    retry_multiplier: float = 2.0
    retention_s: int = 86_400  # how long a finished job is kept
    dead_retention_s: int = 604_800  # how long a FAILED job (a dead letter) is kept
    # the backoff of a job that sets no retry policy, as the scripts read it (see _backoff)
    backoff: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        initial, most = self.retry_initial_backoff_ms, self.retry_max_backoff_ms
        object.__setattr__(self, "backoff", f"{initial},{max(most, initial)},{self.retry_multiplier:g}")

    def check(self, where: str = "") -> None:
        """Raises ValueError naming the first value that cannot work (``where``: e.g. "queue_settings[q]: ")."""
        for f in fields(self):
            if f.init and getattr(self, f.name) <= 0:
                raise ValueError(f"{where}{f.name} must be positive")
        if self.max_attempts > MAX_ATTEMPTS_LIMIT:
            raise ValueError(f"{where}max_attempts must be at most {MAX_ATTEMPTS_LIMIT}")
        if not 1 <= self.retry_multiplier <= MAX_MULTIPLIER:
            raise ValueError(f"{where}retry_multiplier must be between 1 and {MAX_MULTIPLIER:g}")
        if self.retry_max_backoff_ms < self.retry_initial_backoff_ms:
            raise ValueError(f"{where}retry_max_backoff_ms must not be below retry_initial_backoff_ms")


def parse_queue_settings(text: str, base: QueueDefaults) -> dict[str, QueueDefaults]:
    """Per-queue overrides of ``base`` from the ``queue_settings`` format: entries separated by
    ``;``, each a queue name then ``name=value`` pairs, e.g. ``emails max_attempts=10
    retry_initial_backoff_ms=5000; reports retention_s=600``. Raises ValueError naming what is wrong."""
    known = {f.name: f.type for f in fields(QueueDefaults) if f.init}
    out: dict[str, QueueDefaults] = {}
    for entry in (e.strip() for e in text.split(";")):
        if not entry:
            continue
        queue, *pairs = entry.split()
        if not QUEUE_RE.fullmatch(queue):
            raise ValueError(f"queue_settings: {queue!r} is not a queue name (1-64 characters from [A-Za-z0-9_.-])")
        if queue in out:
            raise ValueError(f"queue_settings: queue {queue!r} appears twice")
        if not pairs:
            raise ValueError(f"queue_settings: queue {queue!r} sets nothing (name=value pairs follow the name)")
        values: dict[str, int | float] = {}
        for pair in pairs:
            name, eq, raw = pair.partition("=")
            if not eq or name not in known:
                raise ValueError(
                    f"queue_settings[{queue}]: {pair!r} is not name=value with a name among {', '.join(known)}"
                )
            try:
                values[name] = float(raw) if known[name] in (float, "float") else int(raw)
            except ValueError:
                raise ValueError(f"queue_settings[{queue}]: {name} must be a number, got {raw!r}") from None
        policy = replace(base, **values)  # type: ignore[arg-type]
        policy.check(f"queue_settings[{queue}]: ")
        out[queue] = policy
    return out


@dataclass(frozen=True, slots=True)
class Limits:
    """Request limits and the defaults jobs take (see gateway settings)."""

    max_payload_bytes: int
    default_timeout_ms: int
    max_batch: int
    max_watch_ids: int
    retry_initial_backoff_ms: int = 1000  # the RetryPolicy a job's unset fields take
    retry_max_backoff_ms: int = 300_000
    retry_multiplier: float = 2.0
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    retention_s: int = 86_400
    dead_retention_s: int = 604_800
    queues: Mapping[str, QueueDefaults] = field(default_factory=dict)  # per-queue overrides
    base: QueueDefaults | None = None  # defaults() made once (GatewaySettings.limits sets it)

    def defaults(self) -> QueueDefaults:
        """The gateway-wide defaults, for queues without settings of their own."""
        return QueueDefaults(
            max_attempts=self.max_attempts,
            default_timeout_ms=self.default_timeout_ms,
            retry_initial_backoff_ms=self.retry_initial_backoff_ms,
            retry_max_backoff_ms=self.retry_max_backoff_ms,
            retry_multiplier=self.retry_multiplier,
            retention_s=self.retention_s,
            dead_retention_s=self.dead_retention_s,
        )

    def for_queue(self, queue: str) -> QueueDefaults:
        """The defaults of ``queue``."""
        found = self.queues.get(queue)
        if found is not None:
            return found
        return self.base if self.base is not None else self.defaults()


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


DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def page_size(value: int, field: str = "page_size") -> int:
    """Checks a page size (0 means the default). Raises InvalidArgument."""
    if not 0 <= value <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"{field}: must be between 1 and {MAX_PAGE_SIZE} (0 = {DEFAULT_PAGE_SIZE})")
    return value or DEFAULT_PAGE_SIZE


def _token(text: str) -> str:
    """An opaque page token carrying ``text``."""
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _untoken(token: str) -> str:
    """The text a page token carries ('' when it is not one of ours)."""
    try:
        return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return ""


def page_token(position: tuple[int, str]) -> str:
    """The opaque token of a position in a listing ordered by time then id."""
    return _token(f"1:{position[0]}:{position[1]}")


def page_position(token: str, field: str = "page_token") -> tuple[int, str] | None:
    """The position a page token names (None for an empty token). Raises InvalidArgument."""
    if not token:
        return None
    version, _, rest = _untoken(token).partition(":")
    ms, _, jid = rest.partition(":")
    if version == "1" and JOB_ID_RE.fullmatch(jid) and ms.isdigit():
        return int(ms), jid
    raise InvalidArgument(f"{field}: not a token this listing returned")


def with_trace_context(job: PreparedJob, carried: Mapping[str, str]) -> PreparedJob:
    """``job`` with ``carried`` (a trace context) in its spec. Its request digest stays the one of
    the request without it, so that a retry from another trace is still the same request."""
    spec = job_pb2.JobSpec()
    spec.CopyFrom(job.spec)
    spec.trace_context.update(carried)
    return replace(job, spec=spec, spec_bytes=spec.SerializeToString(deterministic=True))


def jobs_page_token(seq: int) -> str:
    """The opaque token of a position in ListJobs (the seq of the last job it read)."""
    return _token(f"j:{seq}")


def jobs_page_position(token: str, field: str = "page_token") -> int | None:
    """The seq a ListJobs page token names (None for an empty token). Raises InvalidArgument."""
    if not token:
        return None
    kind, _, seq = _untoken(token).partition(":")
    if kind == "j" and seq.isdigit() and len(seq) < 18:
        return int(seq)
    raise InvalidArgument(f"{field}: not a token this listing returned")


def job_states(values: Sequence[int], field: str = "states") -> frozenset[int]:
    """The states a listing filters on (empty: all). Raises InvalidArgument for an unknown one."""
    known = set(job_pb2.JobState.values()) - {job_pb2.JOB_STATE_UNSPECIFIED}
    for i, state in enumerate(values):
        if state not in known:
            raise InvalidArgument(f"{field}[{i}]: {state} is not a job state")
    return frozenset(values)


def basic_view(value: int, field: str = "view") -> bool:
    """Whether a response is to carry jobs in JOB_VIEW_BASIC (else whole). Raises InvalidArgument
    for a value that is not a JobView."""
    if value not in scheduler_pb2.JobView.values():
        raise InvalidArgument(f"{field}: {value} is not a JobView")
    return value == scheduler_pb2.JOB_VIEW_BASIC


def in_basic_view(job: job_pb2.Job) -> job_pb2.Job:
    """``job`` without its inputs and outputs (JOB_VIEW_BASIC), changed in place."""
    job.spec.ClearField("args")
    job.spec.ClearField("payload")
    job.ClearField("result")
    job.ClearField("output")
    return job


MAX_STATS_QUEUES = 1000


def stats_queues(values: Sequence[str], field: str = "queues") -> list[str]:
    """The queues GetQueueStats names (deduplicated, sorted). Raises InvalidArgument."""
    if len(values) > MAX_STATS_QUEUES:
        raise InvalidArgument(f"{field}: at most {MAX_STATS_QUEUES:,} queues, got {len(values):,}")
    return sorted({queue_name(q, f"{field}[{i}]") for i, q in enumerate(values)})


MAX_LIMIT = 1_000_000


def queue_limits(limits: scheduler_pb2.QueueLimits) -> QueueLimitValues:
    """Checks SetQueueLimits' limits; None for a limit not set. Raises InvalidArgument naming the field."""
    found: list[Any] = []
    for most_field, rate_field in (("max_running", "rate"), ("max_running_per_key", "rate_per_key")):
        most = None
        if limits.HasField(most_field):
            most = getattr(limits, most_field)
            if not 1 <= most <= MAX_LIMIT:
                raise InvalidArgument(f"limits.{most_field}: must be between 1 and {MAX_LIMIT:,} (unset: no limit)")
        rate = None
        if limits.HasField(rate_field):
            given = getattr(limits, rate_field)
            if not 1 <= given.count <= MAX_LIMIT:
                raise InvalidArgument(f"limits.{rate_field}.count: must be between 1 and {MAX_LIMIT:,}")
            period = duration_ms(given.period, f"limits.{rate_field}.period", DAY_MS, "1 day")
            if period < 1000:
                raise InvalidArgument(f"limits.{rate_field}.period: must be at least 1 second")
            rate = (given.count, period)
        found += [most, rate]
    return QueueLimitValues(*found)


def limits_message(limits: QueueLimitValues) -> scheduler_pb2.QueueLimits:
    """The public form of a queue's limits."""
    out = scheduler_pb2.QueueLimits()
    for most, most_field, rate, rate_field in (
        (limits.max_running, "max_running", limits.rate, "rate"),
        (limits.max_running_per_key, "max_running_per_key", limits.rate_per_key, "rate_per_key"),
    ):
        if most is not None:
            setattr(out, most_field, most)
        if rate is not None:
            getattr(out, rate_field).count = rate[0]
            getattr(out, rate_field).period.FromMilliseconds(rate[1])
    return out


def schedule_page_token(name: str) -> str:
    """The opaque token of a position in the listing of schedules (the last name shown)."""
    return _token(f"s:{name}")


def schedule_page_position(token: str, field: str = "page_token") -> str:
    """The last schedule name a page token names. Raises InvalidArgument."""
    kind, _, name = _untoken(token).partition(":")
    if kind == "s" and SCHEDULE_RE.fullmatch(name):
        return name
    raise InvalidArgument(f"{field}: not a token this listing returned")


def check_later_job(req: scheduler_pb2.SubmitJobRequest, limits: Limits, field: str, when: str, key: str) -> None:
    """Checks a job submitted later on the caller's behalf (a schedule's tick, a batch's callback):
    it runs ``when`` it is submitted, so it sets no run_at or delay, and it gets ``key`` as its
    idempotency key; otherwise as a submit of it would. Raises InvalidArgument naming the field."""
    for name in ("run_at", "delay"):
        if req.HasField(name):
            raise InvalidArgument(f"{field}{name}: {when}; it cannot set {name}")
    if req.idempotency_key:
        raise InvalidArgument(f"{field}idempotency_key: it gets its own ({key})")
    prepare(req, limits, field)


def prepare(req: scheduler_pb2.SubmitJobRequest, limits: Limits, field: str = "") -> PreparedJob:
    """Validates one submit request. Raises InvalidArgument or ResourceExhausted naming the field."""
    # Every batched job passes here: the fields a request leaves unset (most of them) cost a test
    # each and nothing more.
    has = req.HasField
    spec = job_pb2.JobSpec(
        queue=queue_name(req.queue, f"{field}queue"),
        kind=kind_name(req.kind, f"{field}kind"),
        payload=req.payload,
        idempotency_key=req.idempotency_key,
    )
    has_args = has("args")
    if has_args:
        _check_value(req.args, f"{field}args")
        spec.args.CopyFrom(req.args)
    if req.priority:
        if not 0 <= req.priority <= MAX_PRIORITY:
            raise InvalidArgument(f"{field}priority: must be between 0 and {MAX_PRIORITY}")
        spec.priority = req.priority
    if not 0 <= req.max_attempts <= MAX_ATTEMPTS_LIMIT:
        raise InvalidArgument(f"{field}max_attempts: must be between 1 and {MAX_ATTEMPTS_LIMIT} (0 = default)")
    queue = limits.for_queue(spec.queue)
    spec.max_attempts = req.max_attempts or queue.max_attempts
    timeout_ms = queue.default_timeout_ms
    if has("timeout"):
        duration_ms(req.timeout, f"{field}timeout", MAX_TIMEOUT_MS, "7 days")
        if req.timeout.seconds or req.timeout.nanos:
            timeout_ms = max(1, req.timeout.ToMilliseconds())
            spec.timeout.CopyFrom(req.timeout)
    due_ms = _due(req, spec, field) if has("run_at") or has("delay") else 0
    backoff = _backoff(req, spec, queue, field) if has("retry") else queue.backoff
    idem = req.idempotency_key
    if len(idem) > MAX_IDEMPOTENCY_KEY:
        raise InvalidArgument(f"{field}idempotency_key: must be at most {MAX_IDEMPOTENCY_KEY} characters")
    group = _labels(req, spec, field) if req.labels else ""
    depends = _dependencies(req, spec, field) if req.depends_on else ()
    unique = req.unique_key
    if unique or req.concurrency_key:
        _keys(req, spec, field)
    spec_bytes = spec.SerializeToString(deterministic=True)
    if len(spec_bytes) > limits.max_payload_bytes:  # the spec holds the args and payload, and more
        size = len(req.payload) + (req.args.ByteSize() if has_args else 0)
        if size > limits.max_payload_bytes:
            raise ResourceExhausted(
                f"{field}payload: args and payload take {size} bytes, "
                f"over the limit of {limits.max_payload_bytes} bytes"
            )
    return PreparedJob(
        id=new_job_id(),
        spec=spec,
        spec_bytes=spec_bytes,
        timeout_ms=timeout_ms,
        idempotency_digest=idempotency_digest(spec.queue, idem) if idem else "",
        request_digest=hashlib.sha256(spec_bytes).hexdigest() if idem else "",
        field=field,
        due_ms=due_ms,
        backoff=backoff,
        retention_s=queue.retention_s,
        dead_retention_s=queue.dead_retention_s,
        unique_digest=idempotency_digest(spec.queue, unique) if unique else "",
        group=group,
        depends=depends,
    )


MAX_DEPENDENCIES = 100
MAX_CONCURRENCY_KEY = 128
CONCURRENCY_KEY_RE = re.compile(rf"[A-Za-z0-9_.:@/+=-]{{1,{MAX_CONCURRENCY_KEY}}}")


def _keys(req: scheduler_pb2.SubmitJobRequest, spec: job_pb2.JobSpec, field: str) -> None:
    """Checks and copies a job's unique and concurrency keys. Raises InvalidArgument."""
    if len(req.unique_key) > MAX_IDEMPOTENCY_KEY:
        raise InvalidArgument(f"{field}unique_key: must be at most {MAX_IDEMPOTENCY_KEY} characters")
    spec.unique_key = req.unique_key
    if req.concurrency_key and not CONCURRENCY_KEY_RE.fullmatch(req.concurrency_key):
        raise InvalidArgument(
            f"{field}concurrency_key: must be 1-{MAX_CONCURRENCY_KEY} characters from [A-Za-z0-9_.:@/+=-]"
        )
    spec.concurrency_key = req.concurrency_key


def _dependencies(req: scheduler_pb2.SubmitJobRequest, spec: job_pb2.JobSpec, field: str) -> tuple[str, ...]:
    """Checks and copies the ids of the jobs a job depends on. Raises InvalidArgument."""
    deps = tuple(req.depends_on)
    if len(deps) > MAX_DEPENDENCIES:
        raise InvalidArgument(f"{field}depends_on: at most {MAX_DEPENDENCIES} jobs, got {len(deps)}")
    for i, dep in enumerate(deps):
        job_id(dep, f"{field}depends_on[{i}]")
    if len(set(deps)) != len(deps):
        raise InvalidArgument(f"{field}depends_on: a job appears twice")
    spec.depends_on.extend(deps)
    return deps


def _labels(req: scheduler_pb2.SubmitJobRequest, spec: job_pb2.JobSpec, field: str) -> str:
    """Checks and copies the labels a job requires; returns its placement group ('' without labels).
    Raises InvalidArgument."""
    if not req.labels:
        return ""
    if len(req.labels) > MAX_JOB_LABELS:
        raise InvalidArgument(f"{field}labels: at most {MAX_JOB_LABELS} labels, got {len(req.labels)}")
    for name, value in req.labels.items():
        if not LABEL_NAME_RE.fullmatch(name):
            raise InvalidArgument(f"{field}labels: name {name!r} must be 1-63 characters from [A-Za-z0-9_.-]")
        if not LABEL_VALUE_RE.fullmatch(value):
            raise InvalidArgument(f"{field}labels: value of {name!r} must be 0-63 characters from [A-Za-z0-9_.-]")
        spec.labels[name] = value
    return placement_group(spec.kind, spec.labels)


def _due(req: scheduler_pb2.SubmitJobRequest, spec: job_pb2.JobSpec, field: str) -> int:
    """When the job may first run (ms since the epoch; 0: at once), from ``run_at`` or ``delay``,
    which go into ``spec`` as given. Raises InvalidArgument."""
    if req.HasField("run_at") and req.HasField("delay"):
        raise InvalidArgument(f"{field}run_at: give run_at or delay, not both")
    now = now_ms()
    if req.HasField("run_at"):
        t = req.run_at
        if t.seconds < 0 or not 0 <= t.nanos <= 999_999_999:
            raise InvalidArgument(f"{field}run_at: must be a time after 1970-01-01T00:00:00Z")
        at = t.seconds * 1000 + t.nanos // 1_000_000  # not ToMilliseconds: it raises past the year 9999
        if at > now + MAX_DELAY_MS:
            raise InvalidArgument(f"{field}run_at: must be at most 365 days ahead")
        spec.run_at.CopyFrom(t)
        return at if at > now else 0
    if req.HasField("delay"):
        delay = duration_ms(req.delay, f"{field}delay", MAX_DELAY_MS, "365 days")
        spec.delay.CopyFrom(req.delay)
        return now + delay if delay else 0
    return 0


def _backoff(req: scheduler_pb2.SubmitJobRequest, spec: job_pb2.JobSpec, limits: QueueDefaults, field: str) -> str:
    """The job's retry backoff as the scripts read it ("initial,max,multiplier", ms), from
    ``retry`` (copied into ``spec`` as given) and its queue's defaults. Raises InvalidArgument."""
    r = req.retry
    initial, most, mult = limits.retry_initial_backoff_ms, limits.retry_max_backoff_ms, limits.retry_multiplier
    if req.HasField("retry"):
        if r.HasField("initial_backoff"):
            initial = duration_ms(
                r.initial_backoff, f"{field}retry.initial_backoff", MAX_INITIAL_BACKOFF_MS, "24 hours"
            )
        if r.HasField("max_backoff"):
            most = duration_ms(r.max_backoff, f"{field}retry.max_backoff", MAX_BACKOFF_MS, "7 days")
        if r.multiplier != 0:
            if not 1 <= r.multiplier <= MAX_MULTIPLIER:  # NaN fails too
                raise InvalidArgument(
                    f"{field}retry.multiplier: must be between 1 and {MAX_MULTIPLIER:g} (0 = default)"
                )
            mult = r.multiplier
        if most < initial:
            raise InvalidArgument(f"{field}retry.max_backoff: must not be below initial_backoff ({initial} ms)")
        spec.retry.CopyFrom(r)
    return f"{initial},{max(most, initial)},{mult:g}"


def duration_ms(d: duration_pb2.Duration, field: str, most_ms: int, most_text: str) -> int:
    if d.seconds < 0 or d.nanos < 0:
        raise InvalidArgument(f"{field}: must not be negative")
    if d.nanos > 999_999_999:
        raise InvalidArgument(f"{field}: nanos must be below one second (999999999 at most)")
    if d.seconds > most_ms // 1000 or d.ToMilliseconds() > most_ms:
        raise InvalidArgument(f"{field}: must be at most {most_text}")
    return int(d.ToMilliseconds())


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
            fields_ = v.struct_value.fields
            stack += [fields_[k] for k in fields_]  # not .values(): a view iterated in Python
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
