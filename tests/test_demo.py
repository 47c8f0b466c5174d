"""The demo (`make run`): its flags, its help, and that it never leaves a process behind."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from devtools import demo

from .processes import children_of

ROOT = Path(__file__).resolve().parent.parent


def demo_env() -> dict[str, str]:
    """The test's environment without a Redis URL (so that the demo starts its own) and unbuffered."""
    env = {k: v for k, v in os.environ.items() if k != "JOBGATE_REDIS_URL"}
    return {**env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


def processes_marked(mark: str) -> set[int]:
    """Processes whose environment holds ``DEMO_TEST_MARK=<mark>``: the demo, its gateway and workers.

    Not redis-server: it writes its process title over its environment.
    """
    needle = f"DEMO_TEST_MARK={mark}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in (entry / "environ").read_bytes().split(b"\0"):
                found.add(int(entry.name))
        except OSError:  # gone meanwhile, or not ours
            continue
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def leftovers(mark: str, output: str, children: set[int]) -> list[int]:
    """What the demo started and left running: marked processes, the PIDs it printed, its children.

    The leftovers are killed, so that a failing test leaves nothing behind for the next one.
    """
    printed = {int(p) for p in re.findall(r"\(pid (\d+)\)", output)}
    left = sorted(p for p in processes_marked(mark) | printed | children if alive(p))
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def start_demo(*args: str, mark: str, new_group: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "devtools.demo", *args],
        cwd=ROOT,
        env={**demo_env(), "DEMO_TEST_MARK": mark},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_group,
    )


def run_demo(*args: str, timeout_s: float = 60) -> tuple[int | None, str, str, list[int]]:
    """Runs the demo to its end; returns its exit status (None if it had to be killed after
    ``timeout_s``), its output and errors, and the processes it left running."""
    mark = uuid.uuid4().hex
    demo_proc = start_demo(*args, mark=mark)
    try:
        out, err = demo_proc.communicate(timeout=timeout_s)
        code: int | None = demo_proc.returncode
    except subprocess.TimeoutExpired:
        demo_proc.kill()
        out, err = demo_proc.communicate(timeout=10)
        code = None
    return code, out, err, leftovers(mark, out, set())


def stop_demo_at(marker: str, sig: int, *args: str, to_group: bool = False) -> tuple[int | None, str, float, list[int]]:
    """Starts the demo, sends ``sig`` once it prints ``marker``, and waits for it to exit.

    With ``to_group`` the signal goes to the demo's whole process group, as Ctrl-C in a terminal does.
    Returns its exit status (None if it had to be killed), its output, the seconds from the signal to
    its exit, and the processes it started that were still running afterwards.
    """
    mark = uuid.uuid4().hex
    demo_proc = start_demo(*args, mark=mark, new_group=to_group)
    assert demo_proc.stdout is not None
    lines: list[str] = []
    rest = errors = ""
    children: set[int] = set()
    elapsed = float("inf")
    try:
        for line in demo_proc.stdout:  # pytest's per-test timeout bounds this, should the marker never come
            lines.append(line)
            if marker in line:
                break
        assert marker in "".join(lines), "".join(lines)
        children = children_of(demo_proc.pid)
        signalled = time.monotonic()
        if to_group:
            os.killpg(demo_proc.pid, sig)
        else:
            demo_proc.send_signal(sig)
        rest, errors = demo_proc.communicate(timeout=45)
        elapsed = time.monotonic() - signalled
    finally:
        if demo_proc.poll() is None:
            demo_proc.kill()
            demo_proc.wait(10)
        output = "".join(lines) + rest + errors
        left = leftovers(mark, output, children)
    return demo_proc.returncode if elapsed < float("inf") else None, output, elapsed, left


def test_sigterm_while_waiting_for_completions_stops_the_demo_and_every_process_it_started() -> None:
    # 500 jobs, a hundred of them sleeping up to 0.5 s each, keep 3 workers busy for seconds.
    code, output, elapsed, left = stop_demo_at("completions as they stream back", signal.SIGTERM, "--jobs", "500")
    assert "jobs completed" not in output, "the demo finished before the signal: it tested nothing"
    assert (code, left) == (0, []), output
    assert elapsed < 15, output
    assert "Traceback" not in output
    assert len(re.findall(r"\(pid \d+\)", output)) == 5  # redis-server, the gateway and 3 workers
    assert "stopped every process" in output


@pytest.mark.parametrize(
    "marker",
    ["started redis-server", "gateway serving", "Press Ctrl-C"],
    ids=["while-starting-the-gateway", "while-starting-the-workers", "while-the-stack-keeps-running"],
)
def test_sigterm_at_any_point_stops_every_process_the_demo_started(marker: str) -> None:
    code, output, elapsed, left = stop_demo_at(marker, signal.SIGTERM, "--jobs", "20")
    assert (code, left) == (0, []), output
    assert elapsed < 15, output
    assert "Traceback" not in output and "stopped every process" in output


def test_ctrl_c_in_a_terminal_while_jobs_run_stops_every_process_promptly_with_status_130() -> None:
    # Ctrl-C reaches the whole foreground process group; by the 100th completion jobs are in flight.
    code, output, elapsed, left = stop_demo_at(" 100 ", signal.SIGINT, "--jobs", "500", to_group=True)
    assert "jobs completed" not in output, "the demo finished before the signal: it tested nothing"
    assert (code, left) == (130, []), output
    # Redis must stop last: stopped along with the demo, it leaves the workers unable to hand back
    # their jobs until their grace period runs out.
    assert elapsed < 15, output
    assert "Traceback" not in output and "stopped every process" in output


def test_zero_jobs_starts_the_stack_submits_nothing_and_exits_cleanly() -> None:
    code, out, err, left = run_demo("--once", "--jobs", "0")
    assert (code, left) == (0, []), out + err
    assert "Traceback" not in err
    assert "no jobs submitted" in out and "submitted 0" not in out
    assert "stopped every process" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "--workers: 0 is out of range: it must be at least 1"),
        (["--workers", "-2"], "--workers: -2 is out of range"),
        (["--jobs", "-1"], "--jobs: -1 is out of range: it must be from 0 to 1000"),
        (["--jobs", "1001"], "--jobs: 1001 is out of range"),
        (["--jobs", "many"], "--jobs: 'many' is not a whole number"),
    ],
)
def test_counts_the_demo_cannot_run_are_refused_before_anything_starts(args: list[str], message: str) -> None:
    # A timeout well under the 120 s a demo without workers used to spend waiting for completions.
    code, out, err, left = run_demo("--once", *args, timeout_s=20)
    assert (code, left) == (2, []), out + err
    assert message in err
    assert out == ""  # nothing started, not even Redis


def option_help(help_text: str) -> dict[str, str]:
    """The options section of argparse's help: each option's flags mapped to its (unwrapped) text."""
    section = help_text.split("\noptions:\n", 1)[1]
    entries: dict[str, str] = {}
    flags = ""
    for line in section.splitlines():
        if match := re.match(r"^  (-\S.*?)(?:\s{2,}(\S.*))?$", line):
            flags, text = match.group(1), match.group(2) or ""
            entries[flags] = text
        elif line.strip() and flags:
            entries[flags] = f"{entries[flags]} {line.strip()}".strip()
    return entries


def test_help_describes_the_demo_and_every_option_in_complete_sentences(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        demo.main(["--help"])
    assert exited.value.code == 0
    help_text = capsys.readouterr().out
    description = help_text.split("\n\n", 1)[1].split("\noptions:\n", 1)[0]
    paragraphs = [" ".join(p.split()) for p in description.split("\n\n") if p.strip()]
    assert paragraphs and all(p[0].isupper() and p.endswith(".") for p in paragraphs), paragraphs
    entries = option_help(help_text)
    parser = demo.build_parser()
    for action in parser._actions:
        flags = next(f for f in entries if set(action.option_strings) <= set(re.findall(r"--?[\w-]+", f)))
        text = entries[flags]
        assert text[:1].isupper() and text.endswith("."), (flags, text)
        if action.default not in (None, False, argparse.SUPPRESS):
            assert f"(default: {action.default})" in text, (flags, text)
    assert {"--once", "--jobs", "--workers", "--help"} <= {f for a in parser._actions for f in a.option_strings}
