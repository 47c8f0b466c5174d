"""Local processes seen from outside: a subprocess with its output in a log file, its Prometheus
``/metrics``, and polling until a condition holds.

Free of pytest on purpose: ``bench/`` (which runs from an environment of its own) uses it too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from prometheus_client.parser import text_string_to_metric_families


def children_of(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            # /proc/<pid>/stat: "pid (comm) state ppid ...", and comm may hold spaces.
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


# A sample by its name and its labels (sorted): ("jobgate_gateway_rpcs_total", (("code", "OK"), ...)).
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics_env(port: int) -> dict[str, str]:
    """The setting that makes a gateway or worker serve ``/metrics`` on ``port`` of 127.0.0.1."""
    return {"JOBGATE_METRICS_LISTEN": f"127.0.0.1:{port}"}


def scrape(port: int) -> Samples:
    """Every sample of the ``/metrics`` endpoint on ``port`` of 127.0.0.1, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def totals(samples: Samples) -> dict[str, float]:
    """The samples summed by name over their labels (an unlabelled sample is its own total)."""
    out: dict[str, float] = defaultdict(float)
    for (name, _), v in samples.items():
        out[name] += v
    return dict(out)


def wait_until(
    check: Callable[[], object],
    timeout_s: float,
    what: str,
    *,
    interval_s: float = 0.05,
    ignore: tuple[type[Exception], ...] = (),
) -> None:
    """Polls ``check()`` until it returns something truthy; an exception of ``ignore`` counts as
    "not yet", any other propagates. Raises TimeoutError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except ignore:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done after {timeout_s:.1f}s")
        time.sleep(interval_s)


class HasLog(Protocol):
    def log(self) -> str: ...


def logged(process: HasLog, *needles: str) -> bool:
    """Whether the process's log holds any of ``needles``."""
    text = process.log()
    return any(n in text for n in needles)


class Process:
    """A subprocess in a session of its own, so that a signal reaches the children it forks too,
    with its output (stdout and stderr) in ``<log_dir>/<name>.log``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_dir: str | Path,
        *,
        cwd: str | Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = Path(log_dir) / f"{name}.log"
        with self.log_path.open("ab") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        """Sends ``sig`` to the process group (nothing when all of it has exited)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL, as in a crash, and wait."""
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout_s: float = 10) -> None:
        """SIGTERM; SIGKILL to whatever of the group is left after ``timeout_s`` (the leader, or
        children it did not wait for)."""
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
        self.kill()
