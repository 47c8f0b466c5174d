"""The benchmark harness, run as ``make bench`` runs it but with tiny counts and jobgate alone (the
peers live in .bench-venv, not in this environment). Timing belongs to the benchmark; this test
checks that a run completes and that its figures are plausible, never how fast they are."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import reference, report
from bench.results import MACHINE, Results

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "BENCHMARKS.md"


def summary_row(stdout: str, system: str) -> dict[str, float]:
    """The row of the run's closing summary table for ``system``, by column title."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("system "))
    titles = lines[header].split()[1:]
    row = next(line.split() for line in lines[header + 1 :] if line.split()[:1] == [system])
    return {title: float(cell) for title, cell in zip(titles, row[1:], strict=True) if cell != "-"}


def run_module(*args: str, timeout: float) -> tuple[str, str]:
    """``python -m <args>`` from the project's root, which must succeed: its stdout, and the ends of
    its stdout and stderr to show when an assertion fails."""
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    output = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, output
    return result.stdout, output


def run_of(scale: float) -> Results:
    """A run's figures where jobgate's rates are ``scale`` times the 2026-12-05 run's (its
    latencies and memory 1/scale times), beside that run's peers and references."""
    results = Results(systems=["jobgate", "dramatiq"])
    for measure, value in {
        "batched": 6653,
        "client": 3654,
        "unary": 1546,
        "payload:100000": 807,
        "payload:10000": 3403,
    }.items():
        results.add("jobgate", measure, value * scale)
    for measure, value in {"p50": 3.45, "p99": 7.81, "rss_streams": 405.0, "bytes_per_job": 723}.items():
        results.add("jobgate", measure, value / scale)
    for measure, value in {
        "batched": 2636,
        "unary": 2593,
        "payload:100000": 714,
        "payload:10000": 1750,
    }.items():
        results.add("dramatiq", measure, value)
    for measure, value in {
        "relay_pipelined": 28551,
        "grpc_unary": 4075,
        "relayed_unary": 1856,
        "grpc_p50": 1.13,
        "grpc_p99": 1.64,
        "relayed_p50": 1.68,
        "relayed_p99": 2.33,
        "grpc_rss_streams": 317.3,
    }.items():
        results.add(MACHINE, measure, value)
    return results


def test_the_report_gives_every_missed_target_its_note_and_none_to_met_ones() -> None:
    # Notes are chosen by each target's key, not by its text: a reworded target keeps its note.
    slow = report.targets(run_of(0.1))
    assert all(t.met is False for t in slow), slow
    assert len({t.key for t in slow}) == 8  # the two batched targets share a note, as do the two RunJob ones
    notes = report._between(run_of(0.1), slow)
    for topic in (
        "Memory with 10,000",
        "`RunJob`",
        "Raw `SubmitJob`",
        "The Python client's `submit`",
        "Batched and 10 KB",
        "100 KB payloads",
    ):
        assert f"**{topic}" in notes, (topic, notes)
    assert "gRPC in front of the bare relay" in notes and "46% of gRPC alone's calls" in notes, notes

    fast = report.targets(run_of(10))
    assert all(t.met for t in fast), fast
    assert report._between(run_of(10), fast) == "Every target is met in this run."

    today = report.targets(run_of(1))
    assert [t.key for t in today if t.met] == ["100kb", "redis_bytes"], today
    notes = report._between(run_of(1), today)
    assert "**100 KB payloads" not in notes and "**Batched and 10 KB" in notes, notes


@pytest.mark.slow
def test_quick_benchmark_run_completes_with_plausible_figures_and_leaves_docs_alone() -> None:
    report_before = REPORT.read_bytes() if REPORT.exists() else None
    stdout, output = run_module("bench.run", "--systems", "jobgate", "--quick", "--no-report", timeout=110)
    assert "FAILED" not in stdout, output

    figures = summary_row(stdout, "jobgate")
    for throughput in ("batched/s", "unary/s", "client/s", "w1/s", "w2/s", "w4/s", "100B/s", "10000B/s", "100000B/s"):
        assert figures.get(throughput, 0) > 0, (throughput, output)
    assert 0 < figures["p50_ms"] <= figures["p99_ms"], output
    assert figures["bytes/job"] > 0, output
    assert 0 < figures["rss_idle_MB"] and 0 < figures["rss_streams_MB"], output
    assert (REPORT.read_bytes() if REPORT.exists() else None) == report_before

    # jobgate's CPU per batched job, by process (from /proc while the batched figure was measured)
    cpu_line = next(line for line in stdout.splitlines() if line.startswith("jobgate CPU µs per batched job:"))
    cpu = dict(item.rsplit(" ", 1) for item in cpu_line.split(":", 1)[1].strip().split(", "))
    assert set(cpu) == {"redis", "gateway", "workers", "client", "all"}, output
    per_process = {name: float(v.replace(",", "")) for name, v in cpu.items()}
    assert all(v > 0 for v in per_process.values()), output
    parts = sum(v for name, v in per_process.items() if name != "all")
    assert abs(per_process["all"] - parts) <= 5, output  # each part rounded to the µs

    machine = next(line for line in stdout.splitlines() if line.startswith("machine:"))
    pace = dict(item.rsplit(" ", 1) for item in machine.removeprefix("machine:").strip().split(", "))
    assert set(pace) == set(reference.NAMES) and "relayed_p50" in pace, output
    assert all(float(v.replace(",", "")) > 0 for v in pace.values()), output
    assert float(pace["grpc_p50"]) <= float(pace["grpc_p99"].replace(",", "")), output
    assert float(pace["relayed_p50"]) <= float(pace["relayed_p99"].replace(",", "")), output


@pytest.mark.slow
def test_a_curve_measured_without_report_prints_its_points_and_leaves_docs_alone() -> None:
    docs = ROOT / "docs"
    before = {p: p.read_bytes() for p in [docs / "CURVES.md", *(docs / "bench").glob("curve*")]}
    stdout, output = run_module("bench.curves", "--curves", "queues", "--points", "1,10", "--jobs", "1000", timeout=110)
    measured = [line for line in stdout.splitlines() if line.startswith("queues ")]
    assert [line.split(":")[0].split()[-1] for line in measured] == ["1", "10"], output
    assert all(float(re.search(r"([\d,]+) µs/job", line)[1].replace(",", "")) > 0 for line in measured), output
    assert {p: p.read_bytes() for p in before} == before
    assert sorted((docs / "bench").glob("curve*")) == sorted(p for p in before if p.name.startswith("curve"))


@pytest.mark.slow
def test_the_cluster_benchmark_measures_one_redis_and_every_node_of_a_cluster() -> None:
    stdout, output = run_module("bench.cluster", "--jobs", "2000", timeout=110)
    single, rest = stdout.split("a local Redis Cluster")
    cluster, spread = rest.split("the same cluster, redis_shards=")
    for part, nodes in ((single, 1), (cluster, 6), (spread, 6)):
        assert "2,000 jobs in" in part, output
        rows = [line.split() for line in part.splitlines() if line.strip().startswith(("redis", "primary", "replica"))]
        assert len(rows) == nodes, output
        redis_all = next(line.split() for line in part.splitlines() if "Redis, all nodes" in line)
        assert float(redis_all[-2]) > 0 and float(redis_all[-1]) > 1, output  # µs and commands per job
    primaries = [line.split() for line in spread.splitlines() if line.strip().startswith("primary")]
    assert all(float(row[-1]) > 0.5 for row in primaries), output  # the spread namespace works every primary
    namespace = next(line.split() for line in cluster.splitlines() if "(namespace)" in line)
    assert float(namespace[-1]) > 1, output  # the namespace's shard ran its commands


@pytest.mark.slow
def test_the_due_lag_benchmark_follows_every_delayed_job_to_its_start() -> None:
    stdout, output = run_module("bench.due_lag", "--jobs", "300", "--ahead-s", "2", "--out", "-", timeout=150)
    rows = {
        cells[1]: [float(c.replace(",", "")) for c in cells[2:5]]
        for line in stdout.splitlines()
        if line.startswith(("| queued", "| started", "| reference")) and (cells := line.split("|"))
    }
    assert len(rows) == 5, output
    for name, (p50, p99, last) in rows.items():
        assert 0 <= p50 <= p99 <= last, (name, output)  # every job was followed to its start


QUICK_SETTLE = ("--settle-s", "0")


def test_the_flow_control_benchmark_runs_every_shape_to_the_last_job() -> None:
    stdout, output = run_module(
        "bench.limits", "--jobs", "600", "--backlog", "2000", "--rounds", "1", *QUICK_SETTLE, timeout=240
    )
    times = "\N{MULTIPLICATION SIGN}"
    rows = [line.split("|") for line in stdout.splitlines() if line.startswith("| ") and times in line]
    assert len(rows) == 7 and rows[0][1].strip() == "plain" and rows[0][4].strip() == f"1.00{times}", output
    for row in rows:
        assert float(row[2]) > 5 and float(row[3]) > 0 and float(row[5].replace(",", "")) > 0, output


@pytest.mark.slow
def test_the_grpc_floor_leaves_the_benchmark_process_clean_for_the_system_measured_next(
    redis_url: str, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The machine's references run before the next round's first system, jobgate: their gRPC
    clients must leave nothing in the benchmark's process that works while jobgate is measured
    (grpc.aio once raised 'Event loop is closed' there on every completion, with a traceback)."""
    from bench import grpc_floor
    from bench.systems.jobgate import Jobgate

    [(rate, p50, p99)] = grpc_floor.floor(200, 20)
    assert rate > 0 and 0 < p50 <= p99
    assert grpc_floor.stream_rss(50, 1) > 0
    system = Jobgate(redis_url)
    try:
        system.start(1)
        assert system.batched(500) > 0
    finally:
        system.stop()
    err = capfd.readouterr().err + caplog.text  # asyncio reports a callback's exception through logging
    assert "Event loop is closed" not in err and "Exception in callback" not in err, err[-2000:]


def test_the_profile_reports_each_process_and_redis_time_by_script() -> None:
    """``python -m bench.profile batched --scripts`` (a small run): CPU per job for every process of
    the stack, and Redis's own time by script, the submit and finish_many scripts among them."""
    stdout, output = run_module("bench.profile", "batched", "--jobs", "2000", "--scripts", timeout=120)
    per_job = {
        line.split()[0] + (" " + line.split()[1] if line.startswith("worker") else ""): float(line.split()[-1])
        for line in stdout.splitlines()
        if re.match(r"(redis|gateway|client|worker \d|all) +\d+% +\d+$", line)
    }
    assert set(per_job) == {"redis", "gateway", "client", "worker 1", "worker 2", "all"}, output
    assert all(v > 0 for v in per_job.values()), output
    scripts = {line.split()[0]: line.split()[1:] for line in stdout.split("Redis, by command", 1)[1].splitlines()[1:]}
    for name in ("submit", "finish_many"):
        assert name in scripts, output
        calls, per_call, per_job_us = scripts[name]
        assert int(calls.replace(",", "")) > 0 and float(per_call) > 0 and float(per_job_us) > 0, output


CONTEXT = report.Context(
    when="2026-12-05",
    machine="AMD EPYC, 2 cores",
    commit="0000000",
    redis="7.0.15",
    rounds=2,
    workers=2,
    plan={"batched": 10_000, "unary": 2_000, "clients": 32, "trips": 300, "sweep": 10_000, "queued": 10_000}
    | {"streams": 10_000, "channels": 100},
    payloads={100: 10_000},
    sweep=[1, 2, 4],
    charts={},
    docs=ROOT / "docs",
)


def test_the_report_shows_jobgates_cpu_per_batched_job_by_process() -> None:
    results = run_of(1)
    plain = report.render(results, CONTEXT)
    assert "CPU µs per batched job" not in plain  # a run without the figure leaves the table out
    for name, values in {"redis": (120, 130), "gateway": (100, 110), "workers": (110, 120), "client": (12, 14)}.items():
        for v in values:
            results.add("jobgate", f"cpu:{name}", v)
    for v in (342, 374):
        results.add("jobgate", "cpu:all", v)
    text = report.render(results, CONTEXT)
    table = text.split("| process | CPU µs per batched job |", 1)[1].split("\n\n", 1)[0]
    dash = "\N{EN DASH}"  # as the report writes ranges
    assert f"| Redis | 125 (120{dash}130) |" in table and f"| the 2 workers | 115 (110{dash}120) |" in table, table
    assert f"| all | 358 (342{dash}374) |" in table, table
