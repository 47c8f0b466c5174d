"""jobgate: submit, follow and inspect jobs from a terminal.

Every command talks to one gateway (--gateway, or JOBGATE_GATEWAY; 127.0.0.1:50051 by default)
through the Python client. Output is for people (tables, colour when the terminal has it) unless
--json asks for one JSON document per line, for scripts.

Exit codes: 0 done (for submit --wait and run: the job SUCCEEDED); 1 the job FAILED or was
CANCELLED; 2 a usage error (a bad flag, malformed JSON); 3 the gateway refused the call (a bad
field, not found, not allowed: the message says why); 4 no gateway answered (UNAVAILABLE) or a
deadline passed; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import enum
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from jobgate_client import (
    Client,
    DeadlineExceeded,
    Event,
    Job,
    JobgateError,
    JobState,
    QueueStats,
    Schedule,
    Unavailable,
    Worker,
)

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_REFUSED, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

STATE_STYLE = {
    JobState.QUEUED: "cyan",
    JobState.SCHEDULED: "blue",
    JobState.BLOCKED: "magenta",
    JobState.DISPATCHED: "yellow",
    JobState.RUNNING: "yellow",
    JobState.SUCCEEDED: "green",
    JobState.FAILED: "red",
    JobState.CANCELLED: "bright_black",
}

EXAMPLES = {
    "submit": 'jobgate submit echo \'{"hello": "world"}\'\n  jobgate submit sleep \'{"seconds": 3}\' --wait',
    "run": "jobgate run sleep '{\"seconds\": 1}'",
    "get": "jobgate get 3f2a...",
    "cancel": "jobgate cancel 3f2a...",
    "retry": "jobgate retry 3f2a...",
    "jobs": "jobgate jobs --queue default --state FAILED --limit 20",
    "watch": "jobgate watch --queue default",
    "workers": "jobgate workers",
    "queues": "jobgate queues",
    "pause": "jobgate pause emails",
    "resume": "jobgate resume emails",
    "schedules": (
        "jobgate schedules\n  jobgate schedules pause nightly-report\n  jobgate schedules trigger nightly-report"
    ),
    "top": "jobgate top --interval 1",
}


class UsageError(Exception):
    """A bad argument the parser could not catch (malformed JSON, a bad label)."""


# --- rendering -------------------------------------------------------------------------------
def _state(state: JobState | None) -> Text:
    name = state.name if state else "-"
    return Text(name, style=STATE_STYLE.get(state, "")) if state else Text(name)


def _when(t: datetime | None) -> str:
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _ago(t: datetime | None) -> str:
    if t is None:
        return "-"
    return _duration(datetime.now(UTC) - t)


def _duration(d: timedelta | None) -> str:
    if d is None:
        return "-"
    s = d.total_seconds()
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, separators=(",", ":")) if value is not None else ""
    return text if len(text) <= width else text[: width - 1] + "…"


def plain(value: Any) -> Any:
    """A client value (a Job, an Event, QueueStats, ...) as JSON-ready values: states by name,
    times in ISO 8601, durations in seconds, bytes in base64, messages as protobuf's JSON (with the
    proto's field names, as the rest)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "raw"}
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, Message):
        return json_format.MessageToDict(value, preserving_proto_field_name=True)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def jobs_table(jobs: Sequence[Job], title: str = "") -> Table:
    table = Table(title=title or None, header_style="bold")
    for col in ("id", "kind", "state", "attempt", "created", "worker", "result / error / why it waits"):
        table.add_column(col, overflow="fold" if col == "id" else "ellipsis")
    for j in jobs:
        detail = (
            str(j.error)
            if j.error and j.state in (JobState.FAILED, JobState.CANCELLED)
            else (_short(j.result) if j.state is JobState.SUCCEEDED else j.waiting_reason)
        )
        table.add_row(
            j.id, j.kind, _state(j.state), f"{j.attempt}/{j.max_attempts}", _when(j.created_at), j.worker_id, detail
        )
    return table


def job_panel(job: Job) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    rows: list[tuple[str, Any]] = [
        ("id", job.id),
        ("queue / kind", f"{job.queue} / {job.kind}"),
        ("state", _state(job.state)),
        ("attempt", f"{job.attempt} of {job.max_attempts}"),
        ("args", _short(job.args, 200)),
        ("created", _when(job.created_at)),
        ("started", _when(job.started_at)),
        ("finished", _when(job.finished_at)),
    ]
    if job.due_at:
        rows.append(("due", _when(job.due_at)))
    if job.worker_id:
        rows.append(("worker", job.worker_id))
    if job.state is JobState.SUCCEEDED:
        rows.append(("result", _short(job.result, 200)))
    if job.error:
        rows.append(("error", Text(str(job.error), style="red")))
    if job.progress:
        rows.append(("progress", f"{job.progress.fraction:.0%} {job.progress.message}"))
    if job.waiting_reason:
        rows.append(("waiting", job.waiting_reason))
    for a in job.attempts:
        rows.append((f"attempt {a.attempt}", Text.assemble(_state(a.state), f" on {a.worker_id} ", str(a.error or ""))))
    for name, value in rows:
        table.add_row(name, value)
    return table


def queues_table(stats: Sequence[QueueStats]) -> Table:
    table = Table(header_style="bold")
    for col in (
        "queue",
        "waiting",
        "scheduled",
        "running",
        "blocked",
        "succeeded",
        "failed",
        "dead",
        "ended/min (1m 5m 15m)",
        "oldest wait",
        "workers",
        "slots",
        "",
    ):
        table.add_column(col, justify="left" if col in ("queue", "") else "right")
    for s in stats:
        rates = " ".join(f"{r:.1f}" for r in s.ended_per_minute)
        flags = Text("paused", style="bold yellow") if s.paused else Text("")
        table.add_row(
            s.queue,
            str(s.waiting),
            str(s.scheduled),
            str(s.running),
            str(s.blocked),
            str(s.succeeded),
            Text(str(s.failed), style="red" if s.failed else ""),
            str(s.dead_letters),
            rates,
            _duration(s.oldest_waiting_age),
            str(s.workers),
            str(s.slots),
            flags,
        )
    return table


def workers_table(workers: Sequence[Worker]) -> Table:
    table = Table(header_style="bold")
    for col in ("worker", "queues", "kinds", "busy", "labels", "host", "pid", "last heartbeat"):
        table.add_column(col)
    for w in workers:
        busy = Text(f"{w.busy}/{w.slots}", style="yellow" if w.busy >= w.slots else "green")
        labels = ",".join(f"{k}={v}" for k, v in sorted(w.labels.items()))
        table.add_row(
            w.id, ",".join(w.queues), ",".join(w.kinds) or "(all)", busy, labels, w.host, str(w.pid), _ago(w.last_seen)
        )
    return table


def schedules_table(schedules: Sequence[Schedule]) -> Table:
    table = Table(header_style="bold")
    for col in ("name", "when", "kind", "queue", "next run", "paused"):
        table.add_column(col)
    for s in schedules:
        when = f"cron {s.cron} ({s.time_zone or 'UTC'})" if s.cron else f"every {_duration(s.interval)}"
        table.add_row(
            s.name,
            when,
            s.job.kind,
            s.job.queue or "default",
            _when(s.next_runs[0]) if s.next_runs else "-",
            Text("paused", style="yellow") if s.paused else "",
        )
    return table


def sparkline(values: Sequence[int]) -> str:
    bars = "▁▂▃▄▅▆▇█"
    top = max(values) if values else 0
    if not top:
        return "▁" * len(values)
    return "".join(bars[min(len(bars) - 1, v * (len(bars) - 1) // top)] for v in values)


# --- commands --------------------------------------------------------------------------------
class Cli:
    """One invocation: its arguments, console and client."""

    def __init__(self, args: argparse.Namespace, client: Client, console: Console) -> None:
        self.args = args
        self.client = client
        self.console = console

    def emit(self, value: Any) -> None:
        """One JSON document, on its own line."""
        print(json.dumps(value, default=str), flush=True)

    async def submit(self) -> int:
        a = self.args
        job = await self.client.submit(a.kind, _json_arg(a.args), **_job_options(a))
        if not a.wait:
            if a.json:
                self.emit(plain(job))
            else:
                self.console.print(Text.assemble("submitted ", (job.id, "bold"), " ", _state(job.state)))
            return EXIT_OK
        return await self._follow(job)

    async def _follow(self, job: Job) -> int:
        outcome: Event | None = None
        if self.args.json:
            async for e in self.client.watch([job.id], progress=True):
                self.emit(plain(e))
                outcome = e if e.terminal else outcome
        else:
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[note]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            ) as bar:
                task = bar.add_task(f"{job.kind} {job.id[:8]}", total=1.0, note=str(job.state))
                async for e in self.client.watch([job.id], progress=True):
                    if e.progress:
                        bar.update(task, completed=e.progress.fraction, note=e.progress.message)
                    if e.terminal:
                        outcome = e
                        bar.update(task, completed=1.0)
            self._print_outcome(outcome)
        return EXIT_OK if outcome and outcome.state is JobState.SUCCEEDED else EXIT_JOB_FAILED

    def _print_outcome(self, e: Event | None) -> None:
        if e is None:
            return
        detail = _short(e.result, 200) if e.state is JobState.SUCCEEDED else str(e.error or "")
        self.console.print(Text.assemble((e.job_id, "bold"), " ", _state(e.state), " ", detail))

    async def run(self) -> int:
        a = self.args
        outcome: Event | None = None
        async for e in self.client.run(a.kind, _json_arg(a.args), **_job_options(a)):
            if a.json:
                self.emit(plain(e))
            elif e.progress:
                self.console.print(f"  {e.progress.fraction:.0%} {e.progress.message}")
            elif e.terminal:
                self._print_outcome(e)
            else:
                self.console.print(Text.assemble((e.job_id, "bold"), " ", _state(e.state), f" {e.worker_id}"))
            outcome = e if e.terminal else outcome
        return EXIT_OK if outcome and outcome.state is JobState.SUCCEEDED else EXIT_JOB_FAILED

    async def get(self) -> int:
        job = await self.client.get(self.args.id)
        if self.args.json:
            self.emit(plain(job))
        else:
            self.console.print(job_panel(job))
        return EXIT_OK

    async def cancel(self) -> int:
        job = await self.client.cancel(self.args.id)
        if self.args.json:
            self.emit(plain(job))
        elif job.state is JobState.CANCELLED:
            self.console.print(Text.assemble("cancelled ", (job.id, "bold")))
        else:
            self.console.print(Text.assemble((job.id, "bold"), " is running: its worker was told to stop it"))
        return EXIT_OK

    async def retry(self) -> int:
        job = await self.client.retry_job(self.args.id)
        if self.args.json:
            self.emit(plain(job))
        else:
            self.console.print(Text.assemble("queued again ", (job.id, "bold"), " ", _state(job.state)))
        return EXIT_OK

    async def jobs(self) -> int:
        a = self.args
        states = [JobState[s] for s in a.state]
        found: list[Job] = []
        async for job in self.client.iter_jobs(a.queue, states=states, kind=a.kind, page_size=min(a.limit, 1000)):
            found.append(job)
            if len(found) >= a.limit:
                break
        if a.json:
            for job in found:
                self.emit(plain(job))
        else:
            self.console.print(jobs_table(found, f"{a.queue}: {len(found)} job(s), newest first"))
        return EXIT_OK

    async def watch(self) -> int:
        a = self.args
        rows: list[Event] = []
        stream = self.client.watch(a.ids, queue=a.queue, kinds=a.kind)
        if a.json:
            async for e in stream:
                self.emit(plain(e))
            return EXIT_OK

        def render() -> Table:
            table = Table(title=f"completions ({len(rows)})", header_style="bold")
            for col in ("time", "job", "queue", "kind", "state", "worker", "result / error"):
                table.add_column(col)
            for e in rows[-a.rows :]:
                detail = _short(e.result) if e.state is JobState.SUCCEEDED else str(e.error or "")
                table.add_row(_when(e.time), e.job_id[:12], e.queue, e.kind, _state(e.state), e.worker_id, detail)
            return table

        with Live(render(), console=self.console, auto_refresh=False) as live:
            live.refresh()
            async for e in stream:
                if e.terminal:
                    rows.append(e)
                    live.update(render(), refresh=True)
        return EXIT_OK

    async def workers(self) -> int:
        found = await self.client.workers()
        if self.args.json:
            for w in found:
                self.emit(plain(w))
        else:
            self.console.print(workers_table(found))
        return EXIT_OK

    async def queues(self) -> int:
        stats = await self.client.queue_stats(self.args.queues)
        if self.args.json:
            for s in stats:
                self.emit(plain(s))
        else:
            self.console.print(queues_table(stats))
        return EXIT_OK

    async def pause(self) -> int:
        already = await self.client.pause(self.args.queue)
        return self._said(f"queue {self.args.queue} {'was already' if already else 'is now'} paused", already)

    async def resume(self) -> int:
        already = await self.client.resume(self.args.queue)
        return self._said(f"queue {self.args.queue} {'was not' if already else 'is no longer'} paused", already)

    def _said(self, text: str, already: bool) -> int:
        if self.args.json:
            self.emit({"queue": self.args.queue, "already": already})
        else:
            self.console.print(text)
        return EXIT_OK

    async def schedules(self) -> int:
        a = self.args
        if a.action != "list":
            if not a.name:
                raise UsageError(f"schedules {a.action}: name the schedule")
            if a.action == "delete":
                await self.client.delete_schedule(a.name)
                return self._said(f"schedule {a.name} deleted", False) if not a.json else EXIT_OK
            if a.action == "trigger":
                job = await self.client.trigger_schedule(a.name)
                if a.json:
                    self.emit(plain(job))
                    return EXIT_OK
                return self._said(f"schedule {a.name} triggered: job {job.id} {job.state}", False)
            act = {"pause": self.client.pause_schedule, "resume": self.client.resume_schedule}[a.action]
            found = [await act(a.name)]
        else:
            found = await self.client.schedules()
        if a.json:
            for s in found:
                self.emit(plain(s))
        else:
            self.console.print(schedules_table(found))
        return EXIT_OK

    async def top(self) -> int:
        a = self.args

        async def frame() -> Group:
            stats, workers = await asyncio.gather(self.client.queue_stats(), self.client.workers())
            slots = sum(w.slots for w in workers)
            busy = sum(w.busy for w in workers)
            head = Text.assemble(
                ("jobgate top", "bold"),
                f"  {self.client.target}  {datetime.now().strftime('%H:%M:%S')}  ",
                f"workers {len(workers)}  slots {busy}/{slots} busy  ",
                ("(Ctrl-C to quit)", "bright_black"),
            )
            activity = Table(header_style="bold", title="ended per minute, last hour")
            activity.add_column("queue")
            activity.add_column("last 60 minutes")
            for s in stats:
                activity.add_row(s.queue, sparkline(s.ended_by_minute))
            return Group(head, queues_table(stats), activity, workers_table(workers))

        with Live(await frame(), console=self.console, auto_refresh=False, screen=a.screen) as live:
            for _ in range(a.iterations or 1_000_000_000):
                live.update(await frame(), refresh=True)
                await asyncio.sleep(a.interval)
        return EXIT_OK


def _json_arg(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"args: not JSON ({exc.msg} at character {exc.pos})") from None


def _job_options(a: argparse.Namespace) -> dict[str, Any]:
    labels = {}
    for pair in a.label:
        name, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"--label {pair!r}: write it as name=value")
        labels[name] = value
    options: dict[str, Any] = {
        "queue": a.queue,
        "priority": a.priority,
        "max_attempts": a.max_attempts,
        "labels": labels,
        "depends_on": a.depends_on,
        "concurrency_key": a.concurrency_key,
        "unique_key": a.unique_key,
        "idempotency_key": a.idempotency_key,
    }
    if a.delay is not None:
        options["delay"] = a.delay
    if a.timeout_s is not None:
        options["timeout"] = a.timeout_s
    return options


# --- the parser ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobgate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    env = os.environ.get
    parser.add_argument(
        "--gateway",
        default=env("JOBGATE_GATEWAY", "127.0.0.1:50051"),
        help="the gateway's address, host:port (env JOBGATE_GATEWAY; default %(default)s)",
    )
    parser.add_argument("--token", default=env("JOBGATE_TOKEN"), help="bearer token (env JOBGATE_TOKEN; default none)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs (default off)")
    parser.add_argument("--ca", metavar="PEM", help="connect with TLS, trusting this CA certificate (default none)")
    parser.add_argument("--timeout", type=float, default=10.0, help="each call's deadline in seconds (default 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON document per line instead of tables")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=text,
            description=text,
            epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    def job_fields(p: argparse.ArgumentParser) -> None:
        p.add_argument("kind", help="the handler's name")
        p.add_argument("args", nargs="?", help="the job's args, as JSON (default none)")
        p.add_argument("--queue", "-q", default="", help="queue (default: default)")
        p.add_argument("--priority", type=int, default=0, help="0-255, higher first (default 0)")
        p.add_argument("--max-attempts", type=int, default=0, help="1-100 (default: the queue's, 3)")
        p.add_argument("--delay", type=float, help="run no earlier than this many seconds from now")
        p.add_argument("--job-timeout", dest="timeout_s", type=float, help="per-attempt time limit, seconds")
        p.add_argument("--label", action="append", default=[], metavar="NAME=VALUE", help="a worker label it needs")
        p.add_argument("--depends-on", action="append", default=[], metavar="ID", help="a job that must succeed first")
        p.add_argument("--concurrency-key", default="", help="its concurrency key (fair turns, per-key limits)")
        p.add_argument("--unique-key", default="", help="refuse it while a job with this key is unfinished")
        p.add_argument("--idempotency-key", default="", help="the same key and request give back the same job")

    p = command("submit", "Store a job; with --wait, follow it to its outcome with a progress bar.")
    job_fields(p)
    p.add_argument("--wait", "-w", action="store_true", help="wait for the outcome (exit 1 unless it SUCCEEDED)")
    p = command("run", "Store a job and print each of its events until its outcome (exit 1 unless it SUCCEEDED).")
    job_fields(p)
    for name, text in (
        ("get", "Show a job: state, args, result or error, every attempt, progress, why it waits."),
        ("cancel", "Cancel a job (a running one is told to stop)."),
        ("retry", "Put a FAILED or CANCELLED job back in its queue."),
    ):
        command(name, text).add_argument("id", help="the job's id")
    p = command("jobs", "List a queue's jobs, newest first.")
    p.add_argument("--queue", "-q", default="default", help="queue (default: default)")
    p.add_argument(
        "--state", "-s", action="append", default=[], choices=[s.name for s in JobState], help="only this state"
    )
    p.add_argument("--kind", "-k", default="", help="only this kind")
    p.add_argument("--limit", "-n", type=int, default=50, help="at most this many (default 50)")
    p = command("watch", "A live table of completions (of the jobs named, or of a queue, or of all).")
    p.add_argument("ids", nargs="*", help="job ids (it ends when they have all ended)")
    p.add_argument("--queue", "-q", default="", help="only this queue")
    p.add_argument("--kind", "-k", action="append", default=[], help="only this kind")
    p.add_argument("--rows", type=int, default=20, help="completions shown (default 20)")
    command("workers", "List the live workers: queues, kinds, busy slots, labels, last heartbeat.")
    p = command("queues", "Show each queue: waiting, running, ended, rates, oldest wait, workers.")
    p.add_argument("queues", nargs="*", help="queue names (default: every queue)")
    for name, text in (("pause", "Pause a queue: jobs are stored, none placed."), ("resume", "Resume a paused queue.")):
        command(name, text).add_argument("queue", help="the queue")
    p = command("schedules", "List periodic schedules, or pause, resume, trigger (run now) or delete one.")
    p.add_argument("action", nargs="?", default="list", choices=["list", "pause", "resume", "trigger", "delete"])
    p.add_argument("name", nargs="?", help="the schedule (for pause, resume, trigger, delete)")
    p = command("top", "A live view of queues, rates, workers and slots, refreshed in place.")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    p.add_argument("--iterations", type=int, default=0, help="stop after this many refreshes (default: never)")
    p.add_argument("--no-screen", dest="screen", action="store_false", help="draw in the scrollback, not full screen")
    return parser


async def _main(args: argparse.Namespace, console: Console, root: bytes | None) -> int:
    async with Client(args.gateway, token=args.token, tls=args.tls, root_certificates=root, timeout=args.timeout) as c:
        cli = Cli(args, c, console)
        handler: Callable[[], Coroutine[Any, Any, int]] = getattr(cli, args.command)
        return await handler()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=False, highlight=False)
    errors = Console(stderr=True, highlight=False)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        root = Path(args.ca).read_bytes() if args.ca else None
        return asyncio.run(_main(args, console, root))
    except UsageError as exc:
        errors.print(f"jobgate: {exc}", style="red")
        return EXIT_USAGE
    except (Unavailable, DeadlineExceeded) as exc:
        errors.print(f"jobgate: {exc} (gateway {args.gateway})", style="red")
        return EXIT_UNAVAILABLE
    except JobgateError as exc:
        errors.print(f"jobgate: {exc}", style="red")
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except OSError as exc:
        errors.print(f"jobgate: {exc}", style="red")
        return EXIT_USAGE


def cli() -> None:
    sys.exit(main())
