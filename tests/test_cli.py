"""The ``jobgate`` command, through its installed entry point, against a real stack; its live views
(``top``, ``watch``) in a real terminal (tmux)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.devstack import Stack
from jobgate.v1 import scheduler_pb2
from jobgate_client import SyncClient, job_request

JOBGATE = Path(sys.executable).parent / "jobgate"


def jobgate(address: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(JOBGATE), "--gateway", address, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", "TERM": "dumb"},
    )


def lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


@pytest.fixture
def address(stack: Stack) -> str:
    _, address = stack.start_gateway()
    stack.start_worker("--concurrency", "4")
    return address


def test_submit_run_get_and_their_exit_codes(address: str) -> None:
    done = jobgate(address, "submit", "echo", '{"x": 1}', "--wait")
    assert done.returncode == 0 and "SUCCEEDED" in done.stdout and '{"x":1}' in done.stdout, done
    failed = jobgate(address, "submit", "fail", '{"message": "nope"}', "--max-attempts", "1", "--wait")
    assert failed.returncode == 1 and "FAILED" in failed.stdout and "HANDLER_ERROR" in failed.stdout, failed

    [stored] = lines(jobgate(address, "--json", "submit", "echo", '{"y": 2}', "--queue", "default"))
    events = lines(jobgate(address, "--json", "run", "sleep", '{"seconds": 0.1}'))
    assert events[0]["state"] == "QUEUED" and events[-1]["state"] == "SUCCEEDED"
    time.sleep(0.5)
    [got] = lines(jobgate(address, "--json", "get", str(stored["id"])))
    assert got["state"] == "SUCCEEDED" and got["result"] == {"y": 2} and got["attempts"][0]["state"] == "SUCCEEDED"
    shown = jobgate(address, "get", str(stored["id"]))
    assert shown.returncode == 0 and "attempt 1" in shown.stdout and "SUCCEEDED" in shown.stdout

    refused = jobgate(address, "submit", "bad kind")
    assert refused.returncode == 3 and "INVALID_ARGUMENT: kind:" in refused.stderr, refused
    assert jobgate(address, "submit", "echo", "{not json").returncode == 2
    assert jobgate(address, "get", "0" * 32).returncode == 3
    assert jobgate(address, "frobnicate").returncode == 2
    nobody = jobgate("127.0.0.1:1", "--timeout", "1", "workers", timeout=120)
    assert nobody.returncode == 4 and "UNAVAILABLE" in nobody.stderr, nobody


def test_listings_queues_and_their_actions(address: str) -> None:
    assert jobgate(address, "pause", "reports").returncode == 0
    ids = [str(lines(jobgate(address, "--json", "submit", "echo", "--queue", "reports"))[0]["id"]) for _ in range(3)]
    listed = lines(jobgate(address, "--json", "jobs", "--queue", "reports", "--state", "QUEUED"))
    assert [j["id"] for j in listed] == ids[::-1]
    assert "is paused" in str(lines(jobgate(address, "--json", "get", ids[0]))[0]["waiting_reason"])
    table = jobgate(address, "jobs", "--queue", "reports")
    assert table.returncode == 0 and ids[0] in table.stdout and "QUEUED" in table.stdout
    [stats] = lines(jobgate(address, "--json", "queues", "reports"))
    assert stats["waiting"] == 3 and stats["paused"] is True
    assert "reports" in jobgate(address, "queues").stdout

    cancelled = lines(jobgate(address, "--json", "cancel", ids[0]))[0]
    assert cancelled["state"] == "CANCELLED"
    assert lines(jobgate(address, "--json", "retry", ids[0]))[0]["state"] == "QUEUED"
    assert jobgate(address, "resume", "reports").returncode == 0
    workers = lines(jobgate(address, "--json", "workers"))
    assert len(workers) == 1 and workers[0]["slots"] == 4
    assert "busy" in jobgate(address, "workers").stdout
    with SyncClient(address) as client:
        spec = scheduler_pb2.ScheduleSpec(name="nightly", cron="@daily", job=job_request("echo", {"n": 7}))
        client.create_schedule(spec)
    listed_schedules = jobgate(address, "schedules")
    assert listed_schedules.returncode == 0 and "nightly" in listed_schedules.stdout
    [triggered] = lines(jobgate(address, "--json", "schedules", "trigger", "nightly"))
    assert triggered["kind"] == "echo" and triggered["args"] == {"n": 7}
    [schedule] = lines(jobgate(address, "--json", "schedules"))
    assert schedule["recent_runs"][0]["job_id"] == triggered["id"]
    missing = jobgate(address, "schedules", "pause", "no-such-schedule")
    assert missing.returncode == 3 and "NOT_FOUND" in missing.stderr


@pytest.fixture
def tmux() -> Iterator[str]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    session = f"jobgate-{uuid.uuid4().hex[:8]}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50"], check=True, timeout=10)
    try:
        yield session
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], timeout=10, check=False)


def screen(session: str) -> str:
    return subprocess.run(
        ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True, timeout=10, check=True
    ).stdout


def wait_screen(session: str, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = screen(session)
        if text in shown:
            return shown
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never showed; the screen:\n{screen(session)}")


def test_top_and_watch_refresh_in_place_in_a_terminal(address: str, tmux: str) -> None:
    command = f"{JOBGATE} --gateway {address} top --interval 0.3"
    subprocess.run(["tmux", "send-keys", "-t", tmux, command, "Enter"], check=True, timeout=10)
    first = wait_screen(tmux, "jobgate top")
    assert "workers 1" in first and "slots 0/4 busy" in first
    for _ in range(3):
        jobgate(address, "submit", "sleep", '{"seconds": 8}')
    busy = wait_screen(tmux, "slots 3/4 busy")
    assert "│ default │" in busy and busy.count("jobgate top") == 1  # redrawn in place, not scrolled
    subprocess.run(["tmux", "send-keys", "-t", tmux, "C-c", ""], check=True, timeout=10)
    time.sleep(0.5)

    subprocess.run(["tmux", "send-keys", "-t", tmux, "clear", "Enter"], check=True, timeout=10)
    command = f"{JOBGATE} --gateway {address} watch --queue default"
    subprocess.run(["tmux", "send-keys", "-t", tmux, command, "Enter"], check=True, timeout=10)
    wait_screen(tmux, "completions (0)")
    jobgate(address, "submit", "echo", '{"seen": "on screen"}')
    shown = wait_screen(tmux, "completions (1)")
    assert '{"seen":"on screen"}' in shown and "SUCCEEDED" in shown
    subprocess.run(["tmux", "send-keys", "-t", tmux, "C-c", ""], check=True, timeout=10)


def test_every_command_has_help_with_an_example() -> None:
    top = subprocess.run([str(JOBGATE), "--help"], capture_output=True, text=True, timeout=30)
    assert top.returncode == 0 and "Exit codes" in top.stdout
    for command in ("submit", "run", "get", "cancel", "retry", "jobs", "watch", "workers", "queues", "pause",
                    "resume", "schedules", "top"):  # fmt: skip
        shown = subprocess.run([str(JOBGATE), command, "--help"], capture_output=True, text=True, timeout=30)
        assert shown.returncode == 0 and f"example:\n  jobgate {command}" in shown.stdout, (command, shown.stdout)
