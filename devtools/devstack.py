"""Runs a jobgate stack as local processes: gateways and workers against a Redis.

Used by ``make run`` (``python -m devtools.demo``), the end-to-end tests and the benchmarks, so
they all start the stack exactly as an operator would: ``python -m gateway`` and
``python -m worker`` with ``JOBGATE_*`` settings. The Redis servers themselves are in
``devtools.servers``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from gateway.healthcheck import health_status

from .servers import Gone, free_port, wait_for


class Service:
    """A gateway or worker subprocess with its log in a file."""

    def __init__(self, name: str, args: Sequence[str], env: Mapping[str, str], log_dir: str) -> None:
        self.name = name
        self.worker_id = ""
        self.log_path = Path(log_dir) / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def terminate(self, timeout_s: float = 30) -> int:
        """SIGTERM and wait (SIGKILL after ``timeout_s``); returns the exit code."""
        self.signal(signal.SIGTERM)
        return self.wait_or_kill(timeout_s)

    def wait_or_kill(self, timeout_s: float) -> int:
        """Waits for the process to exit (SIGKILL after ``timeout_s``); returns the exit code."""
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        self._log.close()
        return code

    def close(self) -> None:
        """Closes the log file (the process itself is left alone)."""
        if not self._log.closed:
            self._log.close()

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Stack:
    """Gateways and workers against one Redis, all local processes, torn down together."""

    def __init__(self, redis_url: str, namespace: str = "jobgate", env: Mapping[str, str] | None = None) -> None:
        self.redis_url = redis_url
        self.namespace = namespace
        self.env = {"JOBGATE_REDIS_URL": redis_url, "JOBGATE_NAMESPACE": namespace, **(env or {})}
        self.log_dir = tempfile.mkdtemp(prefix="jobgate-logs-")
        self.gateways: list[Service] = []
        self.workers: list[Service] = []
        self._count = 0
        self.credentials: grpc.ChannelCredentials | None = None  # for gateways that serve TLS

    def _name(self, kind: str) -> str:
        self._count += 1
        return f"{kind}-{self._count}"

    def start_gateway(
        self, *args: str, port: int | None = None, env: Mapping[str, str] | None = None, wait: bool = True
    ) -> tuple[Service, str]:
        """Starts ``python -m gateway``; returns it and its address once health says SERVING."""
        address = f"127.0.0.1:{port or free_port()}"
        gw = Service(
            self._name("gateway"),
            ["-m", "gateway", *args],
            {**self.env, "JOBGATE_LISTEN": address, **(env or {})},
            self.log_dir,
        )
        self.gateways.append(gw)
        if wait:
            self.wait_serving(gw, address)
        return gw, address

    def wait_serving(self, gw: Service, address: str, timeout_s: float = 20) -> None:
        def serving() -> bool:
            if not gw.alive():
                raise Gone(f"{gw.name} exited:\n{gw.log()}")
            status = health_status(address, credentials=self.credentials)
            return bool(status == health_pb2.HealthCheckResponse.SERVING)

        try:
            wait_for(serving, timeout_s, f"{gw.name} at {address}", interval_s=0.1)
        except RuntimeError as exc:
            raise RuntimeError(str(exc)) from None

    def start_worker(self, *args: str, worker_id: str | None = None, env: Mapping[str, str] | None = None) -> Service:
        """Starts ``python -m worker`` (it registers itself within a heartbeat)."""
        name = self._name("worker")
        extra = {"JOBGATE_WORKER_ID": worker_id or f"{name}-{os.getpid()}"}
        w = Service(name, ["-m", "worker", *args], {**self.env, **extra, **(env or {})}, self.log_dir)
        w.worker_id = extra["JOBGATE_WORKER_ID"]
        self.workers.append(w)
        return w

    def stop(self) -> None:
        """SIGTERM to every worker at once, then to every gateway (a process still running after 15
        s is killed), so stopping takes as long as the slowest process, not the sum of them."""
        for group in (self.workers, self.gateways):
            running = [svc for svc in group if svc.alive()]
            for svc in running:
                svc.signal(signal.SIGTERM)
            for svc in running:
                svc.wait_or_kill(15)
        for svc in [*self.workers, *self.gateways]:
            svc.close()
        shutil.rmtree(self.log_dir, ignore_errors=True)

    def logs(self, lines: int = 60) -> str:
        """What each process logged that says something went wrong or changed (its last ``lines``
        lines other than routine INFO lines: jobs started and finished), after its first lines."""
        out = []
        for svc in [*self.gateways, *self.workers]:
            text = svc.log().splitlines()
            notable = _collapsed([line for line in text[5:] if " INFO " not in line])
            out.append(f"===== {svc.name} ({len(text)} lines)\n" + "\n".join([*text[:5], "[...]", *notable[-lines:]]))
        return "\n".join(out)


_JOB_ID = re.compile(r"job_id=[0-9a-f]{32}")
_STAMP = re.compile(r"^\S+ \S+ ")


def _collapsed(lines: list[str]) -> list[str]:
    """``lines`` with runs of the same message (for different jobs) shown once, with their count and
    the time of the first and the last: a burst of one warning does not hide the lines before it."""
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if len(run) > 2:
            last = _STAMP.match(run[-1])
            out.append(f"{run[0]}  [x{len(run)} until {last.group(0).strip() if last else '?'}]")
        else:
            out.extend(run)

    for line in lines:
        shape = _JOB_ID.sub("job_id=*", _STAMP.sub("", line))
        if run and shape == _JOB_ID.sub("job_id=*", _STAMP.sub("", run[0])):
            run.append(line)
        else:
            flush()
            run = [line]
    flush()
    return out
