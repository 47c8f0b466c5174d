"""A checker for load under faults: it follows every acknowledged job to its one outcome.

:class:`Cluster` starts gateways and workers of a :class:`~devtools.devstack.Stack`, each serving its
Prometheus metrics. :class:`Checker` submits jobs (each tagged in its args, so a job found later
can be traced to the request that made it), follows them with ``WatchResults`` streams (one
unfiltered stream per gateway, and ``job_ids`` streams for every acknowledged batch) and ``RunJob``
streams, and in the end confirms through a live gateway that every acknowledged job is terminal.
:meth:`Checker.verify` counts what must be zero: lost jobs, double or conflicting outcomes,
outcomes of jobs never submitted, jobs a worker recorded twice. :meth:`Checker.check_leaks`
compares memory, asyncio tasks and Redis subscriptions with a baseline taken after warm-up.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format
from redis.asyncio import Redis

from devtools.devstack import Service, Stack
from devtools.servers import free_port
from jobgate.v1 import job_pb2, scheduler_pb2, scheduler_pb2_grpc
from protocol.keys import Keys

from .processes import metrics_env, scrape, totals

TERMINAL = frozenset({job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED})
MAX_IDS = 1000  # the gateway's default max_watch_ids
STARTED = re.compile(r"job_id=([0-9a-f]{32}) kind=\S+ attempt=(\d+) started")
FINISHED = re.compile(r"job_id=([0-9a-f]{32}) finished (JOB_STATE_[A-Z]+)")
MB = 1024 * 1024


@dataclass
class Node:
    """A gateway or worker process with its metrics port."""

    service: Service
    metrics_port: int
    address: str = ""  # gateways only

    @property
    def name(self) -> str:
        return self.service.name

    @property
    def worker_id(self) -> str:
        return self.service.worker_id

    def alive(self) -> bool:
        return self.service.alive()

    async def metrics(self) -> dict[str, float]:
        return totals(await asyncio.to_thread(scrape, self.metrics_port))


class Cluster:
    """Gateways and workers of one stack, each serving metrics on a port of its own."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.gateways: list[Node] = []
        self.workers: list[Node] = []

    def gateway(self, *, env: Mapping[str, str] | None = None) -> Node:
        port = free_port()
        svc, address = self.stack.start_gateway(env={**metrics_env(port), **(env or {})})
        node = Node(svc, port, address)
        self.gateways.append(node)
        return node

    def worker(self, *args: str, worker_id: str | None = None, env: Mapping[str, str] | None = None) -> Node:
        port = free_port()
        svc = self.stack.start_worker(*args, worker_id=worker_id, env={**metrics_env(port), **(env or {})})
        node = Node(svc, port)
        self.workers.append(node)
        return node

    def live(self) -> list[Node]:
        return [n for n in [*self.gateways, *self.workers] if n.alive()]


@asynccontextmanager
async def checking(stack: Stack, admin: Redis, *, failed: Callable[[], bool]) -> AsyncIterator[Checker]:
    """A checker on ``stack``; afterwards its streams are closed, the stack's logs printed when
    ``failed()``, the stack stopped and ``admin`` closed."""
    c = Checker(Cluster(stack), admin)
    try:
        yield c
    finally:
        await c.close()
        if failed():
            print(stack.logs())
        stack.stop()
        await admin.aclose()


@dataclass
class Stream:
    """What one stream delivered: terminal outcomes per job (serialized events), and how it ended."""

    name: str
    kind: str  # "all" (unfiltered WatchResults), "ids" (WatchResults with job_ids), "run" (RunJob)
    asked: set[str] = field(default_factory=set)
    outcomes: dict[str, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    states: list[int] = field(default_factory=list)  # RunJob only: every state in order
    error: grpc.StatusCode | None = None
    detail: str = ""  # the error's message
    ended: bool = False
    must_be_complete: bool = False  # "all" only: open for the whole load, nothing may be missing
    before: frozenset[str] = frozenset()  # "all" only: jobs acknowledged before it opened

    def record(self, event: job_pb2.JobEvent) -> None:
        if event.state in TERMINAL:
            self.outcomes[event.job_id].append(event.SerializeToString(deterministic=True))


@dataclass
class Report:
    """What the checker counted; every list must be empty."""

    acked: int
    lost: list[str]
    not_terminal: list[str]
    doubles: list[str]
    conflicting: list[str]
    strays: list[str]
    never_submitted: list[str]
    worker_doubles: list[str]
    incomplete_streams: list[str]
    outcomes: dict[str, job_pb2.JobEvent]
    confirm_errors: list[str] = field(default_factory=list)

    def problems(self) -> dict[str, list[str]]:
        checks = {
            "lost (acknowledged, no outcome received)": self.lost,
            "not terminal (or not confirmed) after the wait": self.not_terminal,
            "reported terminal twice on one stream": self.doubles,
            "different outcomes for one job": self.conflicting,
            "outcomes on a stream that did not ask for the job": self.strays,
            "outcomes for jobs never submitted": self.never_submitted,
            "recorded twice by workers (finished lines)": self.worker_doubles,
            "unfiltered streams missing outcomes": self.incomplete_streams,
            "confirming streams that ended with an error": self.confirm_errors,
        }
        return {k: v for k, v in checks.items() if v}

    def assert_ok(self) -> None:
        problems = self.problems()
        detail = "; ".join(f"{k}: {len(v)} e.g. {v[:5]}" for k, v in problems.items())
        assert not problems, f"of {self.acked} acknowledged jobs: {detail}"


@dataclass(frozen=True)
class Usage:
    rss: float
    tasks: float


class Checker:
    """Submits and follows jobs on a :class:`Cluster`, then checks every guarantee (see module doc)."""

    def __init__(self, cluster: Cluster, redis: Redis) -> None:
        self.cluster = cluster
        self.redis = redis
        env = cluster.stack.env
        self.keys = Keys(cluster.stack.namespace, int(env.get("JOBGATE_REDIS_SHARDS", "1")))
        # The queues the stack's workers serve (JOBGATE_QUEUES): jobs go to each in turn.
        self.queues = [q for q in env.get("JOBGATE_QUEUES", "").split(",") if q]
        self._turn = itertools.count()
        self.acked: dict[str, str] = {}  # job id -> tag
        self.failed: dict[str, grpc.StatusCode] = {}  # tag -> status of a submit that was not acknowledged
        self.streams: list[Stream] = []
        self.unwatched: list[str] = []  # acknowledged, no job_ids stream yet
        self.calls: Counter[str] = Counter()  # "<rpc> <status>"
        self.baseline: dict[str, Usage] = {}
        self.unacked_outcomes: dict[str, str] = {}  # job id -> tag: stored by a submit that failed
        self._tasks: dict[int, asyncio.Task[None]] = {}  # id(stream) -> its reader
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tags = itertools.count()

    # --- clients --------------------------------------------------------------------------
    def stub(self, gw: Node) -> scheduler_pb2_grpc.SchedulerServiceStub:
        if gw.address not in self._channels:
            self._channels[gw.address] = grpc.aio.insecure_channel(gw.address)
        return scheduler_pb2_grpc.SchedulerServiceStub(self._channels[gw.address])

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        for channel in self._channels.values():
            await channel.close()

    def job(
        self, kind: str = "echo", args: Mapping[str, Any] | None = None, **fields: Any
    ) -> scheduler_pb2.SubmitJobRequest:
        """A submit request whose args carry a unique ``tag`` (on the stack's queues in turn)."""
        if self.queues and "queue" not in fields:
            fields["queue"] = self.queues[next(self._turn) % len(self.queues)]
        req = scheduler_pb2.SubmitJobRequest(kind=kind, **fields)
        json_format.ParseDict({**(args or {}), "tag": f"t{next(self._tags)}"}, req.args)
        return req

    @staticmethod
    def tag(req: scheduler_pb2.SubmitJobRequest | job_pb2.JobSpec) -> str:
        return str(req.args.struct_value.fields["tag"].string_value)

    # --- submitting -----------------------------------------------------------------------
    async def submit(
        self, gw: Node, reqs: list[scheduler_pb2.SubmitJobRequest], timeout: float = 10, watch: bool = True
    ) -> list[str] | grpc.StatusCode:
        """SubmitJobs (SubmitJob for one request); records the acknowledged ids or the failure, and
        opens a ``job_ids`` stream on ``gw`` for them unless ``watch`` is False."""
        rpc = "SubmitJob" if len(reqs) == 1 else "SubmitJobs"
        try:
            if len(reqs) == 1:
                jobs = [(await self.stub(gw).SubmitJob(reqs[0], timeout=timeout)).job]
            else:
                jobs = list(
                    (await self.stub(gw).SubmitJobs(scheduler_pb2.SubmitJobsRequest(jobs=reqs), timeout=timeout)).jobs
                )
        except grpc.aio.AioRpcError as exc:
            self.calls[f"{rpc} {exc.code().name}"] += 1
            for r in reqs:
                self.failed[self.tag(r)] = exc.code()
            return exc.code()
        self.calls[f"{rpc} OK"] += 1
        ids = []
        for r, j in zip(reqs, jobs, strict=True):
            assert self.tag(j.spec) == self.tag(r), "a reply in request order"
            self.acked[j.id] = self.tag(r)
            ids.append(j.id)
        self.unwatched += ids
        if watch:
            self.follow(gw)
        return ids

    # --- streams --------------------------------------------------------------------------
    def _start(self, stream: Stream, call: Any) -> Stream:
        self.streams.append(stream)
        self._tasks[id(stream)] = asyncio.create_task(self._read(stream, call))
        return stream

    async def _read(self, stream: Stream, call: Any) -> None:
        try:
            async for resp in call:
                event = resp.event
                if stream.kind == "run":
                    if not stream.asked:
                        stream.asked.add(event.job_id)
                        self.acked[event.job_id] = "run"
                    stream.states.append(event.state)
                stream.record(event)
        except grpc.aio.AioRpcError as exc:
            stream.error = exc.code()
            stream.detail = exc.details() or ""
        except asyncio.CancelledError:
            stream.error = grpc.StatusCode.CANCELLED
            call.cancel()
            raise
        finally:
            stream.ended = True

    def watch_all(self, gw: Node, *, complete: bool = True, channel: grpc.aio.Channel | None = None) -> Stream:
        """An unfiltered WatchResults on ``gw``. ``complete``: it must see every acknowledged job."""
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel) if channel else self.stub(gw)
        call = stub.WatchResults(scheduler_pb2.WatchResultsRequest(), timeout=600)
        stream = Stream(f"all@{gw.name}", "all", must_be_complete=complete, before=frozenset(self.acked))
        return self._start(stream, call)

    def follow(
        self,
        gw: Node,
        ids: Iterable[str] | None = None,
        name: str = "ids",
        *,
        chunk: int = MAX_IDS,
        channel: grpc.aio.Channel | None = None,
    ) -> list[Stream]:
        """WatchResults with job_ids on ``gw`` (``chunk`` ids per stream) for ``ids``, default every
        acknowledged job without a stream yet."""
        if ids is None:
            ids, self.unwatched = self.unwatched, []
        ids = list(ids)
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel) if channel else self.stub(gw)
        out = []
        for i in range(0, len(ids), chunk):
            part = ids[i : i + chunk]
            call = stub.WatchResults(scheduler_pb2.WatchResultsRequest(job_ids=part), timeout=600)
            out.append(self._start(Stream(f"{name}@{gw.name}", "ids", asked=set(part)), call))
        return out

    def run_job(self, gw: Node, req: scheduler_pb2.SubmitJobRequest, channel: grpc.aio.Channel | None = None) -> Stream:
        """A RunJob stream: the job counts as acknowledged once its first event arrives."""
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel) if channel else self.stub(gw)
        self.failed[self.tag(req)] = grpc.StatusCode.UNKNOWN  # until it is acknowledged
        call = stub.RunJob(scheduler_pb2.RunJobRequest(job=req), timeout=600)
        return self._start(Stream(f"run@{gw.name}", "run"), call)

    def cancel(self, stream: Stream) -> None:
        """Cancels a stream's call, as a client going away would."""
        self._tasks[id(stream)].cancel()

    def received(self) -> set[str]:
        """Jobs whose outcome arrived on a job_ids or RunJob stream."""
        return {j for s in self.streams if s.kind != "all" for j in s.outcomes}

    def broken(self) -> list[Stream]:
        """job_ids and RunJob streams that ended with an error before delivering everything."""
        return [s for s in self.streams if s.kind != "all" and s.ended and s.error is not None]

    async def wait_streams(self, timeout: float, kinds: tuple[str, ...] = ("ids", "run")) -> None:
        """Waits until every stream of ``kinds`` has ended; fails naming the open ones after ``timeout`` s."""
        tasks = [self._tasks[id(s)] for s in self.streams if s.kind in kinds and not s.ended]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        open_streams = [s for s in self.streams if s.kind in kinds and not s.ended]
        if open_streams:
            waiting = sorted({j for s in open_streams for j in s.asked if j not in s.outcomes})[:5]
            stored = {j: await self._stored(j) for j in waiting}
            names = [s.name for s in open_streams[:5]]
            raise AssertionError(
                f"{len(open_streams)} streams still open after {timeout}s: {names}; waiting for {stored};"
                f" workers {await self._registrations()}"
            )

    async def _registrations(self) -> dict[str, dict[str, str]]:
        """What Redis holds of every registered worker, for a failure message."""
        ids = [w.decode() for w in await self.redis.zrange(self.keys.workers(), 0, -1)]
        names = ("slots", "used", "off", "expires", "instance")
        found = {}
        for w in ids:
            fields = await self.redis.hmget(self.keys.worker(w), *names)
            found[w] = {n: v.decode() for n, v in zip(names, fields, strict=True) if v is not None}
        return {**found, "now": {"ms": str(int(time.time() * 1000))}}

    async def _stored(self, job_id: str) -> dict[str, str]:
        """What Redis holds of a job, for a failure message ({} when it has no such job)."""
        fields = await self.redis.hmget(self.keys.job(job_id), "state", "worker", "attempt", "lease", "recorded")
        names = ("state", "worker", "attempt", "lease", "recorded")
        return {n: v.decode() for n, v in zip(names, fields, strict=True) if v is not None}

    async def resume(self, gw: Node, timeout: float) -> None:
        """After streams broke: follows on ``gw`` every acknowledged job not received yet, and waits."""
        self.follow(gw, [j for j in self.acked if j not in self.received()], name="resumed")
        await self.wait_streams(timeout)

    async def stop_watching(self) -> None:
        """Ends the unfiltered streams (their outcomes are kept)."""
        tasks = [self._tasks[id(s)] for s in self.streams if s.kind == "all" and not s.ended]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- verdict --------------------------------------------------------------------------
    async def verify_succeeded(self, gw: Node) -> Report:
        """:meth:`verify`, asserting the report is clean and that every job succeeded."""
        report = await self.verify(gw)
        report.assert_ok()
        assert all(e.state == job_pb2.JOB_STATE_SUCCEEDED for e in report.outcomes.values())
        return report

    async def verify(self, gw: Node, timeout: float = 60) -> Report:
        """Confirms on ``gw`` that every acknowledged job is terminal, then counts every violation."""
        confirm = self.follow(gw, list(self.acked), name="confirm")
        waiters = [self._tasks[id(s)] for s in confirm]
        if waiters:
            await asyncio.wait(waiters, timeout=timeout)
        for task in waiters:
            task.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        confirmed = {j for s in confirm for j in s.outcomes}
        await self._catch_up(timeout)
        received = {j for s in self.streams if s.kind != "all" and s not in confirm for j in s.outcomes}
        outcomes = {j: job_pb2.JobEvent.FromString(v[0]) for s in confirm for j, v in s.outcomes.items()}
        return Report(
            acked=len(self.acked),
            lost=sorted(set(self.acked) - received),
            not_terminal=sorted(set(self.acked) - confirmed),
            doubles=self._doubles(),
            conflicting=self._conflicting(),
            strays=self._strays(),
            never_submitted=await self._never_submitted(gw),
            worker_doubles=self._worker_doubles(outcomes),
            incomplete_streams=self._incomplete(),
            outcomes=outcomes,
            confirm_errors=sorted(
                {f"{s.error.name}: {s.detail}" for s in confirm if s.error and s.error != grpc.StatusCode.CANCELLED}
            ),
        )

    async def _catch_up(self, timeout: float) -> None:
        """Unfiltered streams lag behind job_ids streams: give them time to deliver the rest."""
        for _ in range(int(timeout * 10)):
            if not self._incomplete():
                return
            await asyncio.sleep(0.1)

    def _doubles(self) -> list[str]:
        return sorted({f"{j}@{s.name}" for s in self.streams for j, v in s.outcomes.items() if len(v) > 1})

    def _conflicting(self) -> list[str]:
        seen: dict[str, set[bytes]] = defaultdict(set)
        for s in self.streams:
            for j, v in s.outcomes.items():
                seen[j].update(v)
        return sorted(j for j, v in seen.items() if len(v) > 1)

    def _strays(self) -> list[str]:
        return sorted({j for s in self.streams if s.kind != "all" for j in s.outcomes if j not in s.asked})

    def _incomplete(self) -> list[str]:
        return [
            f"{s.name}: {len(set(self.acked) - s.before - set(s.outcomes))} missing (ended: {s.error})"
            for s in self.streams
            if s.kind == "all" and s.must_be_complete and set(self.acked) - s.before - set(s.outcomes)
        ]

    async def _never_submitted(self, gw: Node) -> list[str]:
        """Outcomes of jobs not acknowledged: allowed only for a job stored by a submit whose answer
        was lost (its tag belongs to a failed call); a job nobody asked for is a violation."""
        unknown = {j for s in self.streams for j in s.outcomes} - set(self.acked)
        bad = []
        for job_id in sorted(unknown):
            try:
                job = (await self.stub(gw).GetJob(scheduler_pb2.GetJobRequest(id=job_id), timeout=10)).job
            except grpc.aio.AioRpcError:
                bad.append(job_id)
                continue
            if self.tag(job.spec) not in self.failed:
                bad.append(job_id)
            else:
                self.unacked_outcomes[job_id] = self.tag(job.spec)
        return bad

    def worker_logs(self) -> dict[str, str]:
        return {n.worker_id: n.service.log() for n in self.cluster.workers}

    def finished_lines(self) -> dict[str, list[tuple[str, str]]]:
        """Per job, the (worker id, state) of every ``finished`` line across all worker logs."""
        out: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for worker_id, text in self.worker_logs().items():
            for m in FINISHED.finditer(text):
                out[m.group(1)].append((worker_id, m.group(2)))
        return out

    def started_lines(self) -> Counter[tuple[str, str]]:
        """How often each (job id, worker id) logged ``started``."""
        counts: Counter[tuple[str, str]] = Counter()
        for worker_id, text in self.worker_logs().items():
            for m in STARTED.finditer(text):
                counts[(m.group(1), worker_id)] += 1
        return counts

    def _worker_doubles(self, outcomes: Mapping[str, job_pb2.JobEvent]) -> list[str]:
        """A job recorded by more than one finish, or recorded by a worker other than the stored one."""
        bad = []
        for job_id, lines in self.finished_lines().items():
            stored = outcomes.get(job_id)
            if len(lines) > 1:
                bad.append(f"{job_id} finished {len(lines)} times: {lines}")
            elif stored is not None and (lines[0][0], lines[0][1]) != (
                stored.worker_id,
                job_pb2.JobState.Name(stored.state),
            ):
                bad.append(f"{job_id} finished as {lines[0]} but stored as {stored.worker_id} {stored.state}")
        return bad

    async def histories(self, gw: Node, outcomes: Mapping[str, job_pb2.JobEvent]) -> list[str]:
        """Checks the stored history of every finished job: its attempts numbered 1 to ``attempt``
        without a gap or a repeat, each one but the last FAILED (retried or lost with its worker),
        the last one ending as the job did (a job cancelled or failed by a script while waiting may
        end without one). Returns the jobs whose history is not so."""
        bad = []
        stub = self.stub(gw)
        for job_id, event in outcomes.items():
            job = (await stub.GetJob(scheduler_pb2.GetJobRequest(id=job_id), timeout=10)).job
            numbers = [a.attempt for a in job.attempts]
            states = [a.state for a in job.attempts]
            if numbers != list(range(1, len(numbers) + 1)) or len(numbers) > job.attempt:
                bad.append(f"{job_id}: attempts {numbers} for a job at attempt {job.attempt}")
            elif any(st != job_pb2.JOB_STATE_FAILED for st in states[:-1]):
                bad.append(f"{job_id}: an attempt before the last did not fail: {states}")
            elif states and states[-1] != event.state and event.state != job_pb2.JOB_STATE_FAILED:
                bad.append(f"{job_id}: its last attempt ended {states[-1]}, the job {event.state}")
        return bad

    # --- resources ------------------------------------------------------------------------
    async def usage(self, node: Node) -> Usage:
        m = await node.metrics()
        prefix = "jobgate_gateway" if node.address else "jobgate_worker"
        return Usage(m["process_resident_memory_bytes"], m[f"{prefix}_asyncio_tasks"])

    async def take_baseline(self) -> dict[str, Usage]:
        """Memory and tasks of every live process now (call it after warm-up, with no streams open)."""
        for node in self.cluster.live():
            self.baseline[node.name] = await self.usage(node)
        return self.baseline

    async def subscriptions(self) -> dict[str, int]:
        """Subscribers of this namespace's channels, and active channels of the namespace."""
        k = self.keys
        names = [k.results_channel(), k.workers_channel()]
        names += [k.dispatch_channel(n.worker_id) for n in self.cluster.workers]
        reply = await self.redis.execute_command("PUBSUB", "NUMSUB", *names)
        counts = {_text(reply[i]): int(reply[i + 1]) for i in range(0, len(reply), 2)}
        channels = await self.redis.execute_command("PUBSUB", "CHANNELS", f"{k.prefix}*")
        counts["<channels>"] = len(channels)
        return counts

    def expected_subscriptions(self) -> dict[str, int]:
        k, gateways = self.keys, sum(g.alive() for g in self.cluster.gateways)
        out = {k.results_channel(): gateways, k.workers_channel(): gateways}
        for w in self.cluster.workers:
            out[k.dispatch_channel(w.worker_id)] = int(w.alive())
        out["<channels>"] = (2 if gateways else 0) + sum(w.alive() for w in self.cluster.workers)
        return out

    async def check_leaks(self, *, rss_slack_mb: float = 30, task_slack: int = 0, timeout: float = 30) -> None:
        """Ends the unfiltered streams, then waits until every process that has a baseline and still
        runs has no stream open and no more asyncio tasks than at baseline (+ ``task_slack``), and the
        namespace's Redis subscriptions are one per live subscriber; then compares memory."""
        await self.stop_watching()
        deadline = time.monotonic() + timeout
        while True:
            problems = await self._leaks(task_slack)
            if not problems or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
        assert not problems, f"not back to baseline after {timeout}s: {problems}"
        grew = {}
        for node in self.cluster.live():
            if node.name in self.baseline:
                now, base = await self.usage(node), self.baseline[node.name]
                print(
                    f"{node.name}: rss {base.rss / MB:.1f} -> {now.rss / MB:.1f} MB, tasks {base.tasks} -> {now.tasks}"
                )
                if now.rss > base.rss + rss_slack_mb * MB:
                    grew[node.name] = f"{base.rss / MB:.1f} MB -> {now.rss / MB:.1f} MB"
        assert not grew, f"resident memory grew more than {rss_slack_mb} MB: {grew}"

    async def _leaks(self, task_slack: int) -> dict[str, str]:
        problems = {}
        for node in self.cluster.live():
            base = self.baseline.get(node.name)
            if base is None:
                continue
            m = await node.metrics()
            prefix = "jobgate_gateway" if node.address else "jobgate_worker"
            tasks, streams = m[f"{prefix}_asyncio_tasks"], m.get("jobgate_gateway_streams_open", 0)
            if tasks > base.tasks + task_slack or streams:
                problems[node.name] = f"tasks {base.tasks:.0f} -> {tasks:.0f}, streams open {streams:.0f}"
        subs, want = await self.subscriptions(), self.expected_subscriptions()
        if subs != want:
            problems["redis"] = f"subscriptions {subs}, expected {want}"
        return problems


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v
