"""docs/BENCHMARKS.md from the figures of one run: targets, tables, charts, versions and settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.results import CPU_PROCESSES, MACHINE, Results

KIB = 1024


@dataclass(frozen=True)
class Context:
    """What the report says about the run besides its figures."""

    when: str
    machine: str
    commit: str
    redis: str
    rounds: int
    workers: int
    plan: dict[str, int]  # job counts: batched, unary, clients, trips, sweep, queued, streams, channels
    payloads: dict[int, int]  # payload bytes -> jobs
    sweep: list[int]  # worker counts
    charts: dict[str, Path]
    docs: Path


@dataclass(frozen=True)
class Target:
    text: str
    measured: str
    met: bool | None  # None: not measured
    key: str  # names the target for the notes under the table (_between), whatever its text


def _num(value: float | None, fmt: str = "{:,.0f}") -> str:
    return "–" if value is None else fmt.format(value)


def _at_least(value: float | None, goal: float) -> bool | None:
    return None if value is None else value >= goal


def _at_most(value: float | None, goal: float) -> bool | None:
    return None if value is None else value <= goal


def fastest_peer(results: Results, measure: str) -> tuple[str, float] | None:
    """The peer with the highest median for ``measure``, and that median."""
    peers = [(s, m) for s in results.systems if s != "jobgate" and (m := results.median(s, measure)) is not None]
    return max(peers, key=lambda p: p[1]) if peers else None


def _ratio_to_peer(results: Results, key: str, text: str, ours: str, theirs: str, goal: float) -> Target:
    """jobgate's ``ours`` against the fastest peer's ``theirs``: at least ``goal`` times it."""
    mine, peer = results.median("jobgate", ours), fastest_peer(results, theirs)
    if mine is None or peer is None:
        return Target(text, "not measured", None, key)
    name, value = peer
    return Target(text, f"{mine / value:.2f}× ({mine:,.0f} vs {name} {value:,.0f} jobs/s)", mine >= goal * value, key)


def _ratio_to_machine(
    results: Results, key: str, text: str, ours: str, reference: str, goal: float, unit: str
) -> Target:
    """jobgate's ``ours`` as a share of this run's ``reference`` (bench/reference.py): at least ``goal``."""
    mine, ref = results.median("jobgate", ours), results.median(MACHINE, reference)
    if mine is None or ref is None:
        return Target(text, "not measured", None, key)
    return Target(text, f"{mine / ref:.0%} ({mine:,.0f} of {ref:,.0f} {unit})", mine >= goal * ref, key)


def _relayed(
    target: Target, results: Results, measure: str, show: Callable[[float, float], str], floor: str = ""
) -> Target:
    """``target`` with, in its figures, what gRPC in front of a bare relay (``bench.relay_floor``:
    nothing stored, nothing checked) did on the same shape in this run, as ``show(relayed, floor)``
    (``floor``: the reference it is a share of)."""
    relayed = results.median(MACHINE, measure)
    base = results.median(MACHINE, floor) if floor else 1.0
    if target.met is None or relayed is None or not base:
        return target
    said = f"gRPC in front of a bare relay: {show(relayed, base)}"
    measured = target.measured
    figures = f"{measured[:-1]}; {said})" if measured.endswith(")") else f"{measured} ({said})"
    return Target(target.text, figures, target.met, target.key)


def targets(results: Results) -> list[Target]:
    """jobgate's goals, each with the figures of this run that decide it. Most are ratios to what
    the peers or the machine's references (bench/reference.py) did in the same run, so that a
    target means the same on a slow day and a fast one."""
    med: Callable[[str], float | None] = lambda measure: results.median("jobgate", measure)  # noqa: E731
    out = [
        _ratio_to_peer(results, "batched", "batched ≥ 5× the fastest peer", "batched", "batched", 5),
        _ratio_to_machine(
            results,
            "batched",
            "batched ≥ 40% of the pipelined pub/sub relay",
            "batched",
            "relay_pipelined",
            0.4,
            "messages/s",
        ),
        _ratio_to_peer(
            results,
            "client",
            "one job per call from 32 submitters through the Python client's `submit` ≥ 2× the fastest peer's unary",
            "client",
            "unary",
            2,
        ),
        _relayed(
            _ratio_to_machine(
                results,
                "unary",
                "raw `SubmitJob` unary ≥ 50% of gRPC-alone unary calls/s",
                "unary",
                "grpc_unary",
                0.5,
                "calls/s",
            ),
            results,
            "relayed_unary",
            lambda relayed, floor: f"{relayed / floor:.0%}",
            "grpc_unary",
        ),
    ]
    for pct, floor, goal, text in (
        ("p50", results.median(MACHINE, "grpc_p50"), lambda f: f + 1.0, "`RunJob` p50 ≤ the gRPC-alone p50 + 1.0 ms"),
        ("p99", results.median(MACHINE, "grpc_p99"), lambda f: 2.5 * f, "`RunJob` p99 ≤ 2.5× the gRPC-alone p99"),
    ):
        ours = med(pct)
        if ours is None or floor is None:
            out.append(Target(text, "not measured", None, "runjob"))
        else:
            figures = f"{ours:.2f} ms (goal {goal(floor):.2f}: floor {floor:.2f})"
            target = Target(text, figures, ours <= goal(floor), "runjob")
            out.append(_relayed(target, results, f"relayed_{pct}", lambda relayed, floor: f"{relayed:.2f} ms"))
    out += [
        _ratio_to_peer(results, "100kb", "100 KB payloads ≥ the fastest peer", "payload:100000", "payload:100000", 1),
        _ratio_to_peer(results, "10kb", "10 KB payloads ≥ 2× the fastest peer", "payload:10000", "payload:10000", 2),
    ]
    rss, per_job, floor_rss = med("rss_streams"), med("bytes_per_job"), results.median(MACHINE, "grpc_rss_streams")
    alone = f" (gRPC alone: {floor_rss:.1f} MB)" if floor_rss is not None else ""
    out += [
        Target(
            "gateway ≤ 300 MB RSS with the open streams below",
            f"{_num(rss, '{:.1f}')} MB{alone}",
            _at_most(rss, 300),
            "memory",
        ),
        Target(
            "≤ 1 KiB of Redis per queued small job", f"{_num(per_job)} bytes", _at_most(per_job, KIB), "redis_bytes"
        ),
    ]
    return out


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "not measured"}[met]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _chart(ctx: Context, name: str, alt: str) -> str:
    path = ctx.charts.get(name)
    return f"\n![{alt}]({path.relative_to(ctx.docs).as_posix()})\n" if path else ""


def _plural(n: int) -> str:
    return "s" if n != 1 else ""


def _size(n: int) -> str:
    return f"{n // 1000} KB" if n >= 1000 else f"{n} B"


def _figures(results: Results, ctx: Context) -> str:
    p = ctx.plan
    rows = [
        [s, results.spread(s, "batched"), results.spread(s, "unary"), results.spread(s, "client")]
        for s in results.systems
    ]
    header = [
        "system",
        f"batched ({p['batched']:,} jobs), jobs/s",
        f"unary ({p['unary']:,} jobs, {p['clients']} submitters), jobs/s",
        "unary through the Python client, jobs/s",
    ]
    throughput = _table(header, rows)
    cpu = ""
    if results.values("jobgate", "cpu:all"):
        names = {"redis": "Redis", "gateway": "the gateway", "client": "the client"}
        names["workers"] = f"the {ctx.workers} workers"
        rows = [[names[n], results.spread("jobgate", f"cpu:{n}")] for n in CPU_PROCESSES]
        cpu = (
            "\n\njobgate's CPU per job while the batched figure above was measured, by process (from\n"
            "`/proc`, so each process's own; the client submits and counts the completions): what a job\n"
            "costs on this machine, which moves less with its pace than a rate does.\n\n"
            + _table(["process", "CPU µs per batched job"], [*rows, ["all", results.spread("jobgate", "cpu:all")]])
        )
    rows = [[s, results.spread(s, "p50", "{:.2f}"), results.spread(s, "p99", "{:.2f}")] for s in results.systems]
    latency = _table(["system", "p50, ms", "p99, ms"], rows)
    rows = [[s, *(results.spread(s, f"workers:{w}") for w in ctx.sweep)] for s in results.systems]
    workers = _table(["system", *(f"{w} worker{'s' if w > 1 else ''}, jobs/s" for w in ctx.sweep)], rows)
    rows = [[s, *(results.spread(s, f"payload:{b}") for b in ctx.payloads)] for s in results.systems]
    payload = _table(["system", *(f"{_size(b)} ({n:,} jobs), jobs/s" for b, n in ctx.payloads.items())], rows)
    rows = [[s, results.spread(s, "bytes_per_job")] for s in results.systems]
    memory = _table(["system", "Redis bytes per queued job"], rows)
    rss = _table(
        ["gateway VmRSS", "MB"],
        [
            ["idle (1 worker connected)", results.spread("jobgate", "rss_idle", "{:.1f}")],
            [f"with {p['streams']:,} open `WatchResults` streams", results.spread("jobgate", "rss_streams", "{:.1f}")],
        ],
    )
    per_channel = p["streams"] // max(p["channels"], 1)
    warmup = max(p["queued"] // 10, 1)
    sweep_note = (
        f"Batched submission of {p['sweep']:,} small jobs; the {ctx.workers}-worker point is the batched figure above."
        if ctx.workers in ctx.sweep
        else f"Batched submission of {p['sweep']:,} small jobs."
    )
    return f"""## Throughput

End to end: from the first submit to the last result received by the submitter. Batched: the
library's bulk API, in chunks of 500 jobs; unary: one submit call per job from {p["clients"]} concurrent
submitters (jobgate: raw `SubmitJob` calls; and, in the last column, the same {p["clients"]} submitters calling
its Python client's `submit`, which sends the submits that meet in flight as one `SubmitJobs`). How each
system submits and waits is under [Systems and settings](#systems-and-settings).

{throughput}{cpu}
{_chart(ctx, "throughput", "throughput per system")}
## Round trip latency

{p["trips"]} jobs one after another, each submitted once the previous result is in (jobgate: one
`RunJob` call; the peers: enqueue, then wait for the result through the library's result API).

{latency}
{_chart(ctx, "latency", "round trip latency per system")}
## Worker processes

{sweep_note} Every process shares the machine's cores with Redis and the submitter.

{workers}
{_chart(ctx, "workers", "throughput by number of workers")}
## Payload size

Batched submission with {ctx.workers} worker processes; each job carries the payload and returns it
(jobgate: the `payload` bytes field, chunks kept under 2 MB per request; the peers: a string of that
many characters).

{payload}
{_chart(ctx, "payload", "throughput by payload size")}
## Memory

Redis `used_memory` growth per queued job, once per system: {p["queued"]:,} small jobs submitted
through the bulk API with no worker running, `INFO memory` before and after, divided by the count.
{warmup:,} unmeasured jobs go first, so that connections, scripts and the queue's own keys are in
place. It counts everything the system keeps in Redis for a job it has accepted.

{memory}
{_chart(ctx, "memory", "Redis memory per queued job")}
The gateway's resident memory (`VmRSS` in `/proc/<pid>/status`), freshly started with default
settings (but `max_streams` a little above the streams opened) and one worker, before and with
{p["streams"]:,} `WatchResults` streams open over {p["channels"]} client connections (about {per_channel}
streams each: HTTP/2 caps concurrent streams per connection). Every stream has received a completion
before the second reading.

{rss}
"""


def _systems(results: Results, ctx: Context) -> str:
    rows = [
        [s, results.versions.get(s, "–"), results.settings.get(s, "not loaded"), results.submitters.get(s, "–")]
        for s in results.systems
    ]
    header = ["system", "versions", f"workers (as run with {ctx.workers})", "submitter"]
    return f"""## Systems and settings

Each peer runs as a user would set it up for throughput on this machine: as many worker processes
as jobgate has workers, in-process execution, and each library's bulk submission and result API. Chunks
hold 500 jobs (fewer for large payloads, under 2 MB each); the concurrent submitters are
{ctx.plan["clients"]} threads for the synchronous libraries and {ctx.plan["clients"]} asyncio tasks for jobgate and arq.

{_table(header, rows)}

- Celery: a thread pool (no fork and no pipe between the consumer and the task), with gossip,
  mingle and heartbeats off and a prefetch multiplier of 16, so no worker waits for messages; the
  prefork and solo pools measured within noise of it here.
- RQ: `SimpleWorker` runs each job in the worker process as every other system does; RQ's default
  worker forks a work horse per job (isolation at a cost of milliseconds each), which is about four
  times slower here. RQ runs one job at a time per process.
- Dramatiq: its defaults (8 threads per process, prefetch of twice the threads).
- arq: `poll_delay` defaults to 0.5 s in the worker and in `Job.result`, which caps a worker at a few
  hundred jobs a second; 5 ms is the setting used here (1 ms halves arq's round trip and lifts unary
  throughput by some 15%, but costs batched throughput about 10% on two cores; 20 ms and more cut
  both).
  arq 0.25.0 is the newest arq that installs beside redis-py 8 (later ones require redis-py < 6), so
  every system here runs on the same client library."""


# Where the targets were set, a bare relay (bench/reference.py) moved about this many messages/s.
RELAY_WHERE_SET = {"relay_unbatched": 5_000, "relay_pipelined": 38_000}


def _machine(results: Results) -> str:
    if not any(results.values(MACHINE, m) for m in ("relay_unbatched", "grpc_unary")):
        return ""
    spread = lambda m, fmt="{:,.0f}": results.spread(MACHINE, m, fmt)  # noqa: E731
    rows = [
        [
            "bare pub/sub relay, unbatched",
            f"{spread('relay_unbatched')} messages/s",
            f"≈ {RELAY_WHERE_SET['relay_unbatched']:,} messages/s",
        ],
        [
            "bare pub/sub relay, pipelined",
            f"{spread('relay_pipelined')} messages/s",
            f"≈ {RELAY_WHERE_SET['relay_pipelined']:,} messages/s",
        ],
        ["gRPC alone: unary calls from 32 asyncio tasks", f"{spread('grpc_unary')} calls/s", "–"],
        [
            "gRPC alone: `RunJob` round trip, p50 / p99",
            f"{spread('grpc_p50', '{:.2f}')} / {spread('grpc_p99', '{:.2f}')} ms",
            "–",
        ],
        [
            "gRPC alone: VmRSS with the gateway's open streams (below)",
            f"{spread('grpc_rss_streams', '{:.1f}')} MB",
            "–",
        ],
        [
            "gRPC in front of the unbatched relay: unary calls from 32 asyncio tasks",
            f"{spread('relayed_unary')} calls/s",
            "–",
        ],
        [
            "gRPC in front of the unbatched relay: `RunJob` round trip, p50 / p99",
            f"{spread('relayed_p50', '{:.2f}')} / {spread('relayed_p99', '{:.2f}')} ms",
            "–",
        ],
    ]
    ratio = ""
    relay = results.median(MACHINE, "relay_pipelined")
    if relay:
        ratio = (
            f"\n\nOn this run's machine the pipelined relay ran at {relay / RELAY_WHERE_SET['relay_pipelined']:.0%}"
            " of the pace the targets assume."
        )
    return f"""## This machine

The same machine runs at different speeds on different days (it is shared), so every round also
measures three references (`bench/reference.py`, `python -m bench.reference`): a bare redis-py pub/sub
relay with no persistence (one process publishes on a dispatch channel, a relay process republishes
each message on a result channel, the first counts them there; unbatched: one PUBLISH at a time,
pipelined: in pipelines), Python gRPC alone (`bench/grpc_floor.py`: jobgate's service with
handlers that do nothing, driven by the benchmark's client shapes, no Redis), and gRPC in front of
the unbatched relay (`bench/relay_floor.py`: the same service and client shapes, its handlers hand
each job to the relay process with one PUBLISH, and `RunJob` waits for the job to come back on the
result channel: a gateway and a worker that store, lease and check nothing).{ratio}

{_table(["reference", "this run, median (min–max)", "where the targets were set"], rows)}

jobgate's unary throughput cannot pass the gRPC unary figure, nor its `RunJob` latency go below the gRPC
round trip, nor its memory with open streams below gRPC's own (`grpc_floor.stream_rss`: a server
whose `WatchResults` sends one event and stays open, its streams opened as the gateway's are): those
are what the Python gRPC library costs before jobgate does anything. The relayed figures are
what it costs to pass a job through Redis to a worker process and back with nothing kept: the
least any gateway of this shape can do on the machine, before it stores a job, leases it, records
its outcome and checks that outcome.
"""


def _failures(results: Results) -> str:
    if not any(results.failures.values()) and not results.notes:
        return ""
    out = ""
    names = [*results.systems, MACHINE]
    if failed := [f"- {s}: {msg}" for s in names for msg in results.failures.get(s, [])]:
        out += "\n## Failures\n\nA failed measurement leaves its cell `failed`, or out of the median:\n\n"
        out += "\n".join(failed) + "\n"
    if results.notes:
        out += (
            "\n## What Redis logged\n\nClients Redis closed while a system was measured (a pub/sub subscriber is "
            "closed once it falls 32 MB behind, Redis's default `client-output-buffer-limit pubsub`); a measurement "
            "that still has its figure recovered from it:\n\n"
        )
        out += "\n".join(f"- {note}" for note in results.notes) + "\n"
    return out


def _between(results: Results, found: list[Target]) -> str:
    """What stands between jobgate and each target of ``found`` (this run's ``targets``) that it
    misses, with the run's figures where the reasons rest on them."""
    missed = {t.key for t in found if t.met is False}
    med = lambda system, measure: results.median(system, measure)  # noqa: E731
    notes = []
    if "memory" in missed:
        notes.append(
            "- **Memory with 10,000 streams**: gRPC alone takes more than the target (the reference below);\n"
            "  what the gateway adds is its per-stream state and layers of async generators, about 9 KB a stream."
        )
    floor_p50, relayed_p50 = med(MACHINE, "grpc_p50"), med(MACHINE, "relayed_p50")
    if "runjob" in missed:
        relayed = ""
        if floor_p50 and relayed_p50:
            gap = relayed_p50 - floor_p50
            relayed = (
                f"\n  gRPC in front of the bare relay (the reference rows below: each job handed to a worker\n"
                f"  process with one PUBLISH and back on the result channel, nothing kept) took the floor's p50\n"
                f"  + {gap:.2f} ms in this run (+0.5 to +1.2 in the other runs of 2026-12-05), which leaves\n"
                f"  {max(0.0, 1.0 - gap):.2f} ms for what a gateway that loses nothing adds."
            )
        notes.append(
            "- **`RunJob`**: jobgate makes four script calls where a bare relay makes one PUBLISH each\n"
            "  way (the submit with placement; the worker's start and finish; the gateway's check of the\n"
            "  outcome), and on this machine each round trip costs its processes 0.2 to 0.4 ms of CPU: per\n"
            "  `RunJob` the gateway used 2.1 ms of CPU against 1.06 for the relayed server and 0.57 for gRPC\n"
            "  alone, Redis 0.7 against 0.11, the worker 0.9 against 0.29 (2026-12-05)." + relayed + "\n"
            "  What would reach it is two calls fewer: a worker's start folded into its dispatch, and\n"
            "  outcomes the gateways need not check; each would drop a guarantee (workers start only\n"
            "  stored jobs; a forged outcome never reaches a client), so neither is done. The p99 target\n"
            "  (2.5× the floor's p99) meets the same steps: each call is one more wait for a process's turn\n"
            "  on two busy cores."
        )
    grpc_unary, relayed_unary, unary = (
        med(MACHINE, "grpc_unary"),
        med(MACHINE, "relayed_unary"),
        med("jobgate", "unary"),
    )
    if "unary" in missed and grpc_unary and relayed_unary and unary:
        notes.append(
            f"- **Raw `SubmitJob`**: gRPC in front of the bare relay, one PUBLISH per call and nothing kept,\n"
            f"  answered {relayed_unary / grpc_unary:.0%} of gRPC alone's calls in this run: the target asks about as\n"
            f"  much as a gateway that keeps nothing does. jobgate, which also stores, places and streams back\n"
            f"  each job, ran at {unary / relayed_unary:.0%} of that reference."
        )
    if "client" in missed:
        notes.append(
            "- **The Python client's `submit`**: with 32 submitters the rate is 32 over the round trip of a\n"
            "  32-job call under load (the submitters a call answers all come back before the next call\n"
            "  leaves); cheaper validation and submit calls shorten it. The client asks for the basic view,\n"
            "  so the jobs' inputs no longer travel back."
        )
    if "batched" in missed or "10kb" in missed:
        notes.append(
            "- **Batched and 10 KB**: CPU per job of Redis's scripts (a `redis.call` costs a microsecond or\n"
            "  two; a job makes about twenty) and of the gateway's Python; on two cores the stack uses both\n"
            "  while a backlog drains. Large values no longer enter the scripts (written beside their calls);\n"
            "  a 10 KB job still costs the gateway about 50 µs more than a small one, in protobuf copies of\n"
            "  its payload and output and Python's per-command work. 10 KB has measured 1.62× to 2.20× the\n"
            "  fastest peer in the runs of 2026-12-04 and 2026-12-05 (on two kinds of processor)."
        )
    if "100kb" in missed:
        notes.append(
            "- **100 KB payloads**: jobgate's 100 KB rate moves more with the machine than the peers' (from\n"
            "  0.79× to 1.37× the fastest peer between runs, 426 to 736 jobs/s between the rounds of one run).\n"
            "  A 100 KB job's payload and output pass through gRPC twice and through Redis four times (stored,\n"
            "  read by the worker, written back, read by the gateway); the submitter asks `SubmitJobs` for the\n"
            "  basic view, so the payload does not come back a third time."
        )
    if not notes:
        return "Every target is met in this run."
    return (
        "What stands between jobgate and the targets it misses in this run ([PERFORMANCE.md](PERFORMANCE.md)\n"
        "has the measurements):\n\n" + "\n".join(notes)
    )


def render(results: Results, ctx: Context) -> str:
    """The whole of docs/BENCHMARKS.md."""
    found = targets(results)
    target_rows = [[t.text, t.measured, _verdict(t.met)] for t in found]
    order = ", ".join(results.systems)
    return f"""# Benchmarks: jobgate beside Celery, RQ, Dramatiq and arq

Produced by `make bench` (`bench/run.py`) on {ctx.when}, jobgate at {ctx.commit}.

- Machine: {ctx.machine}.
- Redis {ctx.redis}: one private server for the run (no persistence), flushed before each system starts.
- Every system runs the same no-op job (it returns its input), with {ctx.workers} worker processes
  unless a sweep says otherwise. The submitter is the benchmark process, on the same machine.
- Figures are medians over {ctx.rounds} round{_plural(ctx.rounds)}, min–max in brackets; Redis memory per job is
  measured once per system. Each round runs every system in turn ({order}) before
  the next round starts, so the noise of a shared machine falls on all of them alike.
- The peers run from `.bench-venv` (`bench/requirements.txt`), never from jobgate's dependencies;
  their versions and settings are under [Systems and settings](#systems-and-settings).

Where jobgate's time goes: [PERFORMANCE.md](PERFORMANCE.md); what a job costs as queues, streams and stored
jobs grow: [CURVES.md](CURVES.md).

## Targets

{_table(["target", "measured (jobgate, median)", "verdict"], target_rows)}

{_between(results, found)}

{_machine(results)}
{_figures(results, ctx)}
{_systems(results, ctx)}

Redis is shared by the submitter and the workers of one system at a time. jobgate keeps every
guarantee on while measured: each job is stored in Redis before it is acknowledged, placed by the
placement script, acknowledged and recorded by the worker's scripts, and its completion is checked
against the stored job before it is streamed back. The peers run with their result backends on,
since the submitter waits for every result.
{_failures(results)}"""
