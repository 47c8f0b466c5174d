"""``make bench``: jobgate beside Celery, RQ, Dramatiq and arq, in one run, into docs/BENCHMARKS.md.

Starts one private Redis for the run and, for each system in turn, its worker processes (jobgate:
a gateway and ``python -m worker`` processes), then measures with the same no-op job and the same
submitter shape: batched and unary end-to-end throughput, sequential round trips, throughput by
worker count and by payload size, Redis memory per queued job and, for jobgate, the gateway's memory
with 1,000 open ``WatchResults`` streams. Rounds are interleaved (every system once per round) and
medians with min-max are reported, because the machine is shared. A system that fails to start or
times out is reported as failed and the run goes on.

``make bench`` runs this from ``.bench-venv``, which has the peers; ``--systems jobgate`` also runs
in jobgate's own ``.venv``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from types import FrameType

import redis

from bench import reference
from bench.results import CPU_PROCESSES, MACHINE, Results, describe
from bench.systems import SYSTEMS, load
from bench.systems.base import ROOT, System, flush
from bench.systems.jobgate import Jobgate, cpu_s
from devtools.servers import RedisProcess

DOCS = ROOT / "docs"
REPORT = DOCS / "BENCHMARKS.md"
CHARTS = DOCS / "bench"
# No single measurement (starting a system included) may take longer than this.
LIMIT_S = 360


@dataclass(frozen=True)
class Plan:
    """Job counts of one run."""

    rounds: int = 3
    workers: int = 2
    batched: int = 10_000
    unary: int = 4_000
    clients: int = 32
    trips: int = 300
    sweep: int = 5_000
    sweep_workers: tuple[int, ...] = (1, 2, 4)
    payloads: dict[int, int] = field(default_factory=lambda: {100: 5_000, 10_000: 5_000, 100_000: 1_000})
    queued: int = 10_000
    streams: int = 10_000
    channels: int = 112  # about 90 streams per connection: under HTTP/2's usual cap of 100
    relay: int = 20_000  # messages through the bare relay, unbatched (pipelined: 4 times as many)
    floor_calls: int = 8_000  # unary calls against gRPC alone
    floor_trips: int = 1_000


QUICK = Plan(
    rounds=1,
    batched=300,
    unary=320,
    trips=30,
    sweep=200,
    payloads={100: 200, 10_000: 100, 100_000: 20},
    queued=500,
    streams=100,
    channels=2,
    relay=500,
    floor_calls=320,
    floor_trips=30,
)


class MeasurementTimeout(Exception):
    """A measurement ran past LIMIT_S."""


@contextlib.contextmanager
def limit(seconds: float) -> Iterator[None]:
    """Raises MeasurementTimeout in the main thread after ``seconds``, whatever it is blocked on."""

    def expired(signum: int, frame: FrameType | None) -> None:
        raise MeasurementTimeout(f"over {seconds:.0f}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Bench:
    """Runs the plan over the systems and collects the figures."""

    def __init__(
        self, plan: Plan, names: list[str], redis_url: str, redis_log: RedisLog | None = None, redis_pid: int = 0
    ) -> None:
        self.plan = plan
        self.redis_url = redis_url
        self.redis_log = redis_log
        self.redis_pid = redis_pid  # the run's Redis, whose CPU jobgate's batched figure is charged (0: not)
        self.results = Results(names)
        self.systems: dict[str, System] = {}
        for name in names:
            try:
                self.systems[name] = load(name, redis_url)
            except ImportError as exc:
                self.results.fail(name, "import", f"{exc} (the peers are installed in .bench-venv by `make bench`)")
                print(f"{name}: cannot import: {exc}", flush=True)
                continue
            system = self.systems[name]
            self.results.versions[name] = ", ".join(_version(p) for p in system.packages)
            self.results.settings[name] = system.settings(plan.workers)
            self.results.submitters[name] = system.submitter

    def session(
        self, name: str, where: str, start: Callable[[System], None], measures: dict[str, Callable[[System], float]]
    ) -> None:
        """Flushes Redis, starts the system, takes each measure in order and stops it, also on
        failure; a failure skips the rest of the session."""
        system = self.systems.get(name)
        if system is None:
            return
        flush(self.redis_url)
        began = time.monotonic()
        step = "start"
        try:
            with limit(LIMIT_S):
                start(system)
            for step, measure in measures.items():
                with limit(LIMIT_S):
                    value = measure(system)
                self.results.add(name, step, value)
                print(f"  {where:<22} {name:<9} {step:<15} {value:>12,.2f}", flush=True)
        except Exception as exc:  # noqa: BLE001 - reported as failed; the run goes on
            self.results.fail(name, f"{where}, {step}", exc)
            print(f"  {where:<22} {name:<9} {step:<15} FAILED: {describe(exc, 2000)}", flush=True)
            with contextlib.suppress(Exception):
                print(system.logs()[-6000:], flush=True)
        finally:
            try:
                with limit(60):
                    system.stop()
            except Exception as exc:  # noqa: BLE001
                self.results.fail(name, f"{where}, stop", exc)
        print(f"  {where:<22} {name:<9} ({time.monotonic() - began:.0f}s)", flush=True)
        if self.redis_log and (closed := self.redis_log.closed_clients()):
            kind = "pub/sub " if all("P" in flags for flags in closed) else ""
            note = f"{name}, {where}: Redis closed {len(closed)} {kind}client(s) over their output buffer limit"
            self.results.notes.append(note)
            print(f"  {note}", flush=True)

    def round(self, r: int) -> None:
        p = self.plan
        print(f"round {r}", flush=True)
        for name in self.systems:
            main: dict[str, Callable[[System], float]] = {
                "batched": self._batched_cpu(p.batched) if name == "jobgate" else lambda s: s.batched(p.batched),
                "unary": lambda s: s.unary(p.unary, p.clients),
                **({"client": _client_unary(p.unary, p.clients)} if name == "jobgate" else {}),
                **self._trips(),
                **{f"payload:{b}": _payload(b, n) for b, n in p.payloads.items()},
            }
            before = len(self.results.values(name, "batched"))
            self.session(name, f"round {r}, main", lambda s: s.start(p.workers), main)
            batched = self.results.values(name, "batched")
            if len(batched) > before and p.workers in p.sweep_workers:
                self.results.add(name, f"workers:{p.workers}", batched[-1])
        for w in p.sweep_workers:
            if w == p.workers:
                continue
            for name in self.systems:
                self.session(
                    name, f"round {r}, workers={w}", lambda s, w=w: s.start(w), {f"workers:{w}": _sweep(p.sweep)}
                )
        if "jobgate" in self.systems:
            self.session("jobgate", f"round {r}, streams", _start_plain(p.streams), self._streams())
        self.machine(r)

    def _batched_cpu(self, n: int) -> Callable[[System], float]:
        """jobgate's batched measure, which also records the CPU each of its processes used per job
        meanwhile (``cpu:<process>``, µs: Redis, the gateway, the workers together, the submitting
        and counting client, and all of them): the cost of a job on this machine, which moves less
        with the machine's pace than a rate does."""

        def measure(system: System) -> float:
            assert isinstance(system, Jobgate)
            pids = {**system.processes(), "client": [os.getpid()]}
            if self.redis_pid:
                pids["redis"] = [self.redis_pid]
            before = {name: sum(cpu_s(pid) for pid in group) for name, group in pids.items()}
            rate = system.batched(n)
            used = {name: sum(cpu_s(pid) for pid in group) - before[name] for name, group in pids.items()}
            for name in CPU_PROCESSES:
                if name in used:
                    self.results.add("jobgate", f"cpu:{name}", used[name] / n * 1e6)
            self.results.add("jobgate", "cpu:all", sum(used.values()) / n * 1e6)
            return rate

        return measure

    def machine(self, r: int) -> None:
        """The machine's own pace this round (bench/reference.py), under the name ``MACHINE``."""
        flush(self.redis_url)
        p = self.plan
        figures = reference.measures(self.redis_url, p.relay, p.floor_calls, p.floor_trips, p.streams, p.channels)
        for step, measure in figures.items():
            try:
                with limit(LIMIT_S):
                    value = measure()
            except Exception as exc:  # noqa: BLE001 - reported as failed; the run goes on
                self.results.fail(MACHINE, f"round {r}, {step}", exc)
                print(f"  round {r}, machine       {step:<15} FAILED: {describe(exc, 2000)}", flush=True)
                return
            self.results.add(MACHINE, step, value)
            print(f"  round {r}, machine       {step:<15} {value:>12,.2f}", flush=True)

    def queued(self) -> None:
        """Redis bytes per queued job, once per system (it hardly varies between rounds)."""
        print("memory per queued job", flush=True)
        for name in self.systems:
            self.session(
                name, "memory", lambda s: s.start(0), {"bytes_per_job": lambda s: s.bytes_per_job(self.plan.queued)}
            )

    def _trips(self) -> dict[str, Callable[[System], float]]:
        trips: list[float] = []

        def p50(s: System) -> float:
            trips[:] = s.round_trips(self.plan.trips)
            return percentile(trips, 50)

        return {"p50": p50, "p99": lambda s: percentile(trips, 99)}

    def _streams(self) -> dict[str, Callable[[System], float]]:
        idle: list[float] = []

        def rss_idle(s: System) -> float:
            idle[:] = s.stream_rss(self.plan.streams, self.plan.channels)
            return idle[0]

        return {"rss_idle": rss_idle, "rss_streams": lambda s: idle[1]}


def _payload(size: int, n: int) -> Callable[[System], float]:
    return lambda s: s.batched(n, size)


def _client_unary(n: int, clients: int) -> Callable[[System], float]:
    """jobgate's unary shape through its Python client's ``submit``."""

    def measure(system: System) -> float:
        from bench.systems.jobgate import Jobgate

        assert isinstance(system, Jobgate)
        return system.client_unary(n, clients)

    return measure


def _sweep(n: int) -> Callable[[System], float]:
    return lambda s: s.batched(n)


def _start_plain(streams: int) -> Callable[[System], None]:
    """jobgate as an operator runs it, with one worker: default settings, but quiet logs and room
    for ``streams`` open streams and a few more (``max_streams`` is 10,000 by default)."""
    env = {"JOBGATE_LOG_LEVEL": "WARNING", "JOBGATE_MAX_STREAMS": str(max(streams + 100, 10_000))}
    return lambda system: system.start(1, env=env)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def _version(package: str) -> str:
    try:
        return f"{package} {metadata.version(package)}"
    except metadata.PackageNotFoundError:
        return f"{package} (not installed)"


# --- what the report says about the run ----------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        memory = f", {kib / 1024 / 1024:.0f} GiB"
    return (
        f"{cpu}, {os.cpu_count()} cores{memory}, {platform.system()} {platform.release()}, "
        f"{platform.python_implementation()} {platform.python_version()}"
    )


def commit() -> str:
    """The checkout's commit, and whether gateway/ or worker/ differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "gateway", "worker", "proto"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "an unknown commit"
    return f"commit `{head}`" + (" with uncommitted changes to its gateway or worker" if dirty else "")


def redis_version(url: str) -> str:
    with redis.Redis.from_url(url) as client:
        return str(client.info("server")["redis_version"])


class RedisLog:
    """Reads what Redis logged since the last look, to tie clients it closed to a session."""

    def __init__(self, server: RedisProcess) -> None:
        self.path = Path(server.dir) / "redis.log"
        self.offset = 0

    def closed_clients(self) -> list[str]:
        """The ``flags=`` of each client Redis closed for its output buffer limit since the last call."""
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                text = f.read().decode(errors="replace")
                self.offset = f.tell()
        except OSError:
            return []
        return [
            next((w.removeprefix("flags=") for w in line.split() if w.startswith("flags=")), "?")
            for line in text.splitlines()
            if "output buffer limits" in line
        ]


def summary(results: Results, plan: Plan) -> str:
    """Medians as a plain table, one row per system (``-`` where a figure is missing)."""
    columns = [
        ("batched/s", "batched"),
        ("unary/s", "unary"),
        ("client/s", "client"),
        ("p50_ms", "p50"),
        ("p99_ms", "p99"),
        *((f"w{w}/s", f"workers:{w}") for w in plan.sweep_workers),
        *((f"{b}B/s", f"payload:{b}") for b in plan.payloads),
        ("bytes/job", "bytes_per_job"),
        ("rss_idle_MB", "rss_idle"),
        ("rss_streams_MB", "rss_streams"),
    ]
    lines = ["system    " + " ".join(f"{title:>14}" for title, _ in columns)]
    for system in results.systems:
        cells = []
        for _, measure in columns:
            m = results.median(system, measure)
            cells.append(f"{'-' if m is None else f'{m:.2f}':>14}")
        lines.append(f"{system:<9} " + " ".join(cells))
    cpu = [f"{m} {v:,.0f}" for m in (*CPU_PROCESSES, "all") if (v := results.median("jobgate", f"cpu:{m}")) is not None]
    if cpu:
        lines.append("jobgate CPU µs per batched job: " + ", ".join(cpu))
    machine = [f"{m} {v:,.2f}" for m in reference.NAMES if (v := results.median(MACHINE, m)) is not None]
    if machine:
        lines.append("machine:  " + ", ".join(machine))
    return "\n".join(lines)


def write_report(results: Results, plan: Plan, redis_url: str) -> None:
    from bench import charts, report

    drawn = charts.draw(results, CHARTS, list(plan.sweep_workers), list(plan.payloads))
    ctx = report.Context(
        when=datetime.date.today().isoformat(),
        machine=machine(),
        commit=commit(),
        redis=redis_version(redis_url),
        rounds=plan.rounds,
        workers=plan.workers,
        plan={k: v for k, v in asdict(plan).items() if isinstance(v, int)},
        payloads=plan.payloads,
        sweep=list(plan.sweep_workers),
        charts=drawn,
        docs=DOCS,
    )
    REPORT.write_text(report.render(results, ctx))
    print(f"wrote {REPORT.relative_to(ROOT)} and {len(drawn)} charts in {CHARTS.relative_to(ROOT)}/", flush=True)


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="rounds of every measurement (default 3)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)}")
    parser.add_argument("--quick", action="store_true", help="tiny counts and 1 round: a smoke test")
    parser.add_argument("--no-report", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    if unknown := [n for n in names if n not in SYSTEMS]:
        parser.error(f"unknown systems: {', '.join(unknown)} (known: {', '.join(SYSTEMS)})")
    plan = QUICK if args.quick else Plan()
    if args.rounds is not None:
        plan = Plan(**{**asdict(plan), "rounds": args.rounds})
    began = time.monotonic()
    # SIGTERM (e.g. from make being stopped) unwinds like Ctrl-C, so every worker process and the
    # private Redis are stopped on the way out.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    server = RedisProcess().start()
    try:
        bench = Bench(plan, names, server.url, RedisLog(server), server.pid)
        bench.queued()
        for r in range(1, plan.rounds + 1):
            bench.round(r)
        results = bench.results
        print(f"\nmedians over {plan.rounds} round(s), {time.monotonic() - began:.0f}s in all", flush=True)
        print(summary(results, plan), flush=True)
        for name in names:
            for failure in results.failures.get(name, []):
                print(f"failed: {name}: {failure}", flush=True)
        for note in results.notes:
            print(f"note: {note}", flush=True)
        if not args.no_report:
            write_report(results, plan, server.url)
    finally:
        server.stop()
    measured = any(results.values(n, "batched") for n in names)
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main())
