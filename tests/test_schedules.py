"""Periodic schedules end to end: the API, bad input, cron in a time zone across daylight-saving
changes, exactly one job per tick with several gateways (one SIGKILLed), missed ticks after an
outage, and the overlap policy; against real gateways, real workers and a real Redis."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from redis.asyncio import Redis

from devtools.devstack import Stack
from jobgate.v1 import job_pb2, scheduler_pb2
from protocol.keys import Keys

from .helpers import Client, eventually, request, status_of

S = scheduler_pb2
SECOND = Duration(seconds=1)


def every(name: str, interval: Duration = SECOND, **fields: Any) -> scheduler_pb2.ScheduleSpec:
    job = fields.pop("job", request("echo", {"from": name}))
    return S.ScheduleSpec(name=name, interval=interval, job=job, **fields)


async def create(client: Client, spec: scheduler_pb2.ScheduleSpec) -> scheduler_pb2.Schedule:
    reply = await client.stub.CreateSchedule(S.CreateScheduleRequest(schedule=spec), timeout=5)
    return reply.schedule


async def get(client: Client, name: str) -> scheduler_pb2.Schedule:
    return (await client.stub.GetSchedule(S.GetScheduleRequest(name=name), timeout=5)).schedule


def ms(ts: Timestamp) -> int:
    return int(ts.ToMilliseconds())


def at(text: str) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(datetime.fromisoformat(text).astimezone(UTC))
    return t


async def scheduled_jobs(client: Client, redis: Redis, keys: Keys, name: str) -> dict[int, str]:
    """Every stored job the schedule submitted, by tick (from its idempotency key), checking that no
    tick has two."""
    by_tick: dict[int, str] = {}
    async for key in redis.scan_iter(match=f"{keys.prefix}job:*", count=1000):
        job_id = key.decode().rsplit(":", 1)[1]
        job = (await client.stub.GetJob(S.GetJobRequest(id=job_id), timeout=5)).job
        prefix = f"schedule:{name}:"
        if job.spec.idempotency_key.startswith(prefix):
            tick = int(job.spec.idempotency_key.removeprefix(prefix))
            assert tick not in by_tick, f"two jobs for tick {tick}: {by_tick[tick]} and {job_id}"
            by_tick[tick] = job_id
    return by_tick


async def test_a_schedule_submits_a_job_every_tick_and_can_be_paused_resumed_listed_and_deleted(
    client: Client, redis: Redis, keys: Keys
) -> None:
    created = await create(client, every("tick-tock"))
    assert created.spec.misfire_policy == S.MISFIRE_POLICY_RUN_ONCE
    assert created.spec.overlap_policy == S.OVERLAP_POLICY_ALLOW
    assert created.spec.misfire_grace.seconds == 60
    first = ms(created.next_fire_times[0])
    assert abs(first - (ms(created.created_at) + 1000)) <= 1 and len(created.next_fire_times) == 1

    async def ran(n: int) -> scheduler_pb2.Schedule | None:
        s = await get(client, "tick-tock")
        return s if len(s.recent_runs) >= n else None

    schedule = await eventually(lambda: ran(3), timeout=20, what="three runs")
    assert [ms(t) - first for t in schedule.next_fire_times][:1] == [len(schedule.recent_runs) * 1000]
    gaps = {ms(a) - ms(b) for a, b in itertools.pairwise(schedule.next_fire_times)}
    assert gaps == {-1000} and len(schedule.next_fire_times) == 5
    runs = list(schedule.recent_runs)[::-1]
    assert [ms(r.tick) for r in runs] == [first + 1000 * i for i in range(len(runs))]
    assert all(r.job_id and not r.skipped for r in runs)
    done = await client.wait_results([runs[0].job_id], timeout=20)
    assert done[runs[0].job_id].state == job_pb2.JOB_STATE_SUCCEEDED

    paused = (await client.stub.PauseSchedule(S.PauseScheduleRequest(name="tick-tock"), timeout=5)).schedule
    assert paused.paused and not paused.next_fire_times
    count = len((await get(client, "tick-tock")).recent_runs)
    await asyncio.sleep(2.5)
    assert len((await get(client, "tick-tock")).recent_runs) == count  # nothing while paused
    resumed = (await client.stub.ResumeSchedule(S.ResumeScheduleRequest(name="tick-tock"), timeout=5)).schedule
    assert not resumed.paused and ms(resumed.next_fire_times[0]) > int(time.time() * 1000)
    assert (ms(resumed.next_fire_times[0]) - first) % 1000 == 0  # still on the interval's ticks
    await eventually(lambda: ran(count + 1), timeout=20, what="a run after resuming")

    await create(client, every("another", Duration(seconds=3600)))
    page = await client.stub.ListSchedules(S.ListSchedulesRequest(page_size=1), timeout=5)
    assert [s.spec.name for s in page.schedules] == ["another"] and page.next_page_token
    rest = await client.stub.ListSchedules(S.ListSchedulesRequest(page_token=page.next_page_token), timeout=5)
    assert [s.spec.name for s in rest.schedules] == ["tick-tock"] and not rest.next_page_token

    await client.stub.DeleteSchedule(S.DeleteScheduleRequest(name="tick-tock"), timeout=5)
    code, _ = await status_of(client.stub.GetSchedule(S.GetScheduleRequest(name="tick-tock"), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND
    left = len(await scheduled_jobs(client, redis, keys, "tick-tock"))
    await asyncio.sleep(1.5)
    assert len(await scheduled_jobs(client, redis, keys, "tick-tock")) == left  # the jobs stay; no new ones
    assert not await redis.exists(keys.schedule("tick-tock"), keys.schedule_runs("tick-tock"))


async def test_cron_in_a_time_zone_ticks_at_local_times_across_daylight_saving_changes(client: Client) -> None:
    # 02:30 does not exist in New York on 14 March 2027 (clocks jump from 02:00 to 03:00): that day's
    # run comes at 03:00 EDT, the first minute after the gap
    spring = await create(
        client,
        S.ScheduleSpec(
            name="spring",
            cron="30 2 * * *",
            time_zone="America/New_York",
            start_at=at("2027-03-12T00:00:00-05:00"),
            job=request("echo"),
        ),
    )
    got = [(await get(client, "spring")).next_fire_times[i] for i in range(5)]
    assert [t.ToDatetime(tzinfo=UTC).isoformat() for t in got] == [
        "2027-03-12T07:30:00+00:00",  # 02:30 EST (UTC-5)
        "2027-03-13T07:30:00+00:00",
        "2027-03-14T07:00:00+00:00",  # 03:00 EDT (UTC-4): 02:30 was skipped by the clocks
        "2027-03-15T06:30:00+00:00",  # 02:30 EDT
        "2027-03-16T06:30:00+00:00",
    ]
    assert spring.spec.time_zone == "America/New_York"
    # 01:30 happens twice on 7 November 2027 (clocks go back from 02:00 EDT to 01:00 EST): it runs once
    await create(
        client,
        S.ScheduleSpec(
            name="autumn",
            cron="30 1 * * *",
            time_zone="America/New_York",
            start_at=at("2027-11-06T00:00:00-04:00"),
            job=request("echo"),
        ),
    )
    got = list((await get(client, "autumn")).next_fire_times)
    assert [t.ToDatetime(tzinfo=UTC).isoformat() for t in got[:3]] == [
        "2027-11-06T05:30:00+00:00",  # 01:30 EDT
        "2027-11-07T05:30:00+00:00",  # 01:30 EDT, the first of the two
        "2027-11-08T06:30:00+00:00",  # 01:30 EST
    ]
    # a macro, and an interval anchored at start_at
    daily = await create(client, S.ScheduleSpec(name="daily", cron="@daily", job=request("echo")))
    assert daily.next_fire_times[0].ToDatetime(tzinfo=UTC).time().isoformat() == "00:00:00"
    anchored = await create(
        client, every("anchored", Duration(seconds=90 * 60), start_at=at("2027-01-01T00:00:00+00:00"))
    )
    assert anchored.next_fire_times[0].ToDatetime(tzinfo=UTC).isoformat() == "2027-01-01T00:00:00+00:00"


BAD_SCHEDULES: list[tuple[dict[str, Any], str]] = [
    ({"name": "bad name"}, "schedule.name"),
    ({"name": "a:b"}, "schedule.name"),
    ({"interval": None}, "schedule.cron"),  # neither cron nor interval
    ({"cron": "* * * * *"}, "schedule.cron"),  # both
    ({"interval": None, "cron": "61 * * * *"}, "schedule.cron"),
    ({"interval": None, "cron": "0 0 30 2 *"}, "schedule.cron"),  # never fires
    ({"interval": None, "cron": "@sometimes"}, "schedule.cron"),
    ({"interval": None, "cron": "0 * * * *", "time_zone": "Mars/Olympus"}, "schedule.time_zone"),
    ({"interval": None, "cron": "0 * * * *", "time_zone": "../../etc/passwd"}, "schedule.time_zone"),
    ({"time_zone": "UTC"}, "schedule.time_zone"),  # with an interval
    # longer than any IANA name (a name the file system refuses to look up, too)
    ({"interval": None, "cron": "0 * * * *", "time_zone": "x" * 5000}, "schedule.time_zone"),
    # quoted in the message, which is cut short: a status message travels in a header of at most 16 KiB
    ({"interval": None, "cron": "\0" * 20_000}, "schedule.cron"),
    ({"interval": Duration()}, "schedule.interval"),
    ({"interval": Duration(nanos=500_000_000)}, "schedule.interval"),
    ({"interval": Duration(seconds=-5)}, "schedule.interval"),
    ({"interval": Duration(seconds=400 * 86400)}, "schedule.interval"),
    ({"job": None}, "schedule.job"),
    ({"job": request("")}, "schedule.job.kind"),
    ({"job": request("echo", queue="bad queue")}, "schedule.job.queue"),
    ({"job": request("echo", delay=Duration(seconds=1))}, "schedule.job.delay"),
    ({"job": request("echo", run_at=Timestamp(seconds=2_000_000_000))}, "schedule.job.run_at"),
    ({"job": request("echo", idempotency_key="k")}, "schedule.job.idempotency_key"),
    ({"misfire_grace": Duration(nanos=1000)}, "schedule.misfire_grace"),
    ({"misfire_grace": Duration(seconds=2 * 86400)}, "schedule.misfire_grace"),
    ({"misfire_policy": 7}, "schedule.misfire_policy"),
    ({"overlap_policy": 9}, "schedule.overlap_policy"),
    ({"start_at": Timestamp(seconds=-1)}, "schedule.start_at"),
    ({"start_at": Timestamp(seconds=int(time.time()) + 400 * 86400)}, "schedule.start_at"),
]


async def test_a_bad_schedule_is_refused_naming_the_field_and_stores_nothing(
    client: Client, redis: Redis, keys: Keys
) -> None:
    for fields, field in BAD_SCHEDULES:
        spec = every("bad-one")
        for name, value in fields.items():
            if value is None:
                spec.ClearField(name)
            elif isinstance(value, str | int):
                setattr(spec, name, value)
            else:
                getattr(spec, name).CopyFrom(value)
        reply = client.stub.CreateSchedule(S.CreateScheduleRequest(schedule=spec), timeout=5)
        code, details = await status_of(reply)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field + ":"), (fields, details[:200])
        assert len(details) <= 1100, (fields, len(details))
    assert not await redis.exists(keys.schedules(), keys.schedules_due())


async def test_schedule_names_are_unique_and_unknown_names_are_not_found(client: Client) -> None:
    await create(client, every("once", Duration(seconds=3600)))
    code, details = await status_of(client.stub.CreateSchedule(S.CreateScheduleRequest(schedule=every("once"))))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "schedule.name" in details
    assert (await get(client, "once")).spec.interval.seconds == 3600  # the first one stands
    for call, req in (
        (client.stub.GetSchedule, S.GetScheduleRequest(name="nope")),
        (client.stub.PauseSchedule, S.PauseScheduleRequest(name="nope")),
        (client.stub.ResumeSchedule, S.ResumeScheduleRequest(name="nope")),
        (client.stub.DeleteSchedule, S.DeleteScheduleRequest(name="nope")),
        (client.stub.TriggerSchedule, S.TriggerScheduleRequest(name="nope")),
    ):
        code, details = await status_of(call(req, timeout=5))
        assert code == grpc.StatusCode.NOT_FOUND and details.startswith("name:"), details
    code, _ = await status_of(client.stub.GetSchedule(S.GetScheduleRequest(name="no good"), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = await status_of(client.stub.ListSchedules(S.ListSchedulesRequest(page_token="x"), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_trigger_runs_a_paused_schedules_job_now_once_per_request_id_and_leaves_its_ticks(
    client: Client, redis: Redis, keys: Keys
) -> None:
    await create(client, every("hourly", Duration(seconds=3600), job=request("echo", {"n": 1})))
    await client.stub.PauseSchedule(S.PauseScheduleRequest(name="hourly"), timeout=5)
    before = await get(client, "hourly")
    asked = int(time.time() * 1000)
    first = await client.stub.TriggerSchedule(S.TriggerScheduleRequest(name="hourly", request_id="r-1"), timeout=5)
    assert first.job.spec.kind == "echo" and first.job.spec.args.struct_value.fields["n"].number_value == 1
    assert first.job.spec.idempotency_key == "schedule:hourly:manual:r-1"
    again = await client.stub.TriggerSchedule(S.TriggerScheduleRequest(name="hourly", request_id="r-1"), timeout=5)
    assert again.job.id == first.job.id  # a retry: the same job, recorded once
    other = await client.stub.TriggerSchedule(S.TriggerScheduleRequest(name="hourly"), timeout=5)
    assert other.job.id != first.job.id
    done = await client.wait_results([first.job.id, other.job.id], timeout=20)
    assert {e.state for e in done.values()} == {job_pb2.JOB_STATE_SUCCEEDED}

    after = await get(client, "hourly")
    assert after.paused and not after.next_fire_times  # still paused: a trigger is not a resume
    runs = list(after.recent_runs)
    assert [(r.job_id, r.manual, r.skipped) for r in runs] == [(other.job.id, True, ""), (first.job.id, True, "")]
    assert asked <= ms(runs[1].tick) <= ms(runs[1].time) <= int(time.time() * 1000)
    assert await redis.hget(keys.schedule("hourly"), "last_job") == other.job.id.encode()
    await client.stub.ResumeSchedule(S.ResumeScheduleRequest(name="hourly"), timeout=5)
    resumed = await get(client, "hourly")
    assert (ms(resumed.next_fire_times[0]) - ms(before.created_at)) % 3_600_000 == 0  # its own ticks

    for request_id in ("bad id", "x" * 65, "ü"):
        reply = client.stub.TriggerSchedule(S.TriggerScheduleRequest(name="hourly", request_id=request_id), timeout=5)
        code, details = await status_of(reply)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("request_id:"), details
    assert len((await get(client, "hourly")).recent_runs) == 2  # refusals record nothing


async def test_three_gateways_submit_exactly_one_job_per_tick_while_one_is_killed(
    stack: Stack, client_for: Callable[[str], Client], redis: Redis, keys: Keys
) -> None:
    gateways = [stack.start_gateway() for _ in range(3)]
    stack.start_worker()
    client = client_for(gateways[2][1])
    created = await create(client, every("shared"))
    first = ms(created.next_fire_times[0])
    await asyncio.sleep(3.3)
    gateways[0][0].signal(signal.SIGKILL)  # whatever it was doing, on whichever tick
    await asyncio.sleep(3.3)
    await client.stub.PauseSchedule(S.PauseScheduleRequest(name="shared"), timeout=5)
    await asyncio.sleep(0.5)  # a tick a gateway was submitting when the pause came is recorded or dropped
    runs = list((await get(client, "shared")).recent_runs)[::-1]
    ticks = [ms(r.tick) for r in runs]
    assert len(ticks) >= 5 and ticks == [first + 1000 * i for i in range(len(ticks))], ticks  # none missed
    assert all(r.job_id and not r.skipped for r in runs)
    jobs = await scheduled_jobs(client, redis, keys, "shared")
    assert {t: jobs[t] for t in ticks} == {ms(r.tick): r.job_id for r in runs}  # one job per tick, as recorded
    assert set(jobs) - set(ticks) <= {first + 1000 * len(ticks)}  # at most the tick in flight at the pause
    outcomes = await client.wait_results([r.job_id for r in runs], timeout=30)
    assert {e.state for e in outcomes.values()} == {job_pb2.JOB_STATE_SUCCEEDED}


@pytest.mark.parametrize("policy", [S.MISFIRE_POLICY_RUN_ONCE, S.MISFIRE_POLICY_SKIP])
async def test_ticks_missed_while_no_gateway_ran_are_run_once_or_skipped(
    stack: Stack, client_for: Callable[[str], Client], policy: int
) -> None:
    gateway, address = stack.start_gateway()
    stack.start_worker()
    client = client_for(address)
    created = await create(client, every("catch-up", misfire_policy=policy, misfire_grace=SECOND))
    first = ms(created.next_fire_times[0])
    await eventually(lambda: _runs(client, "catch-up", 1), timeout=20, what="a first run")
    gateway.terminate(timeout_s=15)
    await asyncio.sleep(4)  # about four ticks go by with no gateway
    _, address = stack.start_gateway()
    client = client_for(address)
    schedule = await eventually(lambda: _runs(client, "catch-up", 3), timeout=20, what="runs after the outage")
    runs = list(schedule.recent_runs)[::-1]
    late = [r for r in runs if ms(r.time) - ms(r.tick) > 1000]
    assert len(late) == 1, runs  # the missed ticks came as one run, handled once
    missed = late[0]
    if policy == S.MISFIRE_POLICY_RUN_ONCE:
        assert missed.job_id and not missed.skipped
    else:
        assert missed.skipped == "missed" and not missed.job_id
    after = runs[runs.index(missed) + 1 :]
    assert after and ms(after[0].tick) > ms(missed.time)  # then on from the next tick to come
    assert all((ms(r.tick) - first) % 1000 == 0 for r in runs)


async def _runs(client: Client, name: str, n: int) -> scheduler_pb2.Schedule | None:
    s = await get(client, name)
    return s if len(s.recent_runs) >= n else None


async def test_overlap_skip_submits_nothing_while_the_previous_job_is_unfinished(
    client: Client, redis: Redis, keys: Keys
) -> None:
    spec = every("one-at-a-time", job=request("sleep", {"seconds": 2.2}), overlap_policy=S.OVERLAP_POLICY_SKIP)
    await create(client, spec)
    schedule = await eventually(lambda: _runs(client, "one-at-a-time", 7), timeout=30, what="seven runs")
    await client.stub.PauseSchedule(S.PauseScheduleRequest(name="one-at-a-time"), timeout=5)
    runs = list(schedule.recent_runs)[::-1]
    assert {r.skipped for r in runs} == {"", "overlap"}
    submitted = [r.job_id for r in runs if r.job_id]
    done = await client.wait_results(submitted, timeout=30)
    jobs = [(await client.stub.GetJob(S.GetJobRequest(id=j), timeout=5)).job for j in submitted]
    spans = sorted((ms(j.started_at), ms(j.finished_at)) for j in jobs)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans  # never two at once
    assert {e.state for e in done.values()} == {job_pb2.JOB_STATE_SUCCEEDED}
