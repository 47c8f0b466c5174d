"""Periodic schedules: when they tick (cron expressions in a time zone, or fixed intervals), how a
request becomes a stored schedule, and the runner every gateway uses to submit each tick's job.

Every gateway runs :meth:`ScheduleRunner.fire_due` on its placement tick. A tick submits its job with
the idempotency key ``schedule:<name>:<tick ms>``, then advances the schedule with a compare and set
on its next tick (the periodic script): gateways racing on one tick submit one job between them,
and one of them records the run; a gateway killed between the two steps leaves the tick due, and
the next gateway's submit answers with the job already stored.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from jobgate.v1 import scheduler_pb2
from protocol.codec import TERMINAL, timestamp
from protocol.connection import now_ms
from protocol.errors import InvalidArgument, JobgateError, Unavailable
from protocol.gateway_calls import GatewayCalls
from protocol.keys import SCHEDULE_RE
from protocol.schedule_calls import ScheduleCalls, StoredSchedule

from .metrics import GatewayMetrics
from .scheduler import Scheduler
from .validation import DAY_MS, MAX_DELAY_MS, Limits, check_later_job, duration_ms, prepare

log = logging.getLogger(__name__)

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
MIN_INTERVAL_MS = 1000
DEFAULT_GRACE_MS = 60_000
NEXT_SHOWN = 5  # next ticks GetSchedule shows
DUE_PER_PASS = 100  # schedules handled per pass (more wait for the next)
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

RUN_ONCE = scheduler_pb2.MISFIRE_POLICY_RUN_ONCE
SKIP_MISSED = scheduler_pb2.MISFIRE_POLICY_SKIP
ALLOW = scheduler_pb2.OVERLAP_POLICY_ALLOW
SKIP_OVERLAP = scheduler_pb2.OVERLAP_POLICY_SKIP


@dataclass(frozen=True, slots=True)
class Timing:
    """When a schedule ticks: on ``cron`` in ``zone``, or every ``interval_ms`` from ``anchor_ms``."""

    cron: str = ""
    zone: ZoneInfo | None = None
    interval_ms: int = 0
    anchor_ms: int = 0

    def after(self, t_ms: int) -> int:
        """The first tick strictly after ``t_ms`` (ms since the epoch)."""
        if self.interval_ms:
            if t_ms < self.anchor_ms:
                return self.anchor_ms
            return self.anchor_ms + ((t_ms - self.anchor_ms) // self.interval_ms + 1) * self.interval_ms
        start = datetime.fromtimestamp(t_ms / 1000, self.zone or UTC)
        return int(next(CronSim(self.cron, start)).timestamp() * 1000)

    def ticks(self, first_ms: int, n: int) -> list[int]:
        """``first_ms`` and the ``n - 1`` ticks after it."""
        out = [first_ms]
        while len(out) < n:
            out.append(self.after(out[-1]))
        return out


def timing_of(spec: scheduler_pb2.ScheduleSpec, created_ms: int) -> Timing:
    """The timing of a stored (validated) schedule."""
    if spec.cron:
        return Timing(cron=MACROS.get(spec.cron, spec.cron), zone=ZoneInfo(spec.time_zone or "UTC"))
    anchor = spec.start_at.ToMilliseconds() if spec.HasField("start_at") else created_ms
    return Timing(interval_ms=spec.interval.ToMilliseconds(), anchor_ms=anchor)


def schedule_name(value: str, field: str = "name") -> str:
    """Checks a schedule name. Raises InvalidArgument."""
    if not SCHEDULE_RE.fullmatch(value):
        raise InvalidArgument(f"{field}: must be 1-128 characters from [A-Za-z0-9_.-]")
    return value


def prepare_schedule(
    req: scheduler_pb2.ScheduleSpec, limits: Limits, now: int
) -> tuple[scheduler_pb2.ScheduleSpec, int]:
    """Validates a CreateSchedule request's schedule; returns it normalised (defaults applied) and
    its first tick. Raises InvalidArgument naming the field (``schedule.<field>``)."""
    spec = scheduler_pb2.ScheduleSpec(name=schedule_name(req.name, F + "name"))
    _when(req, spec, now)
    _template(req, spec, limits)
    _policies(req, spec)
    start = now
    if req.HasField("start_at"):
        t = req.start_at
        if t.seconds < 0 or not 0 <= t.nanos <= 999_999_999:
            raise InvalidArgument(f"{F}start_at: must be a time after 1970-01-01T00:00:00Z")
        start = t.seconds * 1000 + t.nanos // 1_000_000
        if start > now + MAX_DELAY_MS:
            raise InvalidArgument(f"{F}start_at: must be at most 365 days ahead")
        spec.start_at.CopyFrom(t)
    timing = timing_of(spec, now)
    if spec.cron:
        return spec, timing.after(max(now, start - 1))
    return spec, timing.after(now if start <= now else start - 1)


F = "schedule."  # how CreateSchedule's error messages name the spec's fields


def _when(req: scheduler_pb2.ScheduleSpec, spec: scheduler_pb2.ScheduleSpec, now: int) -> None:
    """Checks and copies cron, time_zone and interval."""
    if bool(req.cron) == req.HasField("interval"):
        raise InvalidArgument(f"{F}cron: give a cron expression or an interval (one of them)")
    if req.cron:
        spec.cron = req.cron.strip()
        spec.time_zone = req.time_zone or "UTC"
        zone = _zone(spec.time_zone, F + "time_zone")
        try:
            next(CronSim(MACROS.get(spec.cron, spec.cron), datetime.fromtimestamp(now / 1000, zone)))
        except (CronSimError, StopIteration) as exc:
            raise InvalidArgument(f"{F}cron: {spec.cron!r} is not a cron expression ({exc or 'never fires'})") from None
        return
    if req.time_zone:
        raise InvalidArgument(f"{F}time_zone: only with cron (an interval does not depend on the time zone)")
    if duration_ms(req.interval, F + "interval", MAX_DELAY_MS, "365 days") < MIN_INTERVAL_MS:
        raise InvalidArgument(f"{F}interval: must be at least 1 second")
    spec.interval.CopyFrom(req.interval)


def _template(req: scheduler_pb2.ScheduleSpec, spec: scheduler_pb2.ScheduleSpec, limits: Limits) -> None:
    """Checks and copies the job template."""
    if not req.HasField("job"):
        raise InvalidArgument(f"{F}job: is required (the job each tick submits)")
    check_later_job(req.job, limits, F + "job.", "a schedule's job runs at its tick", "schedule:<name>:<tick ms>")
    spec.job.CopyFrom(req.job)


def _policies(req: scheduler_pb2.ScheduleSpec, spec: scheduler_pb2.ScheduleSpec) -> None:
    """Checks the policies and the misfire grace, and applies their defaults."""
    if req.misfire_policy not in (scheduler_pb2.MISFIRE_POLICY_UNSPECIFIED, RUN_ONCE, SKIP_MISSED):
        raise InvalidArgument(f"{F}misfire_policy: unknown value {req.misfire_policy}")
    spec.misfire_policy = req.misfire_policy or RUN_ONCE
    if req.overlap_policy not in (scheduler_pb2.OVERLAP_POLICY_UNSPECIFIED, ALLOW, SKIP_OVERLAP):
        raise InvalidArgument(f"{F}overlap_policy: unknown value {req.overlap_policy}")
    spec.overlap_policy = req.overlap_policy or ALLOW
    grace = DEFAULT_GRACE_MS
    if req.HasField("misfire_grace"):
        grace = duration_ms(req.misfire_grace, F + "misfire_grace", DAY_MS, "1 day")
        if grace < 1000:
            raise InvalidArgument(f"{F}misfire_grace: must be at least 1 second")
    spec.misfire_grace.FromMilliseconds(grace)


ZONE_NAME_MAX = 64  # the longest IANA time zone name has 32 characters


def _zone(name: str, field: str) -> ZoneInfo:
    if len(name) > ZONE_NAME_MAX:
        raise InvalidArgument(
            f"{field}: at most {ZONE_NAME_MAX} characters (an IANA name such as Europe/Paris), got {len(name)}"
        )
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a name the file system refuses
        raise InvalidArgument(f"{field}: unknown time zone {name!r} (an IANA name such as Europe/Paris)") from None


def trigger_request(spec: scheduler_pb2.ScheduleSpec, request_id: str) -> scheduler_pb2.SubmitJobRequest:
    """The job a TriggerSchedule call submits: the schedule's template with the idempotency key
    ``schedule:<name>:manual:<request_id>`` (a fresh id when none is given). Raises InvalidArgument."""
    if request_id and not REQUEST_ID_RE.fullmatch(request_id):
        raise InvalidArgument("request_id: must be 1-64 characters from [A-Za-z0-9_.:-]")
    req = scheduler_pb2.SubmitJobRequest()
    req.CopyFrom(spec.job)
    req.idempotency_key = f"schedule:{spec.name}:manual:{request_id or uuid.uuid4().hex}"
    return req


def schedule_message(stored: StoredSchedule, shown: int) -> scheduler_pb2.Schedule:
    """The public form of a stored schedule, with up to ``shown`` next ticks."""
    spec = scheduler_pb2.ScheduleSpec.FromString(stored.spec)
    out = scheduler_pb2.Schedule(spec=spec, paused=stored.paused, created_at=timestamp(stored.created_ms))
    if not stored.paused:
        for t in timing_of(spec, stored.created_ms).ticks(stored.next_ms, shown):
            out.next_fire_times.append(timestamp(t))
    out.recent_runs.extend(scheduler_pb2.ScheduleRun.FromString(r) for r in stored.runs)
    return out


class ScheduleRunner:
    """Submits the job of every schedule tick that is due; one per gateway (they may race: see the
    module's docstring)."""

    def __init__(
        self,
        calls: ScheduleCalls,
        store: GatewayCalls,
        limits: Limits,
        scheduler: Scheduler,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.calls = calls
        self.store = store
        self.limits = limits
        self.scheduler = scheduler
        self.metrics = metrics or GatewayMetrics()

    async def fire_due(self) -> int:
        """Handles the ticks due now, one per schedule (a schedule whose next tick is due too is
        handled on the next pass); returns how many this gateway recorded."""
        now = now_ms()
        done = 0
        for name, tick in await self.calls.due(now, DUE_PER_PASS):
            done += await self._fire(name, tick, now)
        return done

    async def _fire(self, name: str, tick: int, now: int) -> int:
        stored = await self.calls.get(name)
        if stored is None or stored.paused or stored.next_ms != tick:
            return 0  # deleted, paused or advanced meanwhile
        spec = scheduler_pb2.ScheduleSpec.FromString(stored.spec)
        upcoming = timing_of(spec, stored.created_ms).after(max(now, tick))
        key = f"schedule:{name}:{tick}"
        queue = spec.job.queue or "default"
        job_id, skipped = "", ""
        late = now - tick > spec.misfire_grace.ToMilliseconds()
        if late and spec.misfire_policy == SKIP_MISSED:
            skipped = "missed"
        elif spec.overlap_policy == SKIP_OVERLAP and await self._unfinished(stored.last_job):
            skipped = "overlap"
        if skipped:  # unless a gateway submitted this tick's job and stopped before recording it
            job_id = await self.store.idempotent_job(queue, key)
            skipped = "" if job_id else skipped
        else:
            job_id, skipped = await self._submit(name, spec, key)
        run = scheduler_pb2.ScheduleRun(tick=timestamp(tick), job_id=job_id, skipped=skipped, time=timestamp(now))
        if not await self.calls.advance(name, tick, upcoming, job_id, run.SerializeToString()):
            return 0  # another gateway recorded this tick
        outcome = "submitted" if job_id else skipped.split(":")[0]
        self.metrics.schedule_ticks.labels(outcome).inc()
        if skipped:
            log.info("schedule %s: tick %d skipped (%s)", name, tick, skipped)
        return 1

    async def _unfinished(self, job_id: str) -> bool:
        if not job_id:
            return False
        [fields] = await self.store.get_fields([job_id])
        return bool(fields) and int(fields.get(b"state", 0)) not in TERMINAL

    async def _submit(self, name: str, spec: scheduler_pb2.ScheduleSpec, key: str) -> tuple[str, str]:
        """Submits the tick's job; returns its id, or '' and why it could not be (a refusal that
        trying again would not change, e.g. a queue over max_queues)."""
        req = scheduler_pb2.SubmitJobRequest()
        req.CopyFrom(spec.job)
        req.idempotency_key = key
        try:
            jobs, placed = await self.store.submit([prepare(req, self.limits, "job.")])
        except Unavailable:
            raise
        except JobgateError as exc:
            log.warning("schedule %s: its job was refused: %s", name, exc.message)
            return "", f"failed: {exc.message}"
        self.scheduler.record(placed)
        return jobs[0].id, ""
